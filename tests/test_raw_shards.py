"""Raw-pixel shards end to end: written by the shard tool, verified, trained on, resumed bit-identically."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dcgan_dist import checkpoint
from dcgan_dist.data.images import BadImage, decode, decode_image, encode, encode_raw
from dcgan_dist.data.manifest import MANIFEST


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


def test_training_on_raw_shards_resumes_bit_identically(raw_shards, tmp_path):
    """Raw shards, and bf16 autocast on the CPU (what perf.amp=auto picks on CPUs with native bf16): a run stopped
    and resumed ends with the weights of an uninterrupted one."""
    def train(run, images):
        return _cmd("dcgan_dist.train", "--run-dir", str(run), f"data.shards={raw_shards}", "data.builtin=null",
                    "model.ngf=16", "model.ndf=16", "train.batch_size=16", f"train.images={images}",
                    "log.every_images=160", "log.sample_every_images=100000", "log.checkpoint_every_images=320",
                    "perf.amp=bf16")

    assert train(tmp_path / "straight", 640).returncode == 0
    first = train(tmp_path / "twice", 320)
    assert first.returncode == 0, first.stderr
    second = train(tmp_path / "twice", 640)
    assert second.returncode == 0 and "resumed from" in second.stdout and "perf: amp bf16" in second.stdout
    a = checkpoint.load(checkpoint.latest(tmp_path / "straight"))
    b = checkpoint.load(checkpoint.latest(tmp_path / "twice"))
    assert a["images"] == b["images"] == 640
    for net in ("G", "D"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k}"
