"""DCGAN generator and discriminator as Radford, Metz and Chintala (ICLR 2016) specify them.

The rules of section 3: no pooling (strided convolutions down, transposed convolutions up), batchnorm everywhere
except G's output and D's input, no fully connected hidden layers, ReLU + Tanh in G, LeakyReLU(0.2) in D.
G's first layer projects z to a 4x4 stack of feature maps; a 4x4 transposed convolution of a 1x1 input is exactly
that matrix multiply. D's last layer is a 4x4 valid convolution to one unit: the flattened 4x4 maps times a weight
vector. D returns the logit; the sigmoid lives in the loss (BCE-with-logits is the numerically safe form).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from .config import ModelConfig


def _num_doublings(resolution: int) -> int:
    """How often the size doubles between 4x4 and resolution: G's upsamplings, and D's downsamplings."""
    return int(math.log2(resolution // 4))


def _up(cin: int, cout: int, kernel: int) -> nn.ConvTranspose2d:
    # Both forms double the size: k4 s2 p1, or the paper's k5 s2 p2 with one extra row/column of output.
    if kernel == 4:
        return nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False)
    return nn.ConvTranspose2d(cin, cout, 5, 2, 2, output_padding=1, bias=False)


def _down(cin: int, cout: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, 2, (kernel - 1) // 2, bias=False)


class Generator(nn.Module):
    """z (N, nz) or (N, nz, 1, 1) -> images (N, channels, resolution, resolution) in [-1, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = _num_doublings(cfg.resolution)
        widths = [cfg.ngf * 2 ** i for i in reversed(range(n))]  # e.g. 512, 256, 128, 64 at 64x64
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(cfg.nz, widths[0], 4, 1, 0, bias=False),  # the projection of z to 4x4
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        ]
        for cin, cout in zip(widths, widths[1:]):
            layers += [_up(cin, cout, cfg.kernel), nn.BatchNorm2d(cout), nn.ReLU(True)]
        layers += [_up(widths[-1], cfg.channels, cfg.kernel), nn.Tanh()]  # no BN at the output
        self.main = nn.Sequential(*layers)
        self.nz = cfg.nz

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    """images (N, channels, resolution, resolution) -> logits (N,)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = _num_doublings(cfg.resolution)
        widths = [cfg.ndf * 2 ** i for i in range(n)]  # e.g. 64, 128, 256, 512 at 64x64
        layers: list[nn.Module] = [_down(cfg.channels, widths[0], cfg.kernel), nn.LeakyReLU(0.2, True)]  # no BN
        for cin, cout in zip(widths, widths[1:]):
            layers += [_down(cin, cout, cfg.kernel), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False)]  # 4x4 maps -> one logit
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).flatten()


def init_weights(module: nn.Module) -> None:
    """The paper's initialisation: conv weights N(0, 0.02); batchnorm scale N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build(cfg: ModelConfig) -> tuple[Generator, Discriminator]:
    """G and D for this config, initialised as in the paper (draws from torch's global RNG)."""
    g, d = Generator(cfg), Discriminator(cfg)
    g.apply(init_weights)
    d.apply(init_weights)
    return g, d


def sample_z(n: int, cfg: ModelConfig, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """n latent vectors from the configured prior."""
    if cfg.z_prior == "uniform":
        return torch.rand(n, cfg.nz, device=device, generator=generator).mul_(2).sub_(1)
    return torch.randn(n, cfg.nz, device=device, generator=generator)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def base_module(module: nn.Module, keep_compiled: bool = False) -> nn.Module:
    """The network under a DDP wrapper and, unless keep_compiled, under torch.compile's: the one saved."""
    module = getattr(module, "module", module)
    return module if keep_compiled else getattr(module, "_orig_mod", module)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Sample with running batchnorm statistics, then restore the module's mode: no side effect on training."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def generate_images(g: nn.Module, z: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """G(z) for latent vectors z, in batches on G's device; the images come back on the CPU."""
    device = next(g.parameters()).device
    return torch.cat([g(z[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(z), batch_size)])


def generate(g: nn.Module, cfg: ModelConfig, n: int, seed: int = 0, batch_size: int = 500) -> torch.Tensor:
    """n samples in [-1, 1] on the CPU, from latent draws fixed by seed."""
    return generate_images(g, sample_z(n, cfg, generator=torch.Generator().manual_seed(seed)), batch_size)


@torch.no_grad()
def with_batch_statistics(module: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """A copy of module in eval mode whose batchnorm running statistics are the cumulative average of the batch
    statistics of these input batches (the module itself is untouched)."""
    module = copy.deepcopy(module)
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all batches
    module.train()
    device = next(module.parameters()).device
    for x in batches:
        module(x.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return module.eval()


def standing_statistics(g: nn.Module, cfg: ModelConfig, batches: int = 32, batch_size: int = 64,
                        seed: int = 0) -> nn.Module:
    """A copy of g in eval mode whose batchnorm running statistics are recomputed from its own samples.

    An average of weights (G_ema) has no running statistics of its own: G's belong to G's weights. "Standing
    statistics" (BigGAN, StudioGAN) are the cumulative average of batch statistics over `batches` generated
    batches of the training batch size, from latent draws fixed by seed: a pure function of g's weights.
    """
    gen = torch.Generator().manual_seed(seed)
    return with_batch_statistics(g, (sample_z(batch_size, cfg, generator=gen) for _ in range(batches)))
