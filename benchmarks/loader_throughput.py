"""Loader images/sec per core for raw-pixel, JPEG (q95) and PNG shards at 64 px, from local disk, in one run.

The trainer's own pipeline (ShardStream: tar parsing, shuffle buffer, decode, batches of 128): first in this
process (one core), then through the DataLoader with one worker per core. Also bytes per image and what that
means for LSUN's 3,033,042 bedrooms. Shards are written by the project's writer from crops of real photographs.

    python benchmarks/loader_throughput.py [--images 10000] [--batches 60] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
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


def warm(batches):
    """An iterator past its start-up and its shuffle buffer's filling (8 batches)."""
    it = iter(batches)
    for _ in range(8):
        next(it)
    return it


def rate(it, n: int, batch: int) -> float:
    """Images/sec over the next n batches of a warm iterator."""
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5, help="per-core timings per format, interleaved")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    images = photo_crops(args.images, 64, ("astronaut", "coffee", "chelsea", "rocket"))
    rows, streams, sizes, per_round = {}, {}, {}, {name: [] for name in FORMATS}
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        overrides = {name: [f"data.shards={Path(tmp) / fmt}", "data.builtin=null", "model.resolution=64",
                            "model.channels=3", "train.batch_size=128"] for name, (fmt, _) in FORMATS.items()}
        for name, (fmt, quality) in FORMATS.items():
            sizes[name] = write_set(Path(tmp) / fmt, images, fmt, quality)
            one = config.load(None, [*overrides[name], "data.loader_workers=0"])
            streams[name] = warm(ShardStream(resolve(one.data.shards), one, 0, 1))
        # One core: the formats take turns, round after round, so that a machine whose speed drifts (shared
        # hosts do) slows them alike; the table gives each format's median and the ratio the median of the
        # rounds' ratios.
        for _ in range(args.rounds):
            for name in FORMATS:
                per_round[name].append(rate(streams[name], args.batches, 128))
        for name in FORMATS:
            many = config.load(None, [*overrides[name], f"data.loader_workers={cores}"])
            loader = make_loader(resolve(many.data.shards), many, 0, 1, pin_memory=False)
            rows[name] = (statistics.median(per_round[name]), rate(warm(loader), args.batches, 128),
                          sizes[name] / args.images)
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores, Python "
          f"{platform.python_version()}; {args.images} 64x64 crops of photographs, batches of 128; one core: "
          f"median of {args.rounds} interleaved rounds of {args.batches} batches\n")
    print(f"| format | images/s, 1 core | images/s, {cores} loader workers | bytes per image | LSUN bedrooms "
          f"(3.03 M) |\n| --- | --- | --- | --- | --- |")
    for name, (one, many, per_image) in rows.items():
        print(f"| {name} | {one:,.0f} | {many:,.0f} | {per_image:,.0f} | {per_image * LSUN_BEDROOMS / 1e9:.1f} GB |")
    raw, jpeg = rows["raw"][0], rows["jpeg q95"][0]
    ratios = [r / j for r, j in zip(per_round["raw"], per_round["jpeg q95"])]
    print(f"\ncores per GPU at 55k images/s (the whole-step graph on an H200): raw {55000 / raw:.1f}, JPEG "
          f"{55000 / jpeg:.1f}, PNG {55000 / rows['png'][0]:.1f}")
    print(f"rounds' raw/jpeg ratios: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"raw vs jpeg per loader core: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
