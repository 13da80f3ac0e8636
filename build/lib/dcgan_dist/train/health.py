"""Is the run still a GAN that learns? Non-finite losses or weights, and a discriminator that has won outright.

Both checks read numbers that are on the host anyway (the interval's reduced statistics) or cost one reduction
per checkpoint (the weights), so the step itself stays free of host synchronisation.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class NonFinite(RuntimeError):
    """A loss or a weight went NaN or infinite; the message names the image count and what."""


def check_metrics(metrics: dict[str, float], images: int) -> None:
    """Raise NonFinite when a logged statistic is NaN or infinite."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise NonFinite(f"non-finite training statistics at {images} images: {shown}")


@torch.no_grad()
def nonfinite_parameters(modules: dict[str, nn.Module]) -> list[str]:
    """Names of the networks (G, D) holding a NaN or infinite parameter or buffer (one reduction each)."""
    bad = []
    for name, module in modules.items():
        tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
        if tensors and not bool(torch.stack([t.isfinite().all() for t in tensors]).all()):
            bad.append(name)
    return bad


class CollapseWatch:
    """Says when D wins outright (D(G(z)) near 0 and loss/D near 0) or the losses freeze, for `patience` log
    intervals in a row. It only warns: such runs sometimes recover, and the user decides."""

    def __init__(self, patience: int = 3):
        self.patience = patience
        self.won = self.frozen = 0
        self.last: tuple[float, float] | None = None

    def update(self, metrics: dict[str, float]) -> str | None:
        """A warning the first time a condition has held `patience` intervals, else None."""
        d_wins = metrics["D(G(z))/G_phase"] < 0.01 and metrics["loss/D"] < 0.05
        losses = (metrics["loss/D"], metrics["loss/G"])
        still = self.last is not None and all(abs(a - b) < 1e-7 for a, b in zip(losses, self.last))
        self.last = losses
        self.won = self.won + 1 if d_wins else 0
        self.frozen = self.frozen + 1 if still else 0
        if self.won == self.patience:
            return (f"D has won outright for {self.patience} log intervals (D(G(z)) "
                    f"{metrics['D(G(z))/G_phase']:.2g}, loss/D {metrics['loss/D']:.2g}): G gets no gradient; "
                    f"training may have collapsed (lower train.lr_d, or resume from an earlier checkpoint)")
        if self.frozen == self.patience:
            return f"the losses have not changed for {self.patience} log intervals: training has stalled"
        return None
