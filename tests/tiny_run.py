"""The trainer's command line on a tiny model (8-wide G and D, batch 16, a checkpoint every 64 images), for the
tests that must run what the user types; overrides appended after these win."""

from __future__ import annotations

import subprocess
import sys


# The tiny model and its logging, for a command line of one's own (overrides after these win).
TINY = ("data.builtin=null", "model.ngf=8", "model.ndf=8", "train.batch_size=16", "log.every_images=32",
        "log.sample_every_images=100000")


def train_cli(run_dir, shards, *extra: str, images: int = 64, timeout: float = 300,
              env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dcgan_dist.train", "--run-dir", str(run_dir), f"data.shards={shards}", *TINY,
         f"train.images={images}", "log.checkpoint_every_images=64", *extra],
        capture_output=True, text=True, timeout=timeout, env=env)
