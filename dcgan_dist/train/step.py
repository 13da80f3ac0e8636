"""One DCGAN training step, written as the two phases of the paper's algorithm.

D and G may be DistributedDataParallel wrappers. D runs twice (real, then fake) before its one backward, so D's
DDP wrapper must not broadcast buffers before each forward (forward_sync_buffers=False, broadcast_buffers=False
before torch 2.14: a second forward would otherwise overwrite batchnorm buffers in place that autograd still needs,
PyTorch issue 22095). In the G phase, D is called through its inner
module with its parameters frozen: no D weight gradients are computed and no DDP reduction is started for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import base_module
from .perf import Precision

STAT_NAMES = ("loss/D", "loss/G", "D(x)", "D(G(z))/D_phase", "D(G(z))/G_phase")


def gan_step(G: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
             real: torch.Tensor, z: torch.Tensor, prec: Precision | None = None, ema=None) -> torch.Tensor:
    """Update D, then G, then G_ema (an ema.EMA, if given); return the step's statistics (STAT_NAMES order) as a
    detached tensor on the device."""
    prec = prec or Precision(None, real.device.type)
    ones = torch.ones(real.shape[0], device=real.device)
    zeros = torch.zeros(real.shape[0], device=real.device)

    # (1) Update D: maximise log D(x) + log(1 - D(G(z))), real and fake as separate batchnorm batches.
    with prec.autocast():
        fake = G(z)
        d_real = D(real).float()
        d_fake = D(fake.detach()).float()
    loss_d = F.binary_cross_entropy_with_logits(d_real, ones) + F.binary_cross_entropy_with_logits(d_fake, zeros)
    opt_d.zero_grad(set_to_none=True)
    prec.backward_and_step(loss_d, opt_d, "D")

    # (2) Update G: the non-saturating loss, maximise log D(G(z)).
    d_inner = base_module(D, keep_compiled=True)  # D's own forward, outside DDP, still compiled
    d_inner.requires_grad_(False)
    with prec.autocast():
        d_fake_g = d_inner(fake).float()
    loss_g = F.binary_cross_entropy_with_logits(d_fake_g, ones)
    opt_g.zero_grad(set_to_none=True)
    prec.backward_and_step(loss_g, opt_g, "G")
    d_inner.requires_grad_(True)
    if ema is not None:
        ema.update()  # device tensors only, beta included: part of the graph when the step is captured

    with torch.no_grad():
        return torch.stack([loss_d, loss_g, torch.sigmoid(d_real).mean(), torch.sigmoid(d_fake).mean(),
                            torch.sigmoid(d_fake_g).mean()]).detach()


class CudaGraphStep:
    """gan_step captured as one CUDA graph: a few eager warm-up steps, then every step is a copy and a replay.

    A 64x64 DCGAN step is hundreds of small kernels, so on a fast GPU launch overhead, not arithmetic, bounds
    it; replaying one graph removes that. The warm-up steps are real training steps, run on a side stream as
    capture requires (DDP also needs them to build its buckets); the capture itself computes nothing, so the
    step at which it happens is then replayed on its own inputs. Optimizers must be capturable.
    """

    def __init__(self, G: nn.Module, D: nn.Module, opt_g, opt_d, prec: Precision, side: torch.cuda.Stream,
                 warmup: int = 11, ema=None):
        self.nets = (G, D, opt_g, opt_d)
        self.ema = ema
        self.prec, self.warmup, self.done = prec, warmup, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side = side  # the stream DDP was built on, as full-step capture requires

    def __call__(self, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.done < self.warmup:
            self.done += 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = gan_step(*self.nets, real, z, self.prec, self.ema)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None:
            self.real, self.z = real.clone(), z.clone()
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the DataLoader's pin-memory thread may allocate pinned memory during the capture.
            with torch.cuda.graph(self.graph, stream=self.side, capture_error_mode="thread_local"):
                self.out = gan_step(*self.nets, self.real, self.z, self.prec, self.ema)
        else:
            self.real.copy_(real)
            self.z.copy_(z)
        self.graph.replay()
        return self.out.clone()
