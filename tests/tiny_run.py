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


# The runs that are stopped, resumed and compared bit for bit with an uninterrupted one (tests/test_train.py,
# tests/test_survival.py): the tiny model 16 wide, on the CPU, with two loader workers, every checkpoint kept; each
# test names its own checkpoint interval.
EXACT_RESUME = (*TINY, "model.ngf=16", "model.ndf=16", "data.loader_workers=2", "data.shuffle_buffer=200",
                "train.device=cpu", "log.every_images=160", "log.keep_checkpoints=100")


def exact_resume_command(run_dir, shards, images: int, *extra: str) -> list[str]:
    """The trainer's command line on EXACT_RESUME, to start as a test needs (Popen, a terminal, torchrun: all but
    the first three words); overrides in extra win."""
    return [sys.executable, "-m", "dcgan_dist.train", "--run-dir", str(run_dir), f"data.shards={shards}",
            *EXACT_RESUME, f"train.images={images}", *extra]
