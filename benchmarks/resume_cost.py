"""What a resume costs: time to the first batch when a run restarts in the middle of a pass, against a fresh start.

The trainer's own loader (make_loader, the configured loader workers) over 64x64 JPEG shards of real photographs.
Rows: a fresh start (pass offset 0); a resume at mid-pass as the trainer does it now (the checkpoint's raw-sample
counts let the loader pass over the prefix without decoding); a resume that decodes and drops the prefix (what
happens without those counts, e.g. an older checkpoint); and one whole pass, the yardstick. Best of --repeats.

    python benchmarks/resume_cost.py [--images 20000] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from gpu_throughput import photo_shards

from dcgan_dist import config
from dcgan_dist.data.shardset import resolve
from dcgan_dist.data.stream import StreamPosition, make_loader, steps_per_pass


def first_batch_seconds(shards, cfg, start_step: int, consumed) -> float:
    position = StreamPosition.at(shards, cfg, 1, start_step, consumed)
    began = time.perf_counter()
    next(iter(make_loader(shards, cfg, 0, 1, pin_memory=False, start=position)))
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="resume-bench-") as tmp:
        shard_dir = photo_shards(Path(tmp) / "photos", args.images, 64)
        cfg = config.load(None, [f"data.shards={shard_dir}", "data.builtin=null", "model.resolution=64",
                                 "model.channels=3", f"data.loader_workers={args.workers}", "train.batch_size=128"])
        shards = resolve(cfg.data.shards)
        spp = steps_per_pass(shards, cfg, 1)
        mid = spp // 2
        # The raw-sample counts the trainer would have recorded by step `mid` (one uninterrupted read).
        position = StreamPosition.at(shards, cfg, 1)
        loader = iter(make_loader(shards, cfg, 0, 1, pin_memory=False))
        start = time.perf_counter()
        for step in range(spp):
            _, corrupt, _ = next(loader)
            if step < mid:
                position.took(corrupt)
        pass_seconds = time.perf_counter() - start
        del loader
        rows = {"fresh start (pass offset 0)": (0, None),
                f"resume at step {mid} of {spp}, prefix passed over undecoded": (mid, position.consumed),
                f"resume at step {mid} of {spp}, prefix decoded and dropped": (mid, None)}
        best = {name: float("inf") for name in rows}
        for _ in range(args.repeats):
            for name, (step, consumed) in rows.items():
                best[name] = min(best[name], first_batch_seconds(shards, cfg, step, consumed))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.images} 64x64 JPEGs, batch 128, {args.workers} loader workers, best of {args.repeats}\n")
    print("| start | seconds to the first batch | share of one pass |\n| --- | --- | --- |")
    for name, sec in best.items():
        print(f"| {name} | {sec:.2f} | {100 * sec / pass_seconds:.1f}% |")
    print(f"| one whole pass ({spp} steps, yardstick) | {pass_seconds:.2f} | 100% |")
    resumed = best[list(rows)[1]] - best[list(rows)[0]]
    print(f"\nextra cost of a mid-pass resume over a fresh start: {resumed:.2f} s = "
          f"{100 * resumed / pass_seconds:.1f}% of a pass (goal < 10%)")


if __name__ == "__main__":
    main()
