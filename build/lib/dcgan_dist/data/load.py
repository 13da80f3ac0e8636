"""Whole shard sets in memory, in shard order: the real images (and labels) that evaluation compares with."""

from __future__ import annotations

import numpy as np
import torch

from ..pixels import from_uint8
from . import storage
from .images import decode_image, image_field
from .shardset import resolve


def _load(spec: str, resolution: int, channels: int, limit: int | None, labelled: bool,
          ) -> tuple[torch.Tensor, list[int]]:
    images, labels = [], []
    for url in resolve(spec).urls:
        for sample in storage.tar_samples(url):
            if limit is not None and len(images) >= limit:
                break
            where = f"{url}: sample {sample.get('__key__')!r}"
            if labelled and "cls" not in sample:
                raise ValueError(f"{where} has no 'cls' label field")
            try:
                images.append(decode_image(image_field(sample), resolution, channels))
            except Exception as err:
                raise ValueError(f"{where}: {type(err).__name__}: {err}") from None
            if labelled:
                labels.append(int(sample["cls"].decode().strip()))
    if not images:
        raise ValueError(f"shard set {spec!r} holds no images")
    return from_uint8(torch.from_numpy(np.stack(images))), labels


def load_images(spec: str, resolution: int, channels: int, limit: int | None = None) -> torch.Tensor:
    """The images of a shard set, labelled or not, in shard order, as floats in [-1, 1] (N, C, H, W)."""
    return _load(spec, resolution, channels, limit, labelled=False)[0]


def load_labelled(spec: str, resolution: int, channels: int, limit: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of a shard set with a `cls` field, in shard order: (float images in [-1, 1], int64 labels)."""
    x, labels = _load(spec, resolution, channels, limit, labelled=True)
    return x, torch.tensor(labels, dtype=torch.int64)
