"""Peak memory of the trainer and the shard tool fed a decompression bomb, with the default limit and lifted.

Real bombs, made once: a 30,000 x 30,000 baseline JPEG (2.7 GB decoded; a few MB on disk) and a 12,000 x 12,000
PNG (432 MB decoded, just under the 179 M pixels where PIL refuses by itself), each in a shard among 64 photo
crops and in a folder beside them. Each command runs as the user types it, in a process of its own; peak RSS is
the largest of its processes (getrusage RUSAGE_CHILDREN). "lifted" raises data.max_image_pixels /
--max-image-pixels to 10^9, which is what every reader did before they had a limit. The baseline row is the same
command on the photos alone.

    python benchmarks/bomb_rss.py [--workdir /tmp/bomb_rss]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import simplejpeg
from gpu_throughput import photo_crops
from PIL import Image

from dcgan_dist.data.images import encode
from dcgan_dist.limits import MAX_IMAGE_PIXELS
from dcgan_dist.shard import writer

LIFTED = 10**9


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def make_inputs(work: Path) -> dict[str, Path]:
    """Folders (photos, photos + JPEG bomb, photos + PNG bomb) and a shard of each; reused when already there."""
    bombs = {"jpeg": work / "bomb.jpg", "png": work / "bomb.png"}
    if not bombs["jpeg"].exists():
        # np.zeros is calloc'd: its pages stay unmapped until written, so encoding 2.7 GB of zeros costs little
        # memory. A bright square keeps the image from being uniform.
        pixels = np.zeros((30000, 30000, 3), np.uint8)
        pixels[14000:16000, 14000:16000] = 200
        bombs["jpeg"].write_bytes(simplejpeg.encode_jpeg(pixels, 85, "RGB", "420"))
        del pixels
    if not bombs["png"].exists():
        Image.new("RGB", (12000, 12000), (200, 30, 30)).save(bombs["png"], compress_level=9)
    photos = [encode(p, "jpg", 90) for p in photo_crops(64, 64)]
    out = {}
    for name, bomb in (("photos", None), ("jpeg bomb", bombs["jpeg"]), ("png bomb", bombs["png"])):
        folder, shards = work / name.replace(" ", "_"), work / (name.replace(" ", "_") + "_shards")
        if not shards.exists():
            folder.mkdir(parents=True)
            samples = [(f"photo{i:03d}", {"jpg": p}) for i, p in enumerate(photos)]
            for key, fields in samples:
                (folder / f"{key}.jpg").write_bytes(fields["jpg"])
            if bomb is not None:
                samples.insert(0, ("bomb", {bomb.suffix[1:]: bomb.read_bytes()}))
                (folder / bomb.name).write_bytes(bomb.read_bytes())
            shards.mkdir()
            writer.write_shard(shards / "set-000000.tar", samples)
        out[name] = folder
        out[name + " shards"] = shards
    return out


def peak_rss(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS in MiB of the command's largest process, seconds, last stderr line), from a fresh parent."""
    probe = ("import resource, subprocess, sys, time; t = time.time(); "
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t, r.returncode); "
             "print((r.stderr.strip().splitlines() or [''])[-1][:150])")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True).stdout
    first, last = out.splitlines()[:2] if out.count("\n") > 1 else (out.strip(), "")
    kib, seconds, status = first.split()
    return int(kib) / 1024, float(seconds), f"exit {status}: {last}" if status != "0" else ""


def trainer(shards: Path, run: Path, limit: int) -> list[str]:
    return [sys.executable, "-m", "dcgan_dist.train", "--run-dir", str(run), f"data.shards={shards}",
            "data.builtin=null", "data.loader_workers=0", "data.shuffle_buffer=8", "model.resolution=32",
            "model.channels=3", "model.ngf=8", "model.ndf=8", "train.batch_size=8", "train.images=64",
            "train.device=cpu", "log.every_images=64", "log.sample_every_images=100000",
            "log.checkpoint_every_images=64", "log.grid_size=4", f"data.max_image_pixels={limit}"]


def shard_tool(folder: Path, out: Path, limit: int) -> list[str]:
    # --keep-size decodes every input at its full size (so does --faces); --workers 1 decodes in the command's
    # own process.
    return [sys.executable, "-m", "dcgan_dist.shard", str(folder), str(out), "--keep-size", "--workers", "1",
            "--quiet", "--max-image-pixels", str(limit)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bomb_rss"))
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs(args.workdir)
    print(f"machine: {_cpu()}, {os.cpu_count()} cores, Python {platform.python_version()}; default limit "
          f"{MAX_IMAGE_PIXELS:,} pixels, lifted {LIFTED:,}")
    print(f"{'command':<34} {'input':<22} {'default: MiB':>13} {'s':>6} {'lifted: MiB':>12} {'s':>6}")
    rows = [("train (data.loader_workers=0)", trainer, "shards"), ("shard --keep-size --workers 1", shard_tool, "")]
    for label, command, suffix in rows:
        for name in ("photos", "jpeg bomb", "png bomb"):
            src = inputs[f"{name} {suffix}".strip()]
            cells, notes = [], []
            for limit in (MAX_IMAGE_PIXELS, LIFTED):
                tag = f"{label.split()[0]}-{name.replace(' ', '_')}-{limit}"
                mib, seconds, note = peak_rss(command(src, args.workdir / "out" / tag / str(time.time_ns()), limit))
                cells += [f"{mib:>12.0f}", f"{seconds:>6.1f}"]
                notes += [note] if note else []
            print(f"{label:<34} {name:<22} " + " ".join(cells) + "".join(f"\n    {n}" for n in notes))


if __name__ == "__main__":
    main()
