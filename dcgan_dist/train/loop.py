"""The training loop: `train(cfg)` runs to cfg.train.images and checkpoints on the way.

The same `train()` runs in a plain local process, under torchrun, and as Ray Train's per-worker function
(distributed/ray_launch.py is handed it; this module knows nothing of Ray). Progress is counted in images seen
by D across all ranks; a rerun with the same run directory resumes from the newest checkpoint (resume.py: at any
world size). A run that goes non-finite (health.py finds it) rolls back to its newest checkpoint (train() and
_give_up_or_roll_back below). Whatever stops it early, a signal, the launcher's driver, a preemption notice,
arrives as one Interruption that the loop asks for at each log interval, and a hung rank is ended by the watchdog
beside the loop: distributed/interruptions.py says what follows each, distributed/watchdog.py how a hang is found.
Rank 0, the one writer, holds the run directory.

Read top to bottom: train() retries attempts after rollbacks; an attempt builds a Run (the networks, the data
stream, the logs and the run's position, restored from the newest checkpoint) and steps it. After every step,
each interval that the step crossed runs its named function: end_window (statistics, and the interruption the
ranks agree on), sample_grids, evaluate, save_checkpoint. The loop marks its phases for the watchdog.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .. import checkpoint, files, models, pixels
from .. import config as config_mod
from ..config import Config
from ..data import storage
from ..data.shardset import resolve
from ..data.stream import StreamPosition, make_loader
from ..distributed import context
from ..distributed import private_api, rendezvous, watchdog
from ..distributed.interruptions import Interruption, Interrupts, PreemptionProbe, StopProbe, StopRequest
from ..evaluate import during_training
from . import health, perf, resume
from .nets import Nets, build_nets, make_step
from .runlog import RunLog
from .step import STAT_NAMES

HANDOVER_S = 60.0  # how long a distributed run's rank 0 waits for a previous attempt's rank 0 to let go of run_dir
# Called on every rank at every checkpoint, with the file (rank 0) or None (other ranks) and the latest metrics.
CheckpointHook = Callable[[Optional[Path], dict], None]


def z_for_step(cfg: Config, step: int, rank: int, n: int, device: torch.device, rollbacks: int = 0) -> torch.Tensor:
    """The latent batch of a step, a pure function of (seed, rollbacks, rank, step): a resumed run draws the same z."""
    gen = torch.Generator(device=device)
    gen.manual_seed((cfg.train.seed * 0x9E3779B97F4A7C15 + rollbacks * 0x94D049BB133111EB
                     + rank * 0xBF58476D1CE4E5B9 + step) % 2 ** 63)
    return models.sample_z(n, cfg.model, device=device, generator=gen)


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` images lies in (before, after]: an interval ended with this step."""
    return after // every > before // every


def train(cfg: Config, resume_from: Path | None = None, on_checkpoint: CheckpointHook | None = None,
          preemption: PreemptionProbe | None = None, stop_probe: StopProbe | None = None,
          board: watchdog.Board | None = None) -> dict:
    """Run the training loop to cfg.train.images; return the last logged metrics (on every rank).

    A launcher hands in hooks: on_checkpoint after every checkpoint, preemption and stop_probe at every log
    interval (all on every rank, equally often), and the board where the ranks' watchdogs meet."""
    private_api.check(with_ray=False)  # torch's private parts as this code uses them, or an error naming them
    ctx = context.init(cfg.train.device, cfg.trainer.collective_timeout_s, cfg.trainer.startup_timeout_s)
    rollbacks_since_checkpoint = 0  # each one draws new latents; train.max_rollbacks bounds them
    watch = _watchdog(cfg, ctx, board)
    try:
        with _run_dir_held(cfg, ctx), StopRequest() as stop:
            interrupts = Interrupts(stop, stop_probe, preemption)
            while True:
                run = Run.start(cfg, ctx, resume_from, rollbacks_since_checkpoint, watch)
                try:
                    return run.step_until_target(interrupts, on_checkpoint)
                except health.NonFinite as err:
                    rollbacks_since_checkpoint = 1 if run.checkpoints_written else rollbacks_since_checkpoint + 1
                    _give_up_or_roll_back(cfg, ctx, err, rollbacks_since_checkpoint)
                    resume_from = None  # the run directory's newest checkpoint: all of them are finite
                finally:
                    run.close()
    finally:
        watch.stop()
        context.shutdown(ctx)


