"""Data-parallel scaling: images/sec with 1 and 2 workers at a fixed per-rank batch, the time and bytes each step
spends in collectives (DDP's gradient all-reduce, with and without perf.grad_compression, and synchronised
batchnorm's statistics) on the device that is here, and what they imply for 8, 16 and 64 GPUs.

    python benchmarks/scaling.py [--config FILE] [--device auto] [--workers 1,2] [--steps 20] [key=value ...]
    python benchmarks/scaling.py --models standard,lsun_bedroom_64,faces_64,standard_128 --batch 8 --sync-bn off

Each row runs in fresh processes joined in a process group, as Ray Train starts its workers (gloo on the CPU, NCCL
on GPUs, one GPU per worker), and times the step train() runs (build_nets + make_step: SyncBN
conversion, DDP) on random batches, so data loading is left out. The baseline is the 1-worker row of the same run.
On the CPU each worker gets --threads threads (Ray's default trainer.cpus_per_worker=1 gives it one).

Collective times come from a second, instrumented pass: DDP's all-reduces through a comm hook (from launch to
completion, summed over buckets; they overlap the backward, so this bounds what they can cost), SyncBN's through
the torch.distributed calls it makes (blocking). On CUDA both are measured with device synchronisation. The bytes
are those one rank hands to the all-reduce per step (its gradient buckets, in the compressed dtype if any).

The projection (docs/cluster.md explains it) prices a ring all-reduce of those bytes over N GPUs: each rank sends
and receives 2(N-1)/N of them, so t_ar = 2(N-1)/N x bytes / link bandwidth. The compute time per step is measured
here on a GPU; on the CPU it is the H200 reference (--ref-step-ms for the standard model at batch 128, bf16 and
the whole-step graph) scaled by each model's FLOPs per image, i.e. the same MFU. Efficiency is compute over
compute plus the all-reduce time left over: none hidden (the bound) and up to the backward's 2/3 of the step hidden
(DDP launches each bucket's all-reduce during the backward).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from dcgan_dist import config
from dcgan_dist import models
from dcgan_dist.distributed import context as dist
from dcgan_dist.train import perf
from dcgan_dist.train.nets import build_nets, make_step

from train_step import MODELS, STANDARD_MODEL, model_overrides, our_step_fn

GPUS, LINKS_GBIT = (8, 16, 64), (100, 400)

_SYNCBN_CALLS = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CollectiveClock:
    """Seconds spent in DDP's bucket all-reduces and in the torch.distributed calls SyncBN makes."""

    def __init__(self, device: torch.device, compression: str = "none"):
        self.device, self.ddp, self.syncbn, self.bytes, self._depth = device, 0.0, 0.0, 0, 0
        self.inner = perf.comm_hook(compression) or default_hooks.allreduce_hook  # what make_step would register
        self.itemsize = {"none": 4, "bf16": 2, "fp16": 2}[compression]

    def ddp_hook(self, state, bucket):
        sync(self.device)
        start = time.perf_counter()
        self.bytes += bucket.buffer().numel() * self.itemsize
        self._depth += 1  # the hook's own all_reduce is DDP's, not SyncBN's
        try:
            fut = self.inner(state, bucket)
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

    # The instrumented pass: the same nets again, but DDP takes one comm hook only, so the clock's hook is the one
    # registered and it calls the compression hook (or DDP's plain all-reduce) itself.
    clock = CollectiveClock(device, cfg.perf.grad_compression)
    cfg.perf.grad_compression = "none"
    nets = build_nets(cfg, ctx)
    step = make_step(nets, cfg, ctx)
    if ctx.distributed:  # always here (the spawned ranks look launched): DDP even at world size 1, as Ray's is
        for net in (nets.G_wrapped, nets.D_wrapped):
            net.register_comm_hook(None, clock.ddp_hook)
    timed(args.warmup)
    clock.bytes = 0
    clock.patch_syncbn_calls()
    timed(args.steps)
    out = torch.tensor([seconds, clock.ddp, clock.syncbn, clock.bytes], dtype=torch.float64)
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
    seconds, ddp, syncbn, sent = results.get()
    step_s = seconds / args.steps
    return {"ms": 1e3 * step_s, "img_s": world * cfg.train.batch_size / step_s,
            "ddp_ms": 1e3 * ddp / args.steps, "syncbn_ms": 1e3 * syncbn / args.steps, "bytes": sent / args.steps}


def flops_per_image(cfg) -> float:
    """Model FLOPs of one training step per image (FlopCounterMode on a real step of this config, on the CPU)."""
    small = config.from_dict(config.to_dict(cfg))
    small.train.batch_size, small.train.device, small.perf.amp, small.trainer.sync_bn = 2, "cpu", "fp32", False
    step = our_step_fn(small, torch.device("cpu"))
    step(0)
    return perf.flops_per_image(lambda: step(1), 2)


def ring_ms(grad_bytes: float, gpus: int, gbit_s: float) -> float:
    """Ring all-reduce time: each rank sends (and receives) 2(N-1)/N of the buffer over its link."""
    return 1e3 * 2 * (gpus - 1) / gpus * grad_bytes / (gbit_s * 1e9 / 8)


def efficiency(compute_ms: float, ar_ms: float) -> tuple[float, float]:
    """(nothing overlapped, the all-reduce hidden behind the backward's 2/3 of the step as far as it goes)."""
    return compute_ms / (compute_ms + ar_ms), compute_ms / (compute_ms + max(0.0, ar_ms - 2 / 3 * compute_ms))


