"""Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019) on the Inception features FID uses.

Each set's manifold is the union of balls around its points, each ball reaching the point's k-th nearest
neighbour in the same set (k = 3, the paper's choice). Precision is the share of generated points inside the
real manifold (are the samples realistic?), recall the share of real points inside the generated manifold (is
the data's variety covered?). FID folds both into one number; these two tell a blurry G from a collapsed one.
"""

from __future__ import annotations

import torch

K = 3


def radii(features: torch.Tensor, k: int = K, chunk: int = 2048) -> torch.Tensor:
    """Distance from every point to its k-th nearest other point of the same set."""
    if len(features) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {len(features)}")
    out = []
    for start in range(0, len(features), chunk):
        d = torch.cdist(features[start:start + chunk], features)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the first is the point itself, at distance 0
    return torch.cat(out)


def inside(points: torch.Tensor, centres: torch.Tensor, centre_radii: torch.Tensor, chunk: int = 2048
           ) -> torch.Tensor:
    """For each point: whether it lies in at least one ball (centre, radius)."""
    found = []
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start:start + chunk], centres)
        found.append((d <= centre_radii[None, :]).any(1))
    return torch.cat(found)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = K) -> tuple[float, float]:
    """(precision, recall) of generated features against real features, both (N, D), in float64."""
    real, fake = real.double(), fake.double()
    precision = inside(fake, real, radii(real, k)).double().mean()
    recall = inside(real, fake, radii(fake, k)).double().mean()
    return float(precision), float(recall)