def _watchdog(cfg: Config, ctx: context.Context, board: watchdog.Board | None) -> watchdog.Watchdog:
    """This rank's hang watchdog, started; its board is the launcher's (Ray), else torchrun's store, else none."""
    t = cfg.trainer
    if board is None and ctx.world_size > 1:
        address = rendezvous.store_board_address()
        board = watchdog.StoreBoard(*address, ctx.world_size) if address else None
    d = cfg.data
    # A remote read that stalls gives up on its own (data.io_timeout per attempt, a second to close it, retries
    # with backoff up to 1.5 x; twice that, as a batch may meet two such shards): a step is allowed that long,
    # so a stalled shard is skipped, not taken for a hang. Local files have no such bound to wait for.
    remote = any(storage.is_remote(part) for part in d.shards.split("::"))
    reads_s = 2 * (d.io_timeout + 1) * (d.read_retries + 1) + 1.5 * d.retry_backoff * (2 ** d.read_retries - 1) \
        + 10.0 if remote else 0.0
    limits = watchdog.Limits(t.hang_timeout_s, t.first_step_timeout_s, t.collective_timeout_s, reads_s)
    return watchdog.Watchdog(limits, ctx.rank, ctx.world_size, rendezvous.where(), cfg.run_dir, board).start()


@contextmanager
def _run_dir_held(cfg: Config, ctx: context.Context) -> Iterator[None]:
    """Rank 0, the run directory's one writer, holds it for the run (files.one_writer): a second trainer on the
    same run_dir gets files.Busy before it writes or deletes a file there. Holding it, rank 0 removes the temporary
    checkpoints that killed writers left (a second signal's os._exit, a SIGKILL): no other process writes there."""
    if not ctx.is_main:
        yield
        return
    # A launcher that restarts its group (Ray, torchrun --max-restarts) may start the new rank 0 while the old one
    # is still exiting; a plain process has no predecessor to wait for.
    with files.one_writer(cfg.run_dir, "run_dir", wait_s=HANDOVER_S if ctx.distributed else 0):
        removed = files.remove_temporaries(checkpoint.directory(cfg.run_dir))
        if removed:
            print(f"dcgan_dist: removed {removed} unfinished checkpoint file(s) that a killed run left in "
                  f"{checkpoint.directory(cfg.run_dir)}", flush=True)
        yield


def _give_up_or_roll_back(cfg: Config, ctx: context.Context, err: health.NonFinite,
                          rollbacks_since_checkpoint: int) -> None:
    """Raise when train.on_nonfinite or train.max_rollbacks says to stop; else say that the run rolls back."""
    if cfg.train.on_nonfinite == "stop" or rollbacks_since_checkpoint > cfg.train.max_rollbacks:
        why = "train.on_nonfinite=stop" if cfg.train.on_nonfinite == "stop" else \
            f"{cfg.train.max_rollbacks} rollbacks in a row did not help (train.max_rollbacks)"
        raise health.NonFinite(f"{err}; stopped: {why}. Every checkpoint in {checkpoint.directory(cfg.run_dir)} "
                                f"is finite") from None
    if ctx.is_main:
        print(f"dcgan_dist: {err}: rolling back to the newest checkpoint with new latent draws "
              f"(rollback {rollbacks_since_checkpoint} of at most {cfg.train.max_rollbacks})", flush=True)


@dataclass
class Window:
    """The log interval being accumulated: per-step statistics summed on the device, so the step never syncs."""
    stat_sum: torch.Tensor
    steps: int = 0
    began: float = field(default_factory=time.perf_counter)

    def restart(self) -> None:
        self.stat_sum.zero_()
        self.steps, self.began = 0, time.perf_counter()


