"""Evaluation split over ranks: each rank generates and embeds its share of the samples, the features are gathered.

StudioGAN's way: with N ranks, N devices do the work, not rank 0 alone while the others wait. The shares are
contiguous slices of one fixed list of latent draws (or real images), so the gathered features are the same set
at any world size, in the same order. In a single process the share is everything.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..distributed import context


def share(n: int, rank: int, world_size: int) -> slice:
    """Rank's contiguous part of n items: the first n % world_size ranks get one more."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def gather(rows: torch.Tensor, n: int, rank: int, world_size: int, device: torch.device) -> torch.Tensor:
    """Every rank's rows (its share of n), concatenated in rank order on every rank, on the CPU."""
    if world_size == 1:
        return rows
    width = math.ceil(n / world_size)
    padded = torch.zeros((width, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[:len(rows)] = rows.to(device)
    stacked = context.all_gather_stacked(padded).cpu()
    parts = [share(n, r, world_size) for r in range(world_size)]
    return torch.cat([stacked[r, :s.stop - s.start] for r, s in enumerate(parts)])


def embed(items: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], rank: int, world_size: int,
          device: torch.device) -> torch.Tensor:
    """fn over all items, each rank computing its share; the whole result on every rank."""
    part = fn(items[share(len(items), rank, world_size)])
    return gather(part, len(items), rank, world_size, device)
