"""--faces: OpenCV's Haar cascade on a real photograph, one square crop per face, the box in the sample's json."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from dcgan_dist.data import images as imageops
from dcgan_dist.shard import run as shard
from dcgan_dist.shard.cli import main as shard_main
from dcgan_dist.shard.options import Options

import shard_data


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The astronaut portrait and two photographs without a face."""
    src = tmp_path_factory.mktemp("faces")
    (src / "astronaut.png").write_bytes(shard_data.encode(skimage.data.astronaut(), "PNG"))
    (src / "coffee.jpg").write_bytes(shard_data.encode(skimage.data.coffee(), "JPEG"))
    (src / "camera.png").write_bytes(shard_data.encode(skimage.data.camera(), "PNG"))
    return src


def test_finds_the_astronauts_face_and_crops_it_with_a_margin(tmp_path, photos):
    manifest = shard.run(str(photos), tmp_path / "out", Options(faces=True, format="png"), progress=False)
    assert manifest["total"] == 1 and manifest["counts"]["no_face"] == 2

    [sample] = shard_data.read_shards(tmp_path / "out")
    meta = sample["meta"]
    assert meta["source_id"] == "astronaut.png" and meta["face"] == 0 and meta["orig_size"] == [512, 512]
    x, y, w, h = meta["box"]
    assert 150 < x + w / 2 < 250 and 80 < y + h / 2 < 150 and 64 <= w <= 160  # her face, not her suit or the flag
    left, top, side = meta["crop"]
    assert side == round(w * 1.5)  # 25% margin each side
    assert left <= x and top <= y and left + side >= x + w and top + side >= y + h

    out = shard_data.decode(sample["png"])
    expected = imageops.centre_square(skimage.data.astronaut()[top:top + side, left:left + side], 64)
    assert out.shape == (64, 64, 3) and np.abs(out.astype(int) - expected).max() == 0


def test_keep_size_crops_at_native_resolution_and_min_face_filters(tmp_path, photos, capsys):
    shard.run(str(photos), tmp_path / "keep", Options(faces=True, keep_size=True, face_margin=0.0), progress=False)
    [sample] = shard_data.read_shards(tmp_path / "keep")
    side = sample["meta"]["crop"][2]
    assert side == max(sample["meta"]["box"][2:]) and shard_data.decode(sample["jpg"]).shape == (side, side, 3)

    assert shard_main([str(photos), str(tmp_path / "none"), "--faces", "--min-face", "200", "--quiet"]) == 1
    assert "3 had no face" in capsys.readouterr().err