@dataclass
class Run:
    """One attempt at the run: what it trains with and where it stands. Checkpoints record the position fields."""
    cfg: Config                    # perf settings resolved: what config.yaml and the checkpoints record
    ctx: context.Context
    nets: Nets
    step_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batches: Iterator              # the data stream: (uint8 images, corrupt samples skipped, bad shards skipped)
    position: StreamPosition       # the data stream's position (data/stream.py), for an exact resume
    images: int                    # images seen by D across all ranks
    step: int                      # steps taken: seeds the latent draws
    rollbacks: int                 # non-finite rollbacks in the whole run: shifts the latent draws
    skipped: list[int]             # this rank's [corrupt samples, unreadable shards]
    target: int                    # train.images rounded up to whole global batches
    fixed_z: torch.Tensor          # the sample grids' latents, the same for the whole run
    window: Window
    watch: watchdog.Watchdog       # this rank's hang watchdog: the loop marks its phases
    log: RunLog | None = None      # rank 0 only
    evaluator: during_training.TrainingEval | None = None
    collapse: health.CollapseWatch = field(default_factory=health.CollapseWatch)
    metrics: dict = field(default_factory=dict)  # the last log interval's, on every rank
    checkpoints_written: int = 0
    began: float = field(default_factory=time.perf_counter)  # this attempt's start, for the done line
    _g_ema: tuple[int, nn.Module | None] | None = None  # (images, G_ema as sampled) for this step's users

    @classmethod
    def start(cls, cfg: Config, ctx: context.Context, resume_from: Path | None, rollbacks_since_checkpoint: int,
              watch: watchdog.Watchdog) -> "Run":
        """Networks, data stream and logs, at the newest checkpoint's position (or at 0); rollbacks since that
        checkpoint add to its rollback count (each draws new latents)."""
        device = ctx.device
        shards = resolve(cfg.data.shards)
        evaluator = during_training.build(cfg, ctx)  # FID or coverage every eval.every_images; None when off
        nets, step_fn, at = _networks(cfg, ctx, shards, resume_from)
        resolved = perf.with_resolved(cfg, nets.resolved)  # what config.yaml and the checkpoints record
        position = StreamPosition.at(shards, resolved, ctx.world_size, at.data_step, at.consumed)
        loader = make_loader(shards, resolved, ctx.rank, ctx.world_size, pin_memory=device.type == "cuda",
                             start=position, worker_init_fn=partial(watchdog.loader_worker_init, watch.loader_dumps))
        per_step = cfg.train.batch_size * ctx.world_size
        target = at.images + max(0, math.ceil((cfg.train.images - at.images) / per_step)) * per_step
        fixed_z = models.sample_z(cfg.log.grid_size, cfg.model,
                                  generator=torch.Generator().manual_seed(cfg.train.seed)).to(device)
        run = cls(cfg=resolved, ctx=ctx, nets=nets, step_fn=step_fn, batches=iter(loader), position=position,
                  images=at.images, step=at.step,
                  rollbacks=at.rollbacks + rollbacks_since_checkpoint, skipped=at.skipped, target=target,
                  fixed_z=fixed_z, window=Window(torch.zeros(len(STAT_NAMES), device=device)), watch=watch,
                  evaluator=evaluator)
        watch.new_attempt()
        try:  # the loader's workers run from iter(loader) on: whatever fails now must shut them down (close)
            if ctx.is_main:
                run.log = _open_log(resolved, nets, at, target)
                watch.on_hang = lambda text, _lost: run.log.alarm(run.images, text)
            if run.log is not None and run.evaluator is not None:
                run.log.message(run.evaluator.describe())
        except BaseException:
            run.close()
            raise
        return run

    def step_until_target(self, interrupts: Interrupts, on_checkpoint: CheckpointHook | None) -> dict:
        """Step until the target; after each step, run every interval the step ended. The last metrics. An
        interruption the ranks agreed on is raised after its checkpoint."""
        cfg, every = self.cfg, self.cfg.log
        while self.images < self.target:
            before = self.take_step()
            done = self.images >= self.target
            interruption = None
            # A single process asks its own signal flag every step; ranks ask at the interval, where they agree.
            if crossed(before, self.images, every.every_images) or done or (
                    self.ctx.world_size == 1 and interrupts.asked_here()):
                interruption = self.end_window(interrupts, last=done)
            if interruption is None and (crossed(before, self.images, every.sample_every_images) or done):
                self.sample_grids()
            if interruption is None and self.evaluator is not None and (
                    crossed(before, self.images, cfg.eval.every_images) or done):
                self.evaluate()
            if crossed(before, self.images, every.checkpoint_every_images) or done or interruption is not None:
                self.save_checkpoint(on_checkpoint)
            if interruption is not None:
                raise interruption.error(self.images, str(checkpoint.path_for(cfg.run_dir, self.images)))
        if self.log is not None:
            took = time.perf_counter() - self.began
            self.log.message(f"done: {self.images} images in {took:.0f} s. TensorBoard: tensorboard --logdir "
                             f"{Path(cfg.run_dir) / 'tb'}\n  samples: {Path(cfg.run_dir) / 'samples'}\n"
                             f"  checkpoint: {checkpoint.latest(cfg.run_dir)}")
        return self.metrics

    def take_step(self) -> int:
        """One GAN step on the stream's next batch; the image count before it."""
        self.watch.mark(watchdog.DATA)
        images_u8, n_skipped, n_bad_shards = next(self.batches)
        self.watch.mark(watchdog.STEP)
        device, fmt = self.ctx.device, perf.memory_format(self.nets.resolved.channels_last)
        if self.log is not None and self.images == 0:
            self.log.grid("real", pixels.from_uint8(images_u8[: self.cfg.log.grid_size], device), 0)
        real = pixels.from_uint8(images_u8, device).contiguous(memory_format=fmt)
        z = z_for_step(self.cfg, self.step, self.ctx.rank, real.shape[0], device, self.rollbacks)
        if self.nets.ema is not None:
            self.nets.ema.prepare(self.images)
        self.window.stat_sum += self.step_fn(real, z)  # on the device: no host read
        self.window.steps += 1
        self.skipped = [self.skipped[0] + n_skipped, self.skipped[1] + n_bad_shards]
        self.position.took(n_skipped)
        self.step += 1
        before, self.images = self.images, self.images + self.cfg.train.batch_size * self.ctx.world_size
        self.watch.stepped(self.images)
        return before

    def end_window(self, interrupts: Interrupts, last: bool) -> Interruption | None:
        """The log interval's one host synchronisation: statistics averaged over steps and ranks, throughput summed,
        the health checks, TensorBoard. The interruption the ranks agree on, if any."""
        w, ctx = self.window, self.ctx
        elapsed = time.perf_counter() - w.began
        # One all-reduce of everything the interval needs from every rank, summed; named back on the host.
        host = {"data/skipped_samples": self.skipped[0], "data/skipped_shards": self.skipped[1],
                "perf/images_per_sec": w.steps * self.cfg.train.batch_size / elapsed}
        signum = interrupts.request()
        host.update({"stop/signal": float(signum), "stop/ranks": float(bool(signum))})
        summed = context.all_reduce_sum(torch.cat([w.stat_sum / w.steps, torch.tensor(list(host.values()),
                                                                                    device=ctx.device)])).tolist()
        totals = dict(zip([*STAT_NAMES, *host], summed, strict=True))
        metrics = {name: totals[name] / ctx.world_size for name in STAT_NAMES}  # each rank's mean, averaged
        health.check_metrics(metrics, self.images)
        metrics.update({name: totals[name] for name in host if not name.startswith("stop/")})
        metrics["perf/world_size"] = ctx.world_size
        alarm = self.collapse.update(metrics)
        if self.log is not None:
            self.log.scalars(self.images, metrics)
            if alarm:
                self.log.alarm(self.images, alarm)
        self.metrics = {**metrics, "images": self.images}
        w.restart()
        interruption = interrupts.at_interval(totals["stop/signal"], totals["stop/ranks"], last)
        if interruption is not None and interruption.notice is not None and self.log is not None:
            self.log.alarm(self.images, f"preemption notice: {interruption.notice}; writing a just-in-time checkpoint")
        return interruption

    def g_ema(self) -> nn.Module | None:
        """G_ema as sampled (standing statistics under ema_bn=recompute), built at most once per step."""
        if self.nets.ema is None:
            return None
        if self._g_ema is None or self._g_ema[0] != self.images:
            self._g_ema = (self.images, self.nets.ema.for_sampling())
        return self._g_ema[1]

    def sample_grids(self) -> None:
        """G and G_ema on the fixed latents, side by side in TensorBoard; the PNG shows the one users sample from."""
        if self.log is None:
            return
        png = Path(self.cfg.run_dir) / "samples" / f"samples-{self.images:012d}.png"
        ema = self.nets.ema
        with models.eval_mode(self.nets.G) as g:
            self.log.grid("samples/fixed_noise", g(self.fixed_z), self.images, None if ema is not None else png)
        if ema is not None:
            with models.eval_mode(self.g_ema()) as g:
                self.log.grid("samples/fixed_noise_ema", g(self.fixed_z), self.images, png)

    def evaluate(self) -> None:
        """FID or coverage on every rank (each its share of the samples); rank 0 logs it and keeps best.pt."""
        began = time.perf_counter()
        nets = self.nets
        self.watch.mark(watchdog.EVAL)
        self.evaluator(nets.G, self.g_ema(), nets.D, self.images, self.log)
        took, timeout = time.perf_counter() - began, self.cfg.trainer.collective_timeout_s
        if self.log is not None and self.ctx.world_size > 1 and took > timeout / 2:
            self.log.alarm(self.images, f"the evaluation took {took:.0f} s; at trainer.collective_timeout_s="
                                        f"{timeout:g} s a rank that finishes its share first may time out: raise "
                                        f"it, or lower eval.samples")
        self.watch.mark(watchdog.INTERVAL)

    def save_checkpoint(self, on_checkpoint: CheckpointHook | None) -> None:
        """Rank 0 writes the record (checkpoint.py owns the format), after every rank checked its weights are
        finite; then every rank calls the launcher's hook."""
        nets, ctx = self.nets, self.ctx
        self.watch.mark(watchdog.CHECKPOINT)
        G, D = nets.G, nets.D
        # Never write a non-finite network: every checkpoint on disk stays one to roll back to.
        bad = health.nonfinite_parameters({"G": G, "D": D, **({"G_ema": nets.ema.module} if nets.ema else {})})
        if context.all_reduce_sum(torch.tensor([float(len(bad))], device=ctx.device)).item() > 0:
            raise health.NonFinite(f"non-finite weights at {self.images} images"
                                   + (f" in {' and '.join(bad)}" if bad else " on another rank"))
        all_skipped = context.gather_lists(self.skipped)
        all_consumed = context.gather_lists(self.position.record())
        path = None
        if ctx.is_main:
            g_ema = self.g_ema()
            record = checkpoint.Checkpoint(
                config=config_mod.to_dict(self.cfg), images=self.images, G=G.state_dict(), D=D.state_dict(),
                G_ema=g_ema.state_dict() if g_ema is not None else None,
                resume=checkpoint.Resume(
                    opt_G=nets.opt_g.state_dict(), opt_D=nets.opt_d.state_dict(), step=self.step,
                    data_step=self.position.data_step, rollbacks=self.rollbacks, geometry=resume.geometry(self.cfg, ctx),
                    skipped=all_skipped, consumed=all_consumed, rng=checkpoint.rng_state()))
            path = checkpoint.save(record, checkpoint.path_for(self.cfg.run_dir, self.images),
                                   self.cfg.log.keep_checkpoints, self.cfg.log.keep_every_images)
        self.checkpoints_written += 1
        context.barrier(self.cfg.trainer.collective_timeout_s)
        if on_checkpoint is not None:
            on_checkpoint(path, self.metrics)
        self.watch.mark(watchdog.INTERVAL)

    def close(self) -> None:
        """Shut the loader workers down now, gracefully, and close the logs. An exception's traceback keeps the
        iterator alive until interpreter exit, where multiprocessing would SIGTERM workers that ignore it
        (interruptions.ignore_in_loader_workers)
        and wait forever."""
        private_api.shut_down_loader_workers(self.batches)
        if self.log is not None:
            self.log.close()


