"""Shard sets read front to back for evaluation, in shard order: whole in memory (with labels), or in batches."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..pixels import from_uint8
from . import storage
from .images import decode_image, image_field
from .shardset import resolve


def _samples(spec: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, dict]]:
    """(url, sample) for samples start .. stop - 1 of a shard set. No shard after stop is opened, nor, where the
    counts are known, one that ends before start."""
    shards = resolve(spec)
    seen = 0  # samples in the shards before this one
    for url, count in zip(shards.urls, shards.counts or [None] * len(shards.urls)):
        if stop is not None and seen >= stop:
            return
        if count is not None and seen + count <= start:
            seen += count
            continue
        for sample in storage.tar_samples(url):
            if seen >= start:
                yield url, sample
            seen += 1
            if stop is not None and seen >= stop:  # before reading a sample more
                return


def _decoded(url: str, sample: dict, resolution: int, channels: int) -> np.ndarray:
    try:
        return decode_image(image_field(sample), resolution, channels)
    except Exception as err:
        raise ValueError(f"{url}: sample {sample.get('__key__')!r}: {type(err).__name__}: {err}") from None


def _load(spec: str, resolution: int, channels: int, limit: int | None, labelled: bool,
          ) -> tuple[torch.Tensor, list[int]]:
    images, labels = [], []
    for url, sample in _samples(spec, 0, limit):
        if labelled and "cls" not in sample:
            raise ValueError(f"{url}: sample {sample.get('__key__')!r} has no 'cls' label field")
        images.append(_decoded(url, sample, resolution, channels))
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


def image_batches(spec: str, resolution: int, channels: int, batch_size: int, start: int = 0,
                  stop: int | None = None) -> Iterator[torch.Tensor]:
    """Images start .. stop - 1 of a shard set as float batches in [-1, 1], each decoded only when asked for."""
    batch = []
    for url, sample in _samples(spec, start, stop):
        batch.append(_decoded(url, sample, resolution, channels))
        if len(batch) == batch_size:
            yield from_uint8(torch.from_numpy(np.stack(batch)))
            batch = []
    if batch:
        yield from_uint8(torch.from_numpy(np.stack(batch)))


def count(spec: str, limit: int | None = None) -> int:
    """Images in a shard set, at most limit: from the manifest or tar headers, else by reading the shards."""
    size = resolve(spec).size
    if size is None:  # remote shards without a manifest: read through them, decoding nothing
        size = sum(1 for _ in _samples(spec, 0, limit))
    return size if limit is None else min(size, limit)
