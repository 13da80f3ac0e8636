"""The paper's latent-space experiments: walks through random z points, and arithmetic on exemplar means."""

from __future__ import annotations

import re

import torch


def walk(points: torch.Tensor, frames: int, spherical: bool = False) -> torch.Tensor:
    """`frames` latent vectors evenly spaced along the path through points (P, nz), endpoints included."""
    if len(points) < 2 or frames < 2:
        raise ValueError(f"a walk needs at least 2 points and 2 frames, got {len(points)} and {frames}")
    t = torch.linspace(0, len(points) - 1, frames, dtype=torch.float64)
    seg = t.floor().long().clamp(max=len(points) - 2)
    frac = (t - seg).unsqueeze(1).to(points.dtype)
    a, b = points[seg], points[seg + 1]
    return _slerp(a, b, frac) if spherical else a + frac * (b - a)


def _slerp(a: torch.Tensor, b: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    # Along a great circle, scaled between the two norms: under a Gaussian prior, linear midpoints have atypically
    # small norms and so fall where G saw few training latents.
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    ua, ub = a / na, b / nb
    # A tiny floor on the angle makes the weights tend to the linear ones (1 - frac, frac) for parallel points.
    omega = (ua * ub).sum(1, keepdim=True).clamp(-1, 1).acos().clamp(min=1e-6)
    direction = (((1 - frac) * omega).sin() * ua + (frac * omega).sin() * ub) / omega.sin()
    return direction / direction.norm(dim=1, keepdim=True) * (na + frac * (nb - na))


Term = tuple[int, list[int]]  # (+1 or -1, indices into the sample sheet)


def parse_expression(text: str, sheet_size: int) -> list[Term]:
    """'3,17,22 - 5,9,11 + 1,2,40' -> [(1, [3, 17, 22]), (-1, [5, 9, 11]), (1, [1, 2, 40])]."""
    parts = re.split(r"\s*([+-])\s*", text.strip())
    if parts and parts[0] == "":  # a leading sign
        parts = parts[1:]
    else:
        parts = ["+"] + parts
    terms: list[Term] = []
    for sign, group in zip(parts[0::2], parts[1::2]):
        try:
            indices = [int(s) for s in group.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--expr {text!r}: {group!r} is not a comma-separated list of sheet indices") from None
        if not indices:
            raise ValueError(f"--expr {text!r}: an empty term")
        bad = [i for i in indices if not 0 <= i < sheet_size]
        if bad:
            raise ValueError(f"--expr {text!r}: index {bad[0]} is not on the sample sheet (0..{sheet_size - 1})")
        terms.append((1 if sign == "+" else -1, indices))
    if len(parts) % 2 or not terms:
        raise ValueError(f"--expr {text!r} is not of the form 'i,j,k - l,m,n + o,p,q'")
    return terms


def combine(sheet_z: torch.Tensor, terms: list[Term]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean z of each term's exemplars (T, nz), the signed sum of those means (nz,))."""
    means = torch.stack([sheet_z[idx].mean(0) for _, idx in terms])
    signs = torch.tensor([s for s, _ in terms], dtype=means.dtype).unsqueeze(1)
    return means, (signs * means).sum(0)


def jitter(z: torch.Tensor, n: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """n copies of z with uniform noise in [-scale, scale] added (the paper's variations: scale 0.25)."""
    noise = torch.rand(n, z.shape[-1], generator=generator, dtype=z.dtype).mul_(2 * scale).sub_(scale)
    return z.unsqueeze(0) + noise