def _networks(cfg: Config, ctx: context.Context, shards, resume_from: Path | None):
    """(nets, step function, where the run starts), in the one order that works: built, restored from the newest
    checkpoint, then wrapped for the step (DDP starts from rank 0's restored weights; a CUDA graph captures the
    restored optimizer state)."""
    nets = build_nets(cfg, ctx)
    at = resume.restore(nets, cfg, ctx, shards, resume_from)
    return nets, make_step(nets, cfg, ctx), at


def _open_log(cfg: Config, nets: Nets, at: resume.Start, target: int) -> RunLog:
    """Rank 0's run directory, config.yaml and TensorBoard log, with the run's start-up lines."""
    run_dir = Path(cfg.run_dir)
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    files.write_text(run_dir / "config.yaml", config_mod.to_yaml(cfg))
    log = RunLog(run_dir, cfg, target, at.images)
    log.message(nets.resolved.describe())
    ema = nets.ema
    log.message(f"G_ema: half-life {ema.half_life} images, batchnorm statistics: {cfg.train.ema_bn} (train.ema_*)"
                if ema is not None else "G_ema: off (train.ema_images=0)")
    if at.path is not None:
        log.message(f"resumed from {at.path} at {at.images} images")
    for message in at.messages:
        log.message(f"  {message}")
    return log
