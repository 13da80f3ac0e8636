"""Raw-pixel shards end to end: written by the shard tool, verified, trained on, resumed bit-identically."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dcgan_dist import checkpoint, config
from dcgan_dist.data.images import BadImage, decode, decode_image, encode, encode_raw
from dcgan_dist.data.manifest import MANIFEST
from dcgan_dist.data.shardset import resolve
from dcgan_dist.data.stream import ShardStream
from dcgan_dist.shard import writer
from helpers import assert_same_weights
from tiny_run import train_cli


def _cmd(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw") / "mnist_raw"
    r = _cmd("dcgan_dist.shard", "builtin:mnist5k", str(out), "--resolution", "32", "--format", "raw",
             "--shard-size", "500", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def test_raw_samples_are_the_pixels_with_their_shape(raw_shards):
    manifest = json.loads((raw_shards / MANIFEST).read_text())
    assert manifest["total"] == 5000 and manifest["options"]["format"] == "raw"
    # 13 bytes of header + 32 x 32 x 1 pixels per image field
    import tarfile

    with tarfile.open(raw_shards / manifest["shards"][0]["name"]) as tf:
        raws = [m for m in tf if m.name.endswith(".raw")]
        assert all(m.size == 13 + 32 * 32 for m in raws)
        arr = decode(tf.extractfile(raws[0]).read())[0]
    assert arr.shape == (32, 32, 1) and arr.dtype == np.uint8 and 0 < arr.mean() < 255
    assert _cmd("dcgan_dist.shard", "verify", str(raw_shards)).returncode == 0


def test_a_raw_sample_of_the_wrong_size_is_caught(tmp_path):
    good = encode_raw(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(BadImage, match="header says 8 x 8 x 3"):
        decode(good[:-5])
    yy, xx = np.mgrid[0:40, 0:48]
    rgb = np.stack([yy * 6, xx * 5, (yy + xx) * 3], -1).astype(np.uint8)  # smooth, as photographs are
    # Mixed sets decode sample by sample: raw and JPEG of the same picture agree up to JPEG's loss.
    a = decode_image(encode(rgb, "raw", 95), 32, 3)
    b = decode_image(encode(rgb, "jpg", 100), 32, 3)
    assert a.shape == b.shape == (32, 32, 3) and np.abs(a.astype(int) - b.astype(int)).mean() < 6


def _batches(shards, n):
    cfg = config.load(None, [f"data.shards={shards}", "data.builtin=null", "model.resolution=32",
                             "model.channels=3", "train.batch_size=16", "data.loader_workers=0",
                             "data.shuffle_buffer=50"])
    it = iter(ShardStream(resolve(cfg.data.shards), cfg, 0, 1))
    return [next(it) for _ in range(n)]


def test_raw_pixels_enter_batches_exactly_as_decoded_images(tmp_path):
    """Raw samples at the batch's shape are copied into it as bytes, every other sample is decoded: the same
    pictures as lossless PNG give the same batches, skips included. Among them raw samples of another size
    (centre-cropped and resized) and of one channel (converted), and a truncated one of each format."""
    rng = np.random.default_rng(3)
    pictures = [rng.integers(0, 256, (32, 32, 3), np.uint8) for _ in range(90)]
    pictures += [rng.integers(0, 256, (40, 48, 3), np.uint8), rng.integers(0, 256, (32, 32, 1), np.uint8)] * 5
    for fmt in ("raw", "png"):
        samples = [(f"{i:04d}", {fmt: encode(p, fmt, 0)}) for i, p in enumerate(pictures)]
        samples[7] = ("0007", {fmt: samples[7][1][fmt][:200]})  # truncated
        (tmp_path / fmt).mkdir()
        infos = [writer.write_shard(tmp_path / fmt / f"s-{k:06d}.tar", samples[k * 50:(k + 1) * 50])
                 for k in range(2)]
        writer.write_manifest(tmp_path / fmt, infos, source="test", options={"format": fmt})
    raw, png = _batches(tmp_path / "raw", 12), _batches(tmp_path / "png", 12)
    assert sum(s for _, s, _ in raw) >= 1  # the truncated samples were met
    for (a, skipped_a, bad_a), (b, skipped_b, bad_b) in zip(raw, png):
        assert torch.equal(a, b) and (skipped_a, bad_a) == (skipped_b, bad_b)


def test_the_loader_reuses_its_heap(raw_shards):
    """data/heap.py: a loader on raw shards seldom touches a fresh page (glibc's thresholds cost about one page
    fault an image at 64 px, 3-4 with its 128 KiB starting ones); a user's own MALLOC_* setting is left alone."""
    probe = (
        "import resource, sys\n"
        "from dcgan_dist import config\n"
        "from dcgan_dist.data import heap\n"
        "from dcgan_dist.data.shardset import resolve\n"
        "from dcgan_dist.data.stream import ShardStream\n"
        f"cfg = config.load(None, ['data.shards={raw_shards}', 'data.builtin=null', 'model.resolution=32', "
        "'model.channels=1', 'train.batch_size=256', 'data.loader_workers=0'])\n"
        "it = iter(ShardStream(resolve(cfg.data.shards), cfg, 0, 1))\n"
        "[next(it) for _ in range(20)]\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "[next(it) for _ in range(60)]\n"
        "print(heap.keep_freed_memory(), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 60 / 256)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    tuned = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    user = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**env, "MALLOC_TRIM_THRESHOLD_": "131072"})
    assert tuned.returncode == 0 and user.returncode == 0, tuned.stderr + user.stderr
    (tuned_on, tuned_faults), (user_on, user_faults) = [r.stdout.split() for r in (tuned, user)]
    assert tuned_on == "True" and user_on == "False"
    # measured here: 0.17 against 1.02 faults an image (32 px greyscale: 1 kB samples, 256 kB batches)
    assert 4 * float(tuned_faults) < float(user_faults), (tuned_faults, user_faults)


def test_training_on_raw_shards_resumes_bit_identically(raw_shards, tmp_path):
    """Raw shards, and bf16 autocast on the CPU (what perf.amp=auto picks on CPUs with native bf16): a run stopped
    and resumed ends with the weights of an uninterrupted one."""
    def train(run, images):  # the tiny run 16 wide, in bf16
        return train_cli(run, raw_shards, "model.ngf=16", "model.ndf=16", "log.every_images=160",
                         "log.checkpoint_every_images=320", "perf.amp=bf16", images=images)

    assert train(tmp_path / "straight", 640).returncode == 0
    first = train(tmp_path / "twice", 320)
    assert first.returncode == 0, first.stderr
    second = train(tmp_path / "twice", 640)
    assert second.returncode == 0 and "resumed from" in second.stdout and "perf: amp bf16" in second.stdout
    a = checkpoint.load(checkpoint.latest(tmp_path / "straight"))
    b = checkpoint.load(checkpoint.latest(tmp_path / "twice"))
    assert a.images == b.images == 640
    assert_same_weights(a, b)
