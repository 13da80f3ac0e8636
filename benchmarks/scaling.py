"""Data-parallel scaling: images/sec with 1 and 2 workers at a fixed per-rank batch, and the time each step spends
in collectives (DDP's gradient all-reduce and synchronised batchnorm's statistics), on the device that is here.

    python benchmarks/scaling.py [--config FILE] [--device auto] [--workers 1,2] [--steps 20] [key=value ...]

Each row runs in fresh processes joined in a process group, as Ray Train starts its workers (gloo on the CPU, NCCL
on GPUs, one GPU per worker), and times the step train() runs (build_nets + make_step: SyncBN
conversion, DDP) on random batches, so data loading is left out. The baseline is the 1-worker row of the same run.
On the CPU each worker gets --threads threads (Ray's default trainer.cpus_per_worker=1 gives it one).

Collective times come from a second, instrumented pass: DDP's all-reduces through a comm hook (from launch to
completion, summed over buckets; they overlap the backward, so this bounds what they can cost), SyncBN's through
the torch.distributed calls it makes (blocking). On CUDA both are measured with device synchronisation.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import time

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from dcgan_dist import config
from dcgan_dist.distributed import context as dist
from dcgan_dist.train.nets import build_nets, make_step

_SYNCBN_CALLS = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CollectiveClock:
    """Seconds spent in DDP's bucket all-reduces and in the torch.distributed calls SyncBN makes."""

    def __init__(self, device: torch.device):
        self.device, self.ddp, self.syncbn, self._depth = device, 0.0, 0.0, 0

    def ddp_hook(self, state, bucket):
        sync(self.device)
        start = time.perf_counter()
        self._depth += 1  # the hook's own all_reduce is DDP's, not SyncBN's
        try:
            fut = default_hooks.allreduce_hook(state, bucket)
        finally:
            self._depth -= 1

        def done(f):
            sync(self.device)
            self.ddp += time.perf_counter() - start
            return f.value()

        return fut.then(done)

    def patch_syncbn_calls(self) -> None:
        """Wrap the torch.distributed calls that SyncBN (ours or PyTorch's) makes so that they are timed."""
        for name in _SYNCBN_CALLS:
            if hasattr(torch_dist, name):
                setattr(torch_dist, name, self._timed(getattr(torch_dist, name)))

    def _timed(self, fn):
        def call(*args, **kwargs):
            if self._depth:  # nested (a deprecated name calling its successor) or inside the DDP hook
                return fn(*args, **kwargs)
            self._depth += 1
            sync(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.syncbn += time.perf_counter() - start
                self._depth -= 1
        return call


def _rank(rank: int, world: int, port: int, cfg_dict: dict, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    cfg = config.from_dict(cfg_dict)
    ctx = dist.init(cfg.train.device)
    device = ctx.device
    nets = build_nets(cfg, ctx)
    step = make_step(nets, cfg, ctx)
    gen = torch.Generator(device=device).manual_seed(rank)
    shape = (cfg.train.batch_size, cfg.model.channels, cfg.model.resolution, cfg.model.resolution)
    real = torch.rand(shape, device=device, generator=gen).mul_(2).sub_(1)
    z = torch.randn(cfg.train.batch_size, cfg.model.nz, device=device, generator=gen)

    def timed(n: int) -> float:
        dist.barrier()
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            step(real, z)
        sync(device)
        return time.perf_counter() - start

    timed(args.warmup)
    seconds = timed(args.steps)

    clock = CollectiveClock(device)
    if world > 1:
        for net in (nets.G, nets.D):
            net.register_comm_hook(None, clock.ddp_hook)
    clock.patch_syncbn_calls()
    timed(args.steps)
    out = torch.tensor([seconds, clock.ddp, clock.syncbn], dtype=torch.float64)
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.MAX)  # the slowest rank sets the pace
    if rank == 0:
        results.put(out.tolist())
    torch_dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(cfg, world: int, args) -> dict:
    """ms/step, images/sec over all ranks and collective ms/step for one (workers, sync_bn) setting."""
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(world, _free_port(), config.to_dict(cfg), args, results), nprocs=world,
                       start_method="spawn")
    seconds, ddp, syncbn = results.get()
    step_s = seconds / args.steps
    return {"ms": 1e3 * step_s, "img_s": world * cfg.train.batch_size / step_s,
            "ddp_ms": 1e3 * ddp / args.steps, "syncbn_ms": 1e3 * syncbn / args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a YAML config (default: the MNIST 32x32 one)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--workers", default="1,2", help="worker counts to compare, e.g. 1,2 or 1,2,4,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker on the CPU")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.batch_size=64")
    args = parser.parse_args()
    cfg = config.load_or_exit(args.config, args.overrides + [f"train.device={args.device}"])
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    workers = [int(w) for w in args.workers.split(",")]
    if on_gpu and max(workers) > torch.cuda.device_count():
        raise SystemExit(f"--workers {args.workers}: this machine has {torch.cuda.device_count()} GPUs")

    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores, {args.threads} thread(s)"
    print(f"# {platform.node()}: {device}{'' if on_gpu else ' per worker)'}, torch {torch.__version__}, "
          f"{'NCCL' if on_gpu else 'gloo'}; {cfg.model.resolution}px x{cfg.model.channels}, ngf {cfg.model.ngf}, "
          f"ndf {cfg.model.ndf}, per-rank batch {cfg.train.batch_size}, {args.steps} timed steps\n")
    print("| workers | sync_bn | ms/step | img/s (all ranks) | vs 1 worker | DDP all-reduce ms/step "
          "| SyncBN collectives ms/step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = None
    for world in workers:
        for sync_bn in ((False,) if world == 1 else (False, True)):
            cfg.trainer.sync_bn = sync_bn
            row = measure(cfg, world, args)
            base = base or row["img_s"]
            print(f"| {world} | {'on' if sync_bn else 'off'} | {row['ms']:.1f} | {row['img_s']:,.0f} "
                  f"| {row['img_s'] / base:.2f}x | {row['ddp_ms']:.2f} | {row['syncbn_ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
