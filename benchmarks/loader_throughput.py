"""Loader images/sec per core for raw-pixel, JPEG (q95) and PNG shards at 64 px, from local disk, in one run.

The trainer's own pipeline (ShardStream: tar parsing, shuffle buffer, decode, batches of 128): first in this
process (one core), then through the DataLoader with one worker per core. Also bytes per image and what that
means for LSUN's 3,033,042 bedrooms. Shards are written by the project's writer from crops of real photographs.

    python benchmarks/loader_throughput.py [--images 10000] [--batches 60]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from gpu_throughput import photo_crops

from dcgan_dist import config
from dcgan_dist.data.images import encode
from dcgan_dist.data.shardset import resolve
from dcgan_dist.data.stream import ShardStream, make_loader
from dcgan_dist.shard import writer

LSUN_BEDROOMS = 3_033_042
FORMATS = {"raw": ("raw", 0), "jpeg q95": ("jpg", 95), "png": ("png", 0)}


def write_set(outdir: Path, images: list[np.ndarray], fmt: str, quality: int, per_shard: int = 1000) -> int:
    outdir.mkdir(parents=True)
    infos = []
    for k in range(0, len(images), per_shard):
        samples = [(f"{i:08d}", {fmt: encode(images[i], fmt, quality)}) for i in range(k, min(k + per_shard,
                                                                                                len(images)))]
        infos.append(writer.write_shard(outdir / writer.shard_name("bench", k // per_shard), samples))
    writer.write_manifest(outdir, infos, source="loader benchmark", options={"format": fmt})
    return sum(i.bytes for i in infos)


def rate(batches, n: int, batch: int) -> float:
    """Images/sec over n batches after 8 batches of warm-up (start-up, shuffle buffer)."""
    it = iter(batches)
    for _ in range(8):
        next(it)
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batches", type=int, default=60)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    images = photo_crops(args.images, 64, ("astronaut", "coffee", "chelsea", "rocket"))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        for name, (fmt, quality) in FORMATS.items():
            size = write_set(Path(tmp) / fmt, images, fmt, quality)
            overrides = [f"data.shards={Path(tmp) / fmt}", "data.builtin=null", "model.resolution=64",
                         "model.channels=3", "train.batch_size=128"]
            one = config.load(None, [*overrides, "data.num_workers=0"])
            shards = resolve(one.data.shards)
            per_core = rate(ShardStream(shards, one, 0, 1), args.batches, 128)
            many = config.load(None, [*overrides, f"data.num_workers={cores}"])
            all_cores = rate(make_loader(shards, many, 0, 1, 0, pin_memory=False), args.batches, 128)
            rows[name] = (per_core, all_cores, size / args.images)
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores, Python "
          f"{platform.python_version()}; {args.images} 64x64 crops of photographs, batches of 128\n")
    print(f"| format | images/s, 1 core | images/s, {cores} loader workers | bytes per image | LSUN bedrooms "
          f"(3.03 M) |\n| --- | --- | --- | --- | --- |")
    for name, (one, many, per_image) in rows.items():
        print(f"| {name} | {one:,.0f} | {many:,.0f} | {per_image:,.0f} | {per_image * LSUN_BEDROOMS / 1e9:.1f} GB |")
    raw, jpeg = rows["raw"][0], rows["jpeg q95"][0]
    print(f"\ncores per GPU at 55k images/s (the whole-step graph on an H200): raw {55000 / raw:.1f}, JPEG "
          f"{55000 / jpeg:.1f}, PNG {55000 / rows['png'][0]:.1f}")
    print(f"raw vs jpeg per loader core: {raw / jpeg:.2f}x")


if __name__ == "__main__":
    main()
