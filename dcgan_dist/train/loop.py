"""The training loop: `train(cfg)` runs to cfg.train.images and checkpoints on the way.

The same `train()` runs in a plain local process, under torchrun, and as Ray Train's per-worker function
(distributed/ray_launch.py is handed it; this module knows nothing of Ray). Progress is counted in images seen
by D across all ranks; a rerun with the same run directory resumes from the newest checkpoint (resume.py: at any
world size). A run that goes non-finite rolls back to its newest checkpoint (health.py); SIGTERM or SIGINT stops
it at a step boundary with a checkpoint (stop.py). A launcher that hears of node preemptions (Ray) hands in a
`preemption` probe, which every rank calls at each log interval: on a notice the loop writes a just-in-time
checkpoint and raises distributed.preemption.Preempted.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import checkpoint, files, models, pixels
from .. import config as config_mod
from ..config import Config
from ..data.shardset import resolve
from ..data.stream import StreamPosition, make_loader
from ..distributed import context as dist
from ..distributed.preemption import Preempted, PreemptionProbe
from ..evaluate import during_training
from . import health, perf, resume
from .nets import build_nets, make_step
from .runlog import RunLog
from .step import STAT_NAMES
from .stop import StopRequest, Stopped, ignore_in_loader_workers

# Called on every rank at every checkpoint, with the file (rank 0) or None (other ranks) and the latest metrics.
CheckpointHook = Callable[[Optional[Path], dict], None]


def z_for_step(cfg: Config, step: int, rank: int, n: int, device: torch.device, rollbacks: int = 0) -> torch.Tensor:
    """The latent batch of a step, a pure function of (seed, rollbacks, rank, step): a resumed run draws the same z."""
    gen = torch.Generator(device=device)
    gen.manual_seed((cfg.train.seed * 0x9E3779B97F4A7C15 + rollbacks * 0x94D049BB133111EB
                     + rank * 0xBF58476D1CE4E5B9 + step) % 2 ** 63)
    return models.sample_z(n, cfg.model, device=device, generator=gen)


def train(cfg: Config, resume_from: Path | None = None, on_checkpoint: CheckpointHook | None = None,
          preemption: PreemptionProbe | None = None) -> dict:
    """Run the training loop to cfg.train.images; return the last logged metrics (on every rank)."""
    ctx = dist.init(cfg.train.device, cfg.trainer.collective_timeout_s, cfg.trainer.startup_timeout_s)
    in_a_row, progress = 0, {}  # progress["since_rollback"]: a checkpoint was written since the last rollback
    try:
        with StopRequest() as stop:
            while True:
                try:
                    return _run(cfg, ctx, resume_from, on_checkpoint, preemption, stop, in_a_row, progress)
                except health.NonFinite as err:
                    in_a_row = 1 if progress.pop("since_rollback", 0) else in_a_row + 1
                    if cfg.train.on_nonfinite == "stop" or in_a_row > cfg.train.max_rollbacks:
                        why = "train.on_nonfinite=stop" if cfg.train.on_nonfinite == "stop" else \
                            f"{cfg.train.max_rollbacks} rollbacks in a row did not help (train.max_rollbacks)"
                        raise health.NonFinite(f"{err}; stopped: {why}. Every checkpoint in "
                                               f"{checkpoint.directory(cfg.run_dir)} is finite") from None
                    if ctx.is_main:
                        print(f"dcgan_dist: {err}: rolling back to the newest checkpoint with new latent draws "
                              f"(rollback {in_a_row} of at most {cfg.train.max_rollbacks})", flush=True)
                    resume_from = None  # the run directory's newest checkpoint: all of them are finite
    finally:
        dist.shutdown(ctx)


def _run(cfg: Config, ctx: dist.Context, resume_from: Path | None, on_checkpoint: CheckpointHook | None,
         preemption: PreemptionProbe | None, stop: StopRequest, extra_rollbacks: int, progress: dict) -> dict:
    run_dir, device = Path(cfg.run_dir), ctx.device
    shards = resolve(cfg.data.shards)
    nets = build_nets(cfg, ctx)
    start = resume.restore(nets, cfg, ctx, shards, resume_from)
    opt_g, opt_d = nets.opt_g, nets.opt_d
    rollbacks = start.rollbacks + extra_rollbacks
    step_fn = make_step(nets, cfg, ctx)
    G, D, ema, fmt = nets.G, nets.D, nets.ema, perf.memory_format(nets.resolved.channels_last)
    cfg = perf.with_resolved(cfg, nets.resolved)  # what config.yaml and the checkpoints record

    position = StreamPosition(shards, cfg, ctx.world_size, start.data_step, start.consumed)
    loader = make_loader(shards, cfg, ctx.rank, ctx.world_size, start_step=start.data_step,
                         pin_memory=device.type == "cuda", worker_init_fn=ignore_in_loader_workers,
                         start_consumed=position.consumed)
    batches = iter(loader)
    per_step = cfg.train.batch_size * ctx.world_size
    images_seen, step, data_step, skipped = start.images, start.step, start.data_step, start.skipped
    target = images_seen + max(0, math.ceil((cfg.train.images - images_seen) / per_step)) * per_step
    fixed_z = models.sample_z(cfg.log.grid_size, cfg.model, generator=torch.Generator().manual_seed(cfg.train.seed))
    fixed_z = fixed_z.to(device)

    log = None
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(exist_ok=True)
        files.write_text(run_dir / "config.yaml", config_mod.to_yaml(cfg))
        log = RunLog(run_dir, cfg, target, images_seen)
        log.message(nets.resolved.describe())
        log.message(f"G_ema: half-life {ema.half_life} images, batchnorm statistics: {cfg.train.ema_bn} "
                    f"(train.ema_*)" if ema is not None else "G_ema: off (train.ema_images=0)")
        if start.path is not None:
            log.message(f"resumed from {start.path} at {images_seen} images")
        for message in start.messages:
            log.message(f"  {message}")
    evaluator = during_training.build(cfg, ctx)  # FID or coverage every eval.every_images; None when off
    if log is not None and evaluator is not None:
        log.message(evaluator.describe())
    watch = health.CollapseWatch()

    stat_sum = torch.zeros(len(STAT_NAMES), device=device)
    steps_in_window, window_start = 0, time.perf_counter()
    metrics: dict = {}
    notice = None  # a preemption notice: checkpoint now, then stop stepping
    try:
        while images_seen < target:
            images_u8, n_skipped, n_bad_shards = next(batches)
            if log is not None and images_seen == 0:
                log.grid("real", pixels.from_uint8(images_u8[: cfg.log.grid_size], device), 0)
            real = pixels.from_uint8(images_u8, device).contiguous(memory_format=fmt)
            z = z_for_step(cfg, step, ctx.rank, real.shape[0], device, rollbacks)

            if ema is not None:
                ema.prepare(images_seen)
            stat_sum += step_fn(real, z)
            # G_ema as sampled (standing statistics under ema_bn=recompute): built once, if grids, eval or a checkpoint
            g_ema = functools.cache(lambda: ema.for_sampling() if ema is not None else None)
            skipped = [skipped[0] + n_skipped, skipped[1] + n_bad_shards]
            position.took(data_step, n_skipped)
            step, data_step = step + 1, data_step + 1
            steps_in_window += 1
            prev, images_seen = images_seen, images_seen + per_step
            done = images_seen >= target
            # One process checks for a stop request every step; ranks agree on it through the interval's reduction.
            stopping = bool(stop.signum) and ctx.world_size == 1

            def crossed(every: int) -> bool:
                return images_seen // every > prev // every or done or stopping

            if crossed(cfg.log.every_images):
                # One host synchronisation per logging interval: averages over steps and ranks, summed throughput.
                elapsed = time.perf_counter() - window_start
                host = torch.tensor([*skipped, steps_in_window * cfg.train.batch_size / elapsed,
                                     float(bool(stop.signum))], device=device)
                values = dist.all_reduce_sum(torch.cat([stat_sum / steps_in_window, host])).tolist()
                metrics = {name: v / ctx.world_size for name, v in zip(STAT_NAMES, values)}
                health.check_metrics(metrics, images_seen)
                metrics["data/skipped_samples"], metrics["data/skipped_shards"] = values[len(STAT_NAMES):-2]
                metrics["perf/images_per_sec"], metrics["perf/world_size"] = values[-2], ctx.world_size
                stopping = stopping or values[-1] > 0
                alarm = watch.update(metrics)
                metrics["images"] = images_seen
                if log is not None:
                    log.scalars(images_seen, {k: v for k, v in metrics.items() if k != "images"})
                    if alarm:
                        log.alarm(images_seen, alarm)
                stat_sum.zero_()
                steps_in_window, window_start = 0, time.perf_counter()
                if preemption is not None and not done:
                    notice = preemption()  # on every rank at the same step: the probe is a barrier under Ray
                    if notice is not None and log is not None:
                        log.alarm(images_seen, f"preemption notice: {notice}; writing a just-in-time checkpoint")

            if log is not None and crossed(cfg.log.sample_every_images) and not stopping:
                # G and G_ema side by side in TensorBoard; the PNG shows the one users sample from.
                png = run_dir / "samples" / f"samples-{images_seen:012d}.png"
                with models.eval_mode(models.base_module(G)) as g:
                    log.grid("samples/fixed_noise", g(fixed_z), images_seen, None if ema is not None else png)
                if ema is not None:
                    with models.eval_mode(g_ema()) as g:
                        log.grid("samples/fixed_noise_ema", g(fixed_z), images_seen, png)

            if evaluator is not None and crossed(cfg.eval.every_images) and not stopping:
                began = time.perf_counter()
                evaluator(models.base_module(G), g_ema(), models.base_module(D), images_seen, log)
                took = time.perf_counter() - began
                if log is not None and ctx.world_size > 1 and took > cfg.trainer.collective_timeout_s / 2:
                    log.alarm(images_seen, f"the evaluation took {took:.0f} s; at trainer.collective_timeout_s="
                                           f"{cfg.trainer.collective_timeout_s:g} s a rank that finishes its "
                                           f"share first may time out: raise it, or lower eval.samples")

            if crossed(cfg.log.checkpoint_every_images) or notice is not None:
                # Never write a non-finite network: every checkpoint on disk stays one to roll back to.
                bad = health.nonfinite_parameters({"G": models.base_module(G), "D": models.base_module(D),
                                                   **({"G_ema": ema.module} if ema is not None else {})})
                if dist.all_reduce_sum(torch.tensor([float(len(bad))], device=device)).item() > 0:
                    raise health.NonFinite(f"non-finite weights at {images_seen} images"
                                           + (f" in {' and '.join(bad)}" if bad else " on another rank"))
                path = None
                all_skipped = dist.gather_lists(skipped)
                all_consumed = dist.gather_lists(position.consumed or [])
                if ctx.is_main:
                    state = {
                        "G": models.base_module(G).state_dict(), "D": models.base_module(D).state_dict(),
                        "opt_G": opt_g.state_dict(), "opt_D": opt_d.state_dict(),
                        "images": images_seen, "step": step, "data_step": data_step, "rollbacks": rollbacks,
                        "geometry": resume.geometry(cfg, ctx), "world_size": ctx.world_size,
                        "skipped": all_skipped, "consumed": all_consumed, "rng": checkpoint.rng_state(),
                        "config": config_mod.to_dict(cfg),
                    }
                    if ema is not None:
                        state["G_ema"] = g_ema().state_dict()
                    path = checkpoint.save(state, checkpoint.path_for(run_dir, images_seen),
                                           cfg.log.keep_checkpoints, cfg.log.keep_every_images)
                progress["since_rollback"] = 1
                dist.barrier(cfg.trainer.collective_timeout_s)
                if on_checkpoint is not None:
                    on_checkpoint(path, metrics)

            if notice is not None:
                raise Preempted(notice, images_seen)
            if stopping:
                raise Stopped(stop.signum, f"stopped by signal {stop.signum} at {images_seen} images; checkpoint "
                                           f"{checkpoint.path_for(run_dir, images_seen)}; rerun the same command "
                                           f"to resume")
        if log is not None:
            log.message(f"done: {images_seen} images. TensorBoard: tensorboard --logdir {run_dir / 'tb'}\n"
                        f"  samples: {run_dir / 'samples'}\n  checkpoint: {checkpoint.latest(run_dir)}")
    finally:
        # Shut the loader workers down now, gracefully: an exception's traceback keeps the iterator alive until
        # interpreter exit, where multiprocessing would SIGTERM workers that ignore it (stop.py) and wait forever.
        shutdown = getattr(batches, "_shutdown_workers", None)  # DataLoader's own clean shutdown
        if shutdown is not None:
            shutdown()
        if log is not None:
            log.close()
    return metrics
