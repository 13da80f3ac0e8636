"""Images/sec of our training step against the pytorch/examples dcgan loop: same model, batch and device.

    python benchmarks/train_step.py [--resolution 64] [--batch 128] [--steps 20] [--device auto]

Both sides start from host batches (ours uint8, as our loader delivers them; the baseline normalised floats, as
torchvision's transforms deliver them) and include the host-to-device copy. Ours is what train.py runs per step:
the latent draw, the conversion to [-1, 1], gan_step and the on-device statistics; the baseline is
examples_loop.Baseline. Prints a table; the ratio is ours over the baseline.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from dcgan_dist import config, pixels
from dcgan_dist.distributed import context as dist
from dcgan_dist.train import perf
from dcgan_dist.train.loop import z_for_step
from dcgan_dist.train.nets import build_nets, make_step
from examples_loop import Baseline


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, steps: int, repeats: int = 3) -> float:
    """Median seconds per step over `repeats` timed runs of `steps` steps, after `warmup` untimed steps."""
    for i in range(warmup):
        step(i)
    sync(device)
    runs = []
    for r in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            step(warmup + r * steps + i)
        sync(device)
        runs.append((time.perf_counter() - t0) / steps)
    return sorted(runs)[len(runs) // 2]


def host_batches(cfg, n: int = 4):
    """A few uint8 batches of random pixels and their normalised float twins, pinned when a GPU is used."""
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.train.batch_size, cfg.model.resolution, cfg.model.resolution, cfg.model.channels)
    u8 = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen) for _ in range(n)]  # NHWC, as loaded
    f32 = [x.permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous() for x in u8]
    if torch.cuda.is_available():
        u8, f32 = [x.pin_memory() for x in u8], [x.pin_memory() for x in f32]
    return u8, f32


def our_step_fn(cfg, device):
    """A closure running one of our training steps (as train.py does) on step index i."""
    ctx = dist.Context(0, 1, 0, device)
    nets = build_nets(cfg, ctx)
    step_fn = make_step(nets, cfg, ctx)
    fmt = perf.memory_format(nets.resolved.channels_last)
    u8, _ = host_batches(cfg)
    stats = torch.zeros(5, device=device)

    def step(i):
        real = pixels.from_uint8(u8[i % len(u8)], device).contiguous(memory_format=fmt)
        stats.add_(step_fn(real, z_for_step(cfg, i, 0, real.shape[0], device)))

    return step


def baseline_step_fn(cfg, device):
    base = Baseline(cfg.model, device)
    _, f32 = host_batches(cfg)
    return lambda i: base.step(f32[i % len(f32)])


# The models the benchmarks compare: the pytorch/examples standard one at 64 and 128 px, and the paper's own
# (4x4x1024 projection, 5x5 kernels, uniform z), whose model sections the shipped configs hold.
MODELS = ("standard", "standard_128", "lsun_bedroom_64", "faces_64")
# The standard model (pytorch/examples' dcgan) over the default config: 64 px RGB, widths 64, 4x4 kernels.
STANDARD_MODEL = ["model.resolution=64", "model.channels=3", "model.ngf=64", "model.ndf=64", "model.kernel=4"]


def model_overrides(name: str) -> list[str]:
    """key=value overrides that turn bench_config's standard model into the named one."""
    if name == "standard":
        return []
    if name == "standard_128":
        return ["model.resolution=128"]
    if name in MODELS:
        m = config.load(name).model
        return [f"model.{key}={getattr(m, key)}" for key in ("resolution", "channels", "nz", "ngf", "ndf",
                                                              "kernel", "z_prior")]
    raise SystemExit(f"model {name!r}: choose from {', '.join(MODELS)}")


def bench_config(resolution: int, batch: int, device: str, *overrides: str):
    """The standard model (nz 100, widths 64, kernel 4, RGB) at a resolution and batch. The perf switches start
    off, so that a mode is exactly what its overrides say ("auto" would turn the GPU's fast paths on)."""
    return config.load(None, [*STANDARD_MODEL, f"model.resolution={resolution}", f"train.batch_size={batch}",
                              f"train.device={device}", "perf.channels_last=false", "perf.cuda_graph=false",
                              *overrides])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cfg = bench_config(args.resolution, args.batch, device.type, "perf.amp=fp32")

    rows = []
    for name, make in (("pytorch/examples loop (baseline)", baseline_step_fn), ("dcgan_dist step", our_step_fn)):
        sec = time_steps(make(cfg, device), device, args.warmup, args.steps)
        rows.append((name, sec, args.batch / sec))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; {args.resolution}x{args.resolution}, batch {args.batch}, "
          f"fp32, median of 3 x {args.steps} steps after {args.warmup} warm-up steps\n")
    print("| loop | ms/step | images/sec | ratio |")
    print("| --- | --- | --- | --- |")
    for name, sec, ips in rows:
        print(f"| {name} | {sec * 1e3:.1f} | {ips:.1f} | {ips / rows[0][2]:.2f} |")


if __name__ == "__main__":
    main()
