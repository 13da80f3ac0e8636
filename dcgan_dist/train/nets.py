"""G and D with their optimizers on the device, and the step function that wraps them (compile, DDP, CUDA graph)."""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import models
from ..config import Config
from ..distributed import syncbn
from ..distributed.context import Context
from . import ema as ema_mod
from . import perf
from .step import CudaGraphStep, gan_step


@dataclass
class Nets:
    """G, D, their optimizers and the step's precision. G and D are always the plain modules (what checkpoints,
    samples and evaluation use); the step runs G_wrapped and D_wrapped, which make_step sets (compile, DDP) and
    which share their parameters."""
    G: nn.Module
    D: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    prec: perf.Precision
    resolved: perf.Resolved  # the perf settings in use, every "auto" decided
    ema: ema_mod.EMA | None = None  # G_ema (None when train.ema_images is 0)
    G_wrapped: nn.Module | None = None  # set by make_step
    D_wrapped: nn.Module | None = None

    @property
    def graphed(self) -> bool:
        """Whether the step is one captured CUDA graph."""
        return self.resolved.cuda_graph


def resolve_perf(cfg: Config, device: torch.device) -> perf.Resolved:
    """cfg.perf with every "auto" decided for this device (its bf16 support, the CPU's bf16 instructions)."""
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    return perf.resolve(cfg.perf, device.type, bf16_supported=bf16,
                        cpu_bf16=perf.cpu_bf16_units() if device.type == "cpu" else None)


def build_nets(cfg: Config, ctx: Context, resolved: perf.Resolved | None = None) -> Nets:
    """The paper's G and D on the device (same initial weights on every rank) with their Adam optimizers, set up
    as `resolved` says (default: resolve_perf for ctx.device)."""
    device = ctx.device
    torch.manual_seed(cfg.train.seed)
    resolved = resolved or resolve_perf(cfg, device)
    fmt = perf.memory_format(resolved.channels_last)
    G, D = (m.to(device, memory_format=fmt) for m in models.build(cfg.model))
    if cfg.trainer.sync_bn and ctx.distributed:  # before the optimizers: conversion makes new BN parameters
        G, D = syncbn.convert(G), syncbn.convert(D)
    graphed = resolved.cuda_graph  # a graph-captured step wants optimizers whose state lives on the device
    betas = (cfg.train.beta1, cfg.train.beta2)
    opt_g = perf.adam(G.parameters(), cfg.train.lr_g, betas, resolved.fused_adam, capturable=graphed)
    opt_d = perf.adam(D.parameters(), cfg.train.lr_d, betas, resolved.fused_adam, capturable=graphed)
    ema = ema_mod.build(G, cfg, cfg.train.batch_size * ctx.world_size, fmt)
    return Nets(G, D, opt_g, opt_d, perf.precision(resolved.amp, device, cuda_graph=graphed), resolved, ema)


def _no_forward_buffer_sync() -> dict:
    """DDP's switch for no buffer broadcast before each forward: forward_sync_buffers=False where torch has it (it
    deprecates broadcast_buffers in 2.14 and, like it, still syncs once at construction, when every rank holds the
    same buffers anyway), broadcast_buffers=False on older torch."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def make_step(nets: Nets, cfg: Config, ctx: Context) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Wrap G and D (torch.compile, then DDP) into nets.G_wrapped and nets.D_wrapped and return step(real, z) ->
    statistics, graphed if configured. After any restore: DDP starts from rank 0's weights, and a captured graph
    holds the optimizers' state tensors as they are then."""
    torch.backends.cudnn.benchmark = ctx.device.type == "cuda"  # shapes never change: pick the fastest kernels
    G, D = perf.compiled(nets.G, cfg.perf.compile), perf.compiled(nets.D, cfg.perf.compile)
    side = torch.cuda.Stream() if nets.graphed else None  # whole-step capture wants DDP built on its stream
    if ctx.distributed:
        # No buffer broadcast in forward: D runs twice before its backward (see step.py); with synchronised BN
        # the running statistics are identical on every rank anyway. Small buckets let the all-reduce of
        # these small models overlap their backward.
        device = ctx.device
        ddp = dict(device_ids=[device.index] if device.type == "cuda" else None, **_no_forward_buffer_sync(),
                   bucket_cap_mb=cfg.perf.ddp_bucket_mb, gradient_as_bucket_view=True)
        with torch.cuda.stream(side) if side is not None else nullcontext():
            G, D = DDP(G, **ddp), DDP(D, **ddp)
        hook = perf.comm_hook(cfg.perf.grad_compression)
        if hook is not None:  # before the first backward, as DDP requires
            G.register_comm_hook(None, hook)
            D.register_comm_hook(None, hook)
    nets.G_wrapped, nets.D_wrapped = G, D
    if nets.graphed:
        return CudaGraphStep(G, D, nets.opt_g, nets.opt_d, nets.prec, side, ema=nets.ema)
    return lambda real, z: gan_step(G, D, nets.opt_g, nets.opt_d, real, z, nets.prec, nets.ema)
