"""Synchronised batchnorm: every rank normalises with the statistics of the global batch.

On CUDA this is PyTorch's nn.SyncBatchNorm. That class refuses CPU tensors, so on the CPU (gloo) AllReduceBatchNorm
does the same job with one collective in the forward and one in the backward. Both keep the parameter and buffer
names of nn.BatchNorm2d, so checkpoints load into plain models.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import context


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    """Broadcast shape of a per-channel vector against x (N, C, ...)."""
    return (1, -1) + (1,) * (x.dim() - 2)


def global_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased variance, count) of x over all ranks' batches.

    Each rank sends its (count, mean, sum of squared deviations) and the shares are merged with Chan's formula,
    M2 = sum M2_r + sum n_r (mean_r - mean)^2: no E[x^2] - E[x]^2 cancellation when the mean is large, and still
    one collective per forward.
    """
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    count = torch.full_like(mean, x.numel() // x.shape[1])
    shares = context.all_gather_stacked(torch.stack([count, mean, var * count]))  # (world, 3, C)
    counts, means, m2s = shares.unbind(1)
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return mean, m2 / total, total


class _GlobalBatchNorm(torch.autograd.Function):
    """y = weight * (x - mean) * invstd + bias, with the backward of statistics taken over all ranks."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, total):
        shape = _shape(x)
        x_hat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(x_hat, weight, invstd, total)
        return x_hat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x_hat, weight, invstd, total = ctx.saved_tensors
        shape = _shape(dy)
        dims = [0] + list(range(2, dy.dim()))
        local = torch.stack([dy.sum(dims), (dy * x_hat).sum(dims)])  # this rank's shares of d(bias), d(weight)
        dx = None
        if ctx.needs_input_grad[0]:
            # The input gradient sees every rank's loss through the shared mean and variance: one all-reduce.
            sum_dy, sum_dy_xhat = context.all_reduce_sum(local.clone()).div_(total).unbind(0)
            dx = (weight * invstd).view(shape) * (dy - sum_dy.view(shape) - x_hat * sum_dy_xhat.view(shape))
        # Parameter gradients stay per rank; DDP averages them like every other parameter.
        return dx, local[1], local[0], None, None, None


class AllReduceBatchNorm(_BatchNorm):
    """Batchnorm over the global batch for CPU/gloo; in eval mode it uses the running statistics as usual."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"AllReduceBatchNorm expects (N, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.running_mean is None):
            return super().forward(x)
        self._check_input_dim(x)
        dtype = x.dtype
        if dtype in (torch.bfloat16, torch.float16):
            # Under autocast the convolutions hand over half precision; like nn.BatchNorm2d, normalise in float32
            # (the statistics and buffers stay float32) and give back the input's dtype.
            return self.forward(x.float()).to(dtype)
        with torch.no_grad():
            mean, var, total = global_moments(x)
            if self.training and self.track_running_stats:
                self.num_batches_tracked.add_(1)
                # The same factor _BatchNorm uses: momentum, or a cumulative average when momentum is None.
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * total / (total - 1), factor)  # unbiased, as BatchNorm keeps it
            invstd = torch.rsqrt(var + self.eps)
        weight = self.weight if self.affine else torch.ones_like(mean)
        bias = self.bias if self.affine else torch.zeros_like(mean)
        return _GlobalBatchNorm.apply(x, weight, bias, mean, invstd, total)


def _to_allreduce(module: nn.Module) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        like = module.weight if module.weight is not None else module.running_mean  # keep device and dtype
        new = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats,
                                 **({"device": like.device, "dtype": like.dtype} if like is not None else {}))
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new
    for name, child in module.named_children():
        setattr(module, name, _to_allreduce(child))
    return module


def convert(module: nn.Module) -> nn.Module:
    """Every batchnorm in module synchronised across ranks: nn.SyncBatchNorm on CUDA, AllReduceBatchNorm elsewhere."""
    on_cuda = any(t.is_cuda for t in module.parameters())
    return nn.SyncBatchNorm.convert_sync_batchnorm(module) if on_cuda else _to_allreduce(module)
