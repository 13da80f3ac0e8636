"""Duplicate removal for the shard tool: exact (a hash of the decoded pixels) and semantic (the paper's method).

Semantic: a 3072-128-3072 denoising autoencoder with a dropout-regularised ReLU code layer is fitted on 32x32
centre crops of the data set; its code, binarised per unit at the unit's median activation, is a 128-bit hash.
Near-duplicates get codes a few bits apart, distinct images tens of bits apart. Lookup stays linear: a code is split
into radius + 1 bands and any two codes within `radius` bits share one band exactly (pigeonhole), so only codes
sharing a band are compared, and at most _BUCKET_CAP of them per band value.
"""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np

from ..data import images as imageops

THUMB = 32
CODE_BITS = 128
_FIT_BATCH = 64
_FIT_EPOCHS = 10
_FIT_MIN_STEPS = 300  # small sets get extra passes: fewer steps leave codes that do not separate images
_INPUT_NOISE = 1.0  # std of the Gaussian corruption, in units of the standardised pixels
_CODE_DROPOUT = 0.2
# ReLU codes are sparse, so a band that is all zeros is common; comparing against every code in such a bucket
# would make the search quadratic. A bucket that full says little, and its first codes stand for it.
_BUCKET_CAP = 256


def exact_key(arr: np.ndarray) -> bytes:
    """128-bit hash of an image's pixels and shape."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(arr.shape, np.int64).tobytes())
    digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.digest()


def thumb(arr: np.ndarray) -> np.ndarray:
    """The autoencoder's input: a 32x32 RGB centre crop, uint8 (32, 32, 3)."""
    small = imageops.centre_square(arr, THUMB)
    return np.repeat(small, 3, axis=2) if small.shape[2] == 1 else small


def _standardise(thumbs: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) uint8 -> (N, 3072) float64, each channel of each image to zero mean and unit spread.

    Per-image standardisation makes brightness, contrast and colour-cast changes invisible to the hash; the +8
    keeps flat images from amplifying their noise.
    """
    x = thumbs.reshape(len(thumbs), -1, 3).astype(np.float64)
    x = (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 8.0)
    return x.reshape(len(thumbs), -1)


class Hasher:
    """The fitted encoder half: code = relu(x W + b) > threshold, per unit."""

    def __init__(self, params: np.ndarray):
        if params.shape != (THUMB * THUMB * 3 + 2, CODE_BITS):
            raise ValueError(f"semantic hash parameters have shape {params.shape}")
        self.params = params
        self.weight, self.bias, self.threshold = params[:-2], params[-2], params[-1]

    def codes(self, thumbs: np.ndarray) -> list[bytes]:
        """16-byte codes of (N, 32, 32, 3) thumbs; rows are encoded one by one so batching never changes a bit."""
        x = _standardise(thumbs)
        return [np.packbits(np.maximum(row @ self.weight + self.bias, 0) > self.threshold).tobytes() for row in x]

    def to_bytes(self) -> bytes:
        """The parameters as a .npy file (deterministic bytes, unlike .npz)."""
        buf = io.BytesIO()
        np.save(buf, self.params, allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Hasher":
        """Read what to_bytes wrote."""
        return cls(np.load(io.BytesIO(data), allow_pickle=False))


def fit(thumbs: np.ndarray, seed: int = 0) -> Hasher:
    """Fit the denoising autoencoder on (N, 32, 32, 3) thumbs; the same thumbs and seed give the same Hasher."""
    import torch

    x_all = torch.from_numpy(_standardise(thumbs).astype(np.float32))
    steps = max(_FIT_MIN_STEPS, math.ceil(_FIT_EPOCHS * len(x_all) / _FIT_BATCH))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same summation order, so the same weights on every run
    try:
        gen = torch.Generator().manual_seed(seed)
        encoder, decoder = torch.nn.Linear(x_all.shape[1], CODE_BITS), torch.nn.Linear(CODE_BITS, x_all.shape[1])
        for layer in (encoder, decoder):  # initialised from gen, not the global RNG, so callers cannot perturb it
            bound = 1 / math.sqrt(layer.in_features)
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.zero_()
        opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
        for _ in range(steps):
            x = x_all[torch.randint(len(x_all), (_FIT_BATCH,), generator=gen)]
            noisy = x + _INPUT_NOISE * torch.randn(x.shape, generator=gen)
            keep = (torch.rand(_FIT_BATCH, CODE_BITS, generator=gen) >= _CODE_DROPOUT) / (1 - _CODE_DROPOUT)
            code = torch.relu(encoder(noisy)) * keep
            loss = torch.mean((decoder(code) - x) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    weight = encoder.weight.detach().double().numpy().T
    bias = encoder.bias.detach().double().numpy()
    activations = np.maximum(_standardise(thumbs) @ weight + bias, 0)
    return Hasher(np.vstack([weight, bias, np.median(activations, axis=0)]))


class Index:
    """Keys seen so far; add() tells whether a key is within `radius` bits of one already kept."""

    def __init__(self, radius: int = 0, bits: int = CODE_BITS):
        self.radius = radius
        cuts = np.linspace(0, bits, radius + 2).round().astype(int)
        self.bands = [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in zip(cuts[:-1], cuts[1:])]
        self.exact: dict[bytes, str] = {}
        self.tables: list[dict[int, list[tuple[int, str]]]] = [{} for _ in self.bands]

    def add(self, key: bytes, sample_id: str) -> str | None:
        """The id of the kept sample that key duplicates, or None after keeping key as new."""
        if key in self.exact:
            return self.exact[key]
        value = int.from_bytes(key, "big")
        if self.radius:
            buckets = [table.setdefault((value >> shift) & mask, []) for (shift, mask), table in
                       zip(self.bands, self.tables)]
            for bucket in buckets:
                for other, other_id in bucket:
                    if (value ^ other).bit_count() <= self.radius:
                        return other_id
            for bucket in buckets:
                if len(bucket) < _BUCKET_CAP:
                    bucket.append((value, sample_id))
        self.exact[key] = sample_id
        return None
