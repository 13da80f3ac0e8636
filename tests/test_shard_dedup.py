"""Duplicate removal: exact copies by their pixels, and near-duplicates by the paper's semantic autoencoder hash."""

from __future__ import annotations

import json

import numpy as np

from dcgan_dist.data.manifest import file_sha256
from dcgan_dist.shard import run as shard
from dcgan_dist.shard.options import Options

import shard_data


def _duplicates(outdir):
    rows = (outdir / shard.DUPLICATES).read_text().splitlines()
    assert rows[0] == "removed\tkept"
    return dict(row.split("\t") for row in rows[1:])


def test_exact_dedup_removes_same_pixels_in_any_file_format_and_keeps_near_copies(tmp_path):
    images = shard_data.distinct_images(10)
    src = tmp_path / "in"
    (src / "copies").mkdir(parents=True)
    for k, arr in enumerate(images):
        (src / f"a{k}.png").write_bytes(shard_data.encode(arr, "PNG"))
    (src / "copies" / "a3.bmp").write_bytes(shard_data.encode(images[3], "BMP"))
    (src / "copies" / "a5.png").write_bytes((src / "a5.png").read_bytes())
    brighter = np.clip(images[7].astype(int) + 10, 0, 255).astype(np.uint8)
    (src / "copies" / "a7-brighter.png").write_bytes(shard_data.encode(brighter, "PNG"))

    manifest = shard.run(str(src), tmp_path / "out", Options(dedup="exact"), progress=False)
    assert _duplicates(tmp_path / "out") == {"copies/a3.bmp": "a3.png", "copies/a5.png": "a5.png"}
    assert manifest["total"] == 11 and manifest["counts"]["duplicates"] == 2
    assert manifest["duplicates_file"] == shard.DUPLICATES


def _near_copies(arr: np.ndarray) -> dict[str, np.ndarray]:
    h, w = arr.shape[:2]
    dy, dx = max(1, round(h / 100)), max(1, round(w / 100))
    return {
        "reencoded": shard_data.decode(shard_data.encode(arr, "JPEG", quality=60)),
        "shifted": arr[dy:, dx:],  # moved by 1% of the image
        "recoloured": np.clip(arr * np.array([1.12, 1.0, 0.9]) + 8, 0, 255).astype(np.uint8),
    }


def test_semantic_dedup_catches_planted_near_duplicates_and_keeps_distinct_images(tmp_path):
    distinct = shard_data.distinct_images(60, side=160)
    src = tmp_path / "in"
    src.mkdir()
    planted = {}
    for k, arr in enumerate(distinct):
        (src / f"a{k:03d}.jpg").write_bytes(shard_data.encode(arr, "JPEG", quality=95))
    for k in range(0, len(distinct), 5):
        for name, copy in _near_copies(distinct[k]).items():
            (src / f"b{k:03d}-{name}.png").write_bytes(shard_data.encode(copy, "PNG"))
            planted[f"b{k:03d}-{name}.png"] = f"a{k:03d}.jpg"

    opts = Options(dedup="semantic", shard_size=25)
    manifest = shard.run(str(src), tmp_path / "out", opts, progress=False)
    assert _duplicates(tmp_path / "out") == planted  # every copy caught, paired with its original
    assert manifest["total"] == len(distinct)  # no distinct image lost
    assert manifest["dedup_hasher"] == {"file": shard.HASHER, "sha256": file_sha256(tmp_path / "out" / shard.HASHER)}

    # the fitted hash, and so every byte, is the same on a second run, with any number of workers
    shard.run(str(src), tmp_path / "again", opts, workers=2, progress=False)
    assert shard_data.output_files(tmp_path / "again") == shard_data.output_files(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["options"]["dedup_radius"] == 2
