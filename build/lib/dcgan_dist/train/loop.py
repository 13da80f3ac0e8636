"""The training loop: `train(cfg)` runs to cfg.train.images and checkpoints on the way.

The same `train()` runs in a plain local process, under torchrun, and as Ray Train's per-worker function
(distributed/ray_launch.py is handed it; this module knows nothing of Ray). Progress is counted in images seen
by D across all ranks; a rerun with the same run directory resumes from the newest checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import checkpoint, files, models, pixels
from .. import config as config_mod
from ..config import Config
from ..data.shardset import resolve
from ..data.stream import make_loader
from ..distributed import context as dist
from ..evaluate import during_training
from . import perf
from .nets import build_nets, make_step
from .runlog import RunLog
from .step import STAT_NAMES

# Called on every rank at every checkpoint, with the file (rank 0) or None (other ranks) and the latest metrics.
CheckpointHook = Callable[[Optional[Path], dict], None]


def z_for_step(cfg: Config, step: int, rank: int, n: int, device: torch.device) -> torch.Tensor:
    """The latent batch of a step, a pure function of (seed, rank, step): a resumed run draws the same z."""
    gen = torch.Generator(device=device)
    gen.manual_seed((cfg.train.seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + step) % 2 ** 63)
    return models.sample_z(n, cfg.model, device=device, generator=gen)


def train(cfg: Config, resume_from: Path | None = None, on_checkpoint: CheckpointHook | None = None) -> dict:
    """Run the training loop to cfg.train.images; return the last logged metrics (on every rank)."""
    ctx = dist.init(cfg.train.device)
    run_dir = Path(cfg.run_dir)
    device = ctx.device

    nets = build_nets(cfg, ctx)
    G, D, opt_g, opt_d = nets.G, nets.D, nets.opt_g, nets.opt_d

    images_seen, step = 0, 0
    skipped = [0, 0]  # this rank's corrupt samples and unreadable shards since the run began (host-side counts)
    resume_from = resume_from or checkpoint.latest(run_dir)
    if resume_from is not None:
        state = checkpoint.load(resume_from, map_location=device)
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        opt_g.load_state_dict(state["opt_G"])
        opt_d.load_state_dict(state["opt_D"])
        images_seen, step = state["images"], state["step"]
        skipped = list(state["skipped"][ctx.rank]) if ctx.rank < len(state["skipped"]) else [0, 0]
        checkpoint.restore_rng(state["rng"])

    step_fn = make_step(nets, cfg, ctx)
    G, D, fmt = nets.G, nets.D, perf.memory_format(cfg.perf.channels_last)

    shards = resolve(cfg.data.shards)
    loader = make_loader(shards, cfg, ctx.rank, ctx.world_size, start_step=step,
                              pin_memory=device.type == "cuda")
    batches = iter(loader)
    per_step = cfg.train.batch_size * ctx.world_size
    total_steps = math.ceil(cfg.train.images / per_step)
    fixed_z = models.sample_z(cfg.log.grid_size, cfg.model, generator=torch.Generator().manual_seed(cfg.train.seed))
    fixed_z = fixed_z.to(device)

    log = None
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(exist_ok=True)
        files.write_text(run_dir / "config.yaml", config_mod.to_yaml(cfg))
        log = RunLog(run_dir, cfg, total_steps * per_step, images_seen)
        if resume_from is not None:
            log.message(f"resumed from {resume_from} at {images_seen} images")
    evaluator = during_training.build(cfg, ctx)  # FID or coverage every eval.every_images, on rank 0; None when off

    stat_sum = torch.zeros(len(STAT_NAMES), device=device)
    steps_in_window, window_start = 0, time.perf_counter()
    metrics: dict = {}

    while step < total_steps:
        images_u8, n_skipped, n_bad_shards = next(batches)
        if log is not None and images_seen == 0:
            log.grid("real", pixels.from_uint8(images_u8[: cfg.log.grid_size], device), 0)
        real = pixels.from_uint8(images_u8, device).contiguous(memory_format=fmt)
        z = z_for_step(cfg, step, ctx.rank, real.shape[0], device)

        stat_sum += step_fn(real, z)
        skipped = [skipped[0] + n_skipped, skipped[1] + n_bad_shards]
        step += 1
        steps_in_window += 1
        prev, images_seen = images_seen, images_seen + per_step
        done = step == total_steps

        def crossed(every: int) -> bool:
            return images_seen // every > prev // every or done

        if crossed(cfg.log.every_images):
            # One host synchronisation per logging interval: averages over steps and ranks, summed throughput.
            elapsed = time.perf_counter() - window_start
            host = torch.tensor([*skipped, steps_in_window * cfg.train.batch_size / elapsed], device=device)
            packed = torch.cat([stat_sum / steps_in_window, host])
            values = dist.all_reduce_sum(packed).tolist()
            metrics = {name: v / ctx.world_size for name, v in zip(STAT_NAMES, values)}
            metrics["data/skipped_samples"], metrics["data/skipped_shards"] = values[len(STAT_NAMES):-1]
            metrics["perf/images_per_sec"] = values[-1]
            metrics["images"] = images_seen
            if log is not None:
                log.scalars(images_seen, {k: v for k, v in metrics.items() if k != "images"})
            stat_sum.zero_()
            steps_in_window, window_start = 0, time.perf_counter()

        if log is not None and crossed(cfg.log.sample_every_images):
            with models.eval_mode(models.base_module(G)) as g:
                grid = g(fixed_z)
            log.grid("samples/fixed_noise", grid, images_seen,
                     run_dir / "samples" / f"samples-{images_seen:012d}.png")

        if evaluator is not None and crossed(cfg.eval.every_images):
            evaluator(models.base_module(G), models.base_module(D), images_seen, log)

        if crossed(cfg.log.checkpoint_every_images):
            path = None
            all_skipped = dist.gather_lists(skipped)
            if ctx.is_main:
                state = {
                    "G": models.base_module(G).state_dict(), "D": models.base_module(D).state_dict(),
                    "opt_G": opt_g.state_dict(), "opt_D": opt_d.state_dict(),
                    "images": images_seen, "step": step, "world_size": ctx.world_size, "skipped": all_skipped,
                    "rng": checkpoint.rng_state(), "config": config_mod.to_dict(cfg),
                }
                path = checkpoint.save(state, checkpoint.path_for(run_dir, images_seen), cfg.log.keep_checkpoints)
            dist.barrier()
            if on_checkpoint is not None:
                on_checkpoint(path, metrics)

    if log is not None:
        log.message(f"done: {images_seen} images. TensorBoard: tensorboard --logdir {run_dir / 'tb'}\n"
                    f"  samples: {run_dir / 'samples'}\n  checkpoint: {checkpoint.latest(run_dir)}")
        log.close()
    return metrics
