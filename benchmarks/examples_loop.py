"""The baseline: pytorch/examples' dcgan training loop, written inline with the same G and D architecture.

As in that script: D ends in a Sigmoid and is trained with BCELoss; real and fake losses get separate backward
calls; D's weight gradients are computed during G's update too; three `.item()` host synchronisations per step;
float batches normalised on the host and copied to the device; plain (foreach) Adam in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from dcgan_dist import models


class Baseline:
    """One training step of the examples loop, on a given device."""

    def __init__(self, model_cfg, device, lr=2e-4, beta1=0.5):
        torch.manual_seed(0)
        self.G, d = models.build(model_cfg)
        self.G.to(device)
        self.D = nn.Sequential(d, nn.Sigmoid()).to(device)
        self.criterion = nn.BCELoss()
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=lr, betas=(beta1, 0.999))
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=lr, betas=(beta1, 0.999))
        self.nz, self.device = model_cfg.nz, device

    def step(self, host_batch: torch.Tensor) -> tuple[float, float, float, float, float]:
        real = host_batch.to(self.device)
        b = real.size(0)
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        self.D.zero_grad()
        label = torch.full((b,), 1.0, device=self.device)
        output = self.D(real).view(-1)
        err_d_real = self.criterion(output, label)
        err_d_real.backward()
        d_x = output.mean().item()
        noise = torch.randn(b, self.nz, 1, 1, device=self.device)
        fake = self.G(noise)
        label.fill_(0.0)
        output = self.D(fake.detach()).view(-1)
        err_d_fake = self.criterion(output, label)
        err_d_fake.backward()
        d_g_z1 = output.mean().item()
        err_d = err_d_real + err_d_fake
        self.opt_d.step()
        # (2) Update G network: maximize log(D(G(z)))
        self.G.zero_grad()
        label.fill_(1.0)
        output = self.D(fake).view(-1)
        err_g = self.criterion(output, label)
        err_g.backward()
        d_g_z2 = output.mean().item()
        self.opt_g.step()
        return err_d.item(), err_g.item(), d_x, d_g_z1, d_g_z2