def project(rows: list[dict], args) -> None:
    """The efficiency table for 8/16/64 GPUs over 100/400 Gb/s links, from the measured bytes per step."""
    standard_flops = next((r["flops"] for r in rows if r["model"] == "standard"), None) \
        or flops_per_image(config.load(None, STANDARD_MODEL))
    print(f"\n## Projection: ring all-reduce of the measured bytes, per-rank batch {args.ref_batch}\n")
    if args.ref_from_gpu:
        print("compute ms/step: measured here at world size 1.\n")
    else:
        print(f"compute ms/step: the standard model's {args.ref_step_ms:.2f} ms (H200, bf16 + whole-step graph, "
              f"batch {args.ref_batch}, torch 2.11 at commit 3ee149d, before G_ema; {standard_flops / 1e9:.2f} GFLOP per image), scaled by each model's FLOPs "
              "per image (the same MFU).\n")
    head = " | ".join(f"{n} GPUs @ {g} Gb/s" for n in GPUS for g in LINKS_GBIT)
    print(f"| model | compression | MB/step | compute ms | {head} |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in GPUS for _ in LINKS_GBIT) + " |")
    for r in rows:
        if not r["bytes"]:
            continue
        if args.ref_from_gpu:
            compute = r["ms1"] * args.ref_batch / r["batch"]
        else:
            compute = args.ref_step_ms * r["flops"] / standard_flops
        cells = []
        for n in GPUS:
            for g in LINKS_GBIT:
                ar = ring_ms(r["bytes"], n, g)
                low, high = efficiency(compute, ar)
                cells.append(f"{ar:.2f} ms: {100 * low:.0f}-{100 * high:.0f}%")
        print(f"| {r['model']} | {r['compression']} | {r['bytes'] / 1e6:.1f} | {compute:.2f} | "
              + " | ".join(cells) + " |")
    print("\ncell: all-reduce ms per step, then efficiency with none of it hidden - with up to 2/3 of the step "
          "hidden.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a YAML config (default: the MNIST 32x32 one)")
    parser.add_argument("--models", default=None,
                        help=f"named models instead of --config, comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--workers", default="1,2", help="worker counts to compare, e.g. 1,2 or 1,2,4,8")
    parser.add_argument("--compression", default="none,bf16", help="perf.grad_compression values to compare")
    parser.add_argument("--sync-bn", default="both", choices=("both", "on", "off"),
                        help="synchronised batchnorm on multi-worker rows")
    parser.add_argument("--batch", type=int, default=None, help="per-rank batch (default: the config's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker on the CPU")
    parser.add_argument("--ref-step-ms", type=float, default=1e3 * 128 / 50_100,
                        help="projection compute time of the standard model per step on a GPU (H200: 50.1k "
                             "img/s at batch 128, torch 2.11 at commit 3ee149d, before G_ema)")
    parser.add_argument("--ref-batch", type=int, default=128, help="per-rank batch the projection assumes")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.batch_size=64")
    args = parser.parse_args()
    extra = args.overrides + [f"train.device={args.device}"]
    extra += [f"train.batch_size={args.batch}"] if args.batch else []
    if args.models:
        unknown = [m for m in args.models.split(",") if m not in MODELS]
        if unknown:
            raise SystemExit(f"--models: {', '.join(unknown)} unknown; choose from {', '.join(MODELS)}")
        cfgs = {m: config.load_or_exit(None, STANDARD_MODEL + model_overrides(m) + extra) for m in args.models.split(",")}
    else:
        cfgs = {Path(args.config).stem if args.config else "mnist_local": config.load_or_exit(args.config, extra)}
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    workers = [int(w) for w in args.workers.split(",")]
    compressions = args.compression.split(",")
    sync_modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.sync_bn]
    if on_gpu and max(workers) > torch.cuda.device_count():
        raise SystemExit(f"--workers {args.workers}: this machine has {torch.cuda.device_count()} GPUs")
    args.ref_from_gpu = on_gpu and 1 in workers

    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores, {args.threads} thread(s)"
    print(f"# {platform.node()}: {device}{'' if on_gpu else ' per worker)'}, torch {torch.__version__}, "
          f"{'NCCL' if on_gpu else 'gloo'}; {args.steps} timed steps\n")
    print("| model | params G + D | workers | sync_bn | compression | ms/step | img/s (all ranks) | vs 1 worker "
          "| all-reduce MB/step/rank | DDP all-reduce ms/step | SyncBN collectives ms/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for name, cfg in cfgs.items():
        g, d = models.build(cfg.model)
        params = f"{models.num_params(g) / 1e6:.2f}M + {models.num_params(d) / 1e6:.2f}M"
        flops = flops_per_image(cfg)
        base = ms1 = None
        for world in workers:
            for sync_bn in ((False,) if world == 1 else sync_modes):
                for compression in compressions:
                    cfg.trainer.sync_bn, cfg.perf.grad_compression = sync_bn, compression
                    row = measure(cfg, world, args)
                    base, ms1 = base or row["img_s"], ms1 or row["ms"]
                    rows.append({**row, "model": name, "compression": compression, "flops": flops, "ms1": ms1,
                                 "batch": cfg.train.batch_size})
                    mb = f"{row['bytes'] / 1e6:.2f}" if row["bytes"] else "-"
                    print(f"| {name} | {params} | {world} | {'on' if sync_bn else 'off'} | {compression} "
                          f"| {row['ms']:.1f} | {row['img_s']:,.0f} | {row['img_s'] / base:.2f}x | {mb} "
                          f"| {row['ddp_ms']:.2f} | {row['syncbn_ms']:.2f} |", flush=True)
    unique = {(r["model"], r["compression"]): r for r in rows if r["bytes"]}  # the widest group's bytes
    if unique:
        project(list(unique.values()), args)


if __name__ == "__main__":
    main()
