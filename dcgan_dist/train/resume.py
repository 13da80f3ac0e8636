"""Where a run starts: from scratch, or from a checkpoint that rank 0 chooses and every rank then holds.

The image count is the truth. A run resumed with the geometry it was written with (ranks, per-rank batch, loader
workers) continues the data stream exactly where it stopped, so it ends bit-identical to an uninterrupted run. With
another geometry the old stream position means nothing, so the stream starts a fresh pass, number
ceil(images / data set size): deterministic, and no rank replays the rest of an interrupted pass's order. The loop
then runs ceil((train.images - images) / new global batch) steps, so it ends at exactly train.images whenever that
is a multiple of the global batch.

Settings that say how to train (lr, betas, the optimizer's capturable/fused flags) come from the config, not from
the saved optimizer; settings that say what the networks are (model.*) must match, or it is an error naming them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoint
from .. import config as config_mod
from ..config import Config
from ..data.shardset import ShardSet
from ..data.stream import StreamPosition, dataset_size, steps_per_pass
from ..distributed import context
from ..distributed.context import Context
from .nets import Nets


class ResumeError(ValueError):
    """A checkpoint that cannot continue this config (another model shape); the message names the keys."""


@dataclass
class Start:
    """The position a run starts from."""
    path: Path | None = None
    images: int = 0
    step: int = 0          # steps taken so far: seeds the latent draws
    data_step: int = 0     # the data stream's position, in steps of the current geometry
    rollbacks: int = 0     # non-finite rollbacks so far: shift the latent draws away from the diverged ones
    skipped: list[int] = field(default_factory=lambda: [0, 0])  # this rank's corrupt samples, unreadable shards
    consumed: list[int] | None = None  # raw samples per virtual stream in the current pass (None: unknown)
    messages: list[str] = field(default_factory=list)


def geometry(cfg: Config, ctx: Context) -> dict:
    """What the data stream's layout depends on."""
    return {"world_size": ctx.world_size, "batch_size": cfg.train.batch_size, "loader_workers": cfg.data.loader_workers}


def choose(cfg: Config, ctx: Context, resume_from: Path | None) -> tuple[Path, checkpoint.Checkpoint] | None:
    """Rank 0 picks the checkpoint (resume_from, unless the run directory holds a newer readable one) and loads
    it; every rank receives the same record, so a stale file listing on one node cannot split the ranks."""
    found = None
    if ctx.is_main:
        handed = (Path(resume_from), checkpoint.load(resume_from, resumable=True)) \
            if resume_from is not None else None
        # A launcher's copy can lag the run directory: Ray registers a checkpoint only once every rank has
        # reported it, so a node lost just after rank 0 wrote one leaves Ray a checkpoint or two behind.
        found = checkpoint.newest_readable(cfg.run_dir, after=handed[1].images if handed else -1) or handed
    return context.broadcast_object(found)


def _model_mismatch(saved: dict, cfg: Config) -> list[str]:
    now = config_mod.to_dict(cfg)["model"]
    was = saved.get("model", {})
    return [f"model.{k}={was.get(k)!r} in the checkpoint, {now[k]!r} now" for k in now if was.get(k) != now[k]]


def _load_optimizer(opt: torch.optim.Optimizer, saved: dict, which: str, messages: list[str]) -> None:
    """Adam's moments and step counts from the checkpoint, every hyperparameter from the config."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(saved)
    for group, wanted in zip(opt.param_groups, fresh):
        for key in ("lr", "betas"):
            if group.get(key) != wanted[key]:
                name = f"train.lr_{which.lower()}" if key == "lr" else "train.beta1/beta2"
                messages.append(f"{name}: {group.get(key)} in the checkpoint, {wanted[key]} in the config (used)")
        group.update(wanted)
        on_device = wanted.get("capturable") or wanted.get("fused")
        for p in group["params"]:
            state = opt.state.get(p, {})
            if "step" in state:  # capturable/fused Adam keeps its step count beside the weights; plain Adam on the CPU
                state["step"] = state["step"].to(device=p.device if on_device else "cpu", dtype=torch.float32)


def restore(nets: Nets, cfg: Config, ctx: Context, shards: ShardSet, resume_from: Path | None) -> Start:
    """Load the chosen checkpoint into nets (unwrapped, before make_step) and return where to start."""
    chosen = choose(cfg, ctx, resume_from)
    if chosen is None:
        return Start()
    path, record = chosen
    saved = record.resume
    mismatch = _model_mismatch(record.config, cfg)
    if mismatch:
        raise ResumeError(f"checkpoint {path} does not fit this config: {'; '.join(mismatch)}. Use another "
                          f"run_dir, or the checkpoint's model settings")
    start = Start(path, record.images, saved.step, rollbacks=saved.rollbacks)
    nets.G.load_state_dict(record.G)
    nets.D.load_state_dict(record.D)
    if nets.ema is not None:
        nets.ema.module.load_state_dict(record.G_ema if record.G_ema is not None else record.G)
        if record.G_ema is None:
            start.messages.append("the checkpoint holds no G_ema (trained with train.ema_images=0): G_ema starts "
                                  "here as a copy of G")
    _load_optimizer(nets.opt_g, saved.opt_G, "G", start.messages)
    _load_optimizer(nets.opt_d, saved.opt_D, "D", start.messages)
    checkpoint.restore_rng(saved.rng)
    if saved.geometry == geometry(cfg, ctx):  # the same ranks: each continues its own stream
        start.data_step = saved.data_step
        start.skipped = list(saved.skipped[ctx.rank])
        start.consumed = StreamPosition.from_record(saved.consumed[ctx.rank])
    else:
        spp = steps_per_pass(shards, cfg, ctx.world_size)
        first_pass = math.ceil(start.images / dataset_size(shards, cfg))
        start.data_step = first_pass * spp
        totals = [sum(s[0] for s in saved.skipped), sum(s[1] for s in saved.skipped)]
        start.skipped = totals if ctx.is_main else [0, 0]  # the run's totals stay whole, on rank 0
        start.messages.append(f"the checkpoint was written with {saved.geometry}, this run has "
                              f"{geometry(cfg, ctx)}: the data stream starts a fresh pass ({first_pass}); the image "
                              f"count goes on from {start.images}")
    _check_same_weights(nets, ctx)
    return start


@torch.no_grad()
def _check_same_weights(nets: Nets, ctx: Context) -> None:
    """Every rank must now hold the same G and D: compare a checksum of all parameters across ranks."""
    if ctx.world_size == 1:
        return
    total = torch.stack([p.double().sum() for m in (nets.G, nets.D) for p in m.parameters()]).sum().view(1)
    sums = context.all_gather_stacked(total.to(ctx.device)).flatten().tolist()
    differ = [r for r, s in enumerate(sums) if s != sums[0]]
    if differ:
        raise RuntimeError(f"after resuming, ranks {differ} hold other weights than rank 0 (checksums {sums})")
