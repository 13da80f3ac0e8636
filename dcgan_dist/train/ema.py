"""G_ema: an exponential moving average of G's weights, the generator users sample from.

StyleGAN2-ADA's rule, in images rather than steps so that it means the same at any batch or world size: after
every G step, G_ema = beta * G_ema + (1 - beta) * G with beta = 0.5 ** (global batch / half-life), so an old
weight's share halves every `train.ema_images` images (default global batch x 10/32 thousand, theirs). Early on
the half-life is at most `train.ema_rampup` x images seen: at the start G_ema is G, and G's random
initialisation is forgotten as fast as training moves.

The update is a few foreach kernels over device tensors, its weight included, so it runs inside the whole-step
CUDA graph with no host read (tests/test_host_reads.py counts them); the host computes beta and writes it into its
device tensor before each step, so every replay of the graph uses that step's beta. Under
DDP every rank averages its own G, which the all-reduced step keeps identical on every rank, so every rank holds
the same G_ema without a collective. G_ema never feeds back into training: runs with and without it train the
same G and D.

Batchnorm: an average of weights has no running statistics of its own. train.ema_bn picks "copy" (G's running
statistics, copied after every update, as StyleGAN copies buffers) or "recompute" (standing statistics from
G_ema's own samples before every use, as StudioGAN does: models.standing_statistics). docs/evaluate.md has the
measurement behind the default.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import models
from ..config import Config


def half_life(cfg: Config, global_batch: int) -> int:
    """train.ema_images, or StyleGAN2-ADA's default for this global batch (0: no G_ema)."""
    if cfg.train.ema_images is not None:
        return int(cfg.train.ema_images)
    return round(global_batch * 10 / 32 * 1000)


def beta_at(images_seen: int, global_batch: int, half: int, rampup: float | None) -> float:
    """The averaging weight of the old G_ema in the update that follows `images_seen` images."""
    if rampup is not None:
        half = min(half, images_seen * rampup)
    return 0.5 ** (global_batch / max(half, 1e-8))


class EMA:
    """G_ema beside G; call prepare(images_seen) on the host before each step, update() after G's step."""

    def __init__(self, G: nn.Module, cfg: Config, global_batch: int, fmt: torch.memory_format):
        self.cfg, self.global_batch = cfg, global_batch
        self.half_life = half_life(cfg, global_batch)
        device = next(G.parameters()).device
        # A plain Generator, whatever G's batchnorm class: standing statistics run it in train mode on one rank,
        # which a synchronised batchnorm would turn into a collective the other ranks never join.
        self.module = models.Generator(cfg.model).to(device, memory_format=fmt).eval().requires_grad_(False)
        self.module.load_state_dict(G.state_dict())
        self._pairs = (list(self.module.parameters()), list(G.parameters()))
        self._buffers = ([b for b in self.module.buffers() if b.is_floating_point()],
                         [b for b in G.buffers() if b.is_floating_point()])
        self.weight = torch.zeros((), device=device)  # 1 - beta, the share of G in this update

    def prepare(self, images_seen: int) -> None:
        """Set this step's weight; fill_ with a host number is a kernel launch, not a synchronisation."""
        beta = beta_at(images_seen, self.global_batch, self.half_life, self.cfg.train.ema_rampup)
        self.weight.fill_(1.0 - beta)

    @torch.no_grad()
    def update(self) -> None:
        """G_ema += w * (G - G_ema), w read on the device: no host read, so a CUDA graph replays each step's w."""
        # Not _foreach_lerp_(ema, G, weight): it has no tensor-weight overload (List, Scalar, ScalarList only), so
        # a 0-dim tensor becomes a Python number through .item(), a host sync every step that a graph capture
        # refuses. _foreach_mul_'s Tensor overload is the one capturable Adam relies on for the same reason.
        ema, params = self._pairs
        delta = torch._foreach_sub(params, ema)
        torch._foreach_mul_(delta, self.weight)
        torch._foreach_add_(ema, delta)
        torch._foreach_copy_(*self._buffers)  # "recompute" replaces them at each use: see for_sampling

    def for_sampling(self) -> nn.Module:
        """G_ema as it is sampled from and saved: with standing statistics under ema_bn=recompute."""
        return for_sampling(self.module, self.cfg)


def for_sampling(g_ema: nn.Module, cfg: Config) -> nn.Module:
    """g_ema with the batchnorm statistics train.ema_bn asks for (a copy with standing statistics, or itself)."""
    if cfg.train.ema_bn == "copy":
        return g_ema
    return models.standing_statistics(g_ema, cfg.model, batch_size=cfg.train.batch_size, seed=cfg.train.seed + 2)


def build(G: nn.Module, cfg: Config, global_batch: int, fmt: torch.memory_format) -> EMA | None:
    """G_ema for G (its base module, before compile and DDP wrappers), or None when train.ema_images is 0."""
    return EMA(G, cfg, global_batch, fmt) if half_life(cfg, global_batch) > 0 else None
