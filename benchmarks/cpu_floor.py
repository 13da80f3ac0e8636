"""How fast the embedded default can train on this CPU at best: our step against the CPU's own matrix speed.

    python benchmarks/cpu_floor.py [--steps 10]

Counts the floating-point work of one real training step (torch's FlopCounterMode over the step train.py runs:
D on a real and a fake batch, G through D, forward and backward), times that step, and times a large matrix
multiply, the fastest thing the CPU's BLAS does. At the matrix multiply's speed the default run's 150,000 images
take at least `floor` seconds: no schedule, fusion or thread setting of the step can beat that, only fewer
operations or faster arithmetic (bf16 on CPUs that have it, benchmarks in README). Prints a table per precision.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from train_step import our_step_fn, time_steps

from dcgan_dist import config
from dcgan_dist.train.perf import cpu_bf16_units


def gemm_flops_per_s(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * n ** 3 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    precisions = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if cpu_bf16_units() else [])
    rows = []
    for amp, dtype in precisions:
        cfg = config.load(None, ["train.device=cpu", f"perf.amp={amp}"])
        step = our_step_fn(cfg, torch.device("cpu"))
        step(0)
        with FlopCounterMode(display=False) as counter:
            step(1)
        per_image = counter.get_total_flops() / cfg.train.batch_size
        sec = time_steps(step, torch.device("cpu"), 2, args.steps)
        rows.append((amp, per_image, cfg.train.batch_size / sec, gemm_flops_per_s(dtype), cfg.train.images))
    m = cfg.model
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, native bf16: "
          f"{cpu_bf16_units() or 'none'}; torch {torch.__version__}; the embedded default ({m.resolution}x"
          f"{m.resolution}x{m.channels}, widths {m.ngf}/{m.ndf}, batch {cfg.train.batch_size}), median of 3 x "
          f"{args.steps} steps\n")
    print("| precision | GFLOP an image | our step, images/s | our step, GFLOP/s | matrix multiply, GFLOP/s | "
          "default run at our step | floor at the matrix multiply's speed |\n| --- | --- | --- | --- | --- | "
          "--- | --- |")
    for amp, per_image, ips, gemm, images in rows:
        print(f"| {amp} | {per_image / 1e9:.3f} | {ips:.0f} | {ips * per_image / 1e9:.0f} ({ips * per_image / gemm:.0%}"
              f" of the multiply) | {gemm / 1e9:.0f} | {images / ips:.0f} s | {images * per_image / gemm:.0f} s |")
    amp, per_image, _, gemm, images = rows[-1]
    print(f"\nfloor of the default run on this CPU ({amp}): {images * per_image / gemm:.0f} s")


if __name__ == "__main__":
    main()
