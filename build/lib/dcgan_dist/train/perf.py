"""Speed options for the training step: mixed precision, channels_last, torch.compile, fused Adam, FLOP counts.

Every option is a config key (the `perf` section) with a default that is right on both the CPU and a GPU.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

# Dense bf16 tensor-core peaks (FLOP/s) of the chips we report MFU against; nanoGPT's estimate_mfu idea.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


@dataclass
class Precision:
    """Autocast dtype (None: fp32) and, for fp16, one gradient scaler per optimizer."""
    dtype: torch.dtype | None
    device_type: str
    scaler_d: torch.amp.GradScaler | None = None
    scaler_g: torch.amp.GradScaler | None = None
    cache: bool = True  # autocast's cache of cast weights; must be off inside a CUDA graph capture

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=self.cache)

    def backward_and_step(self, loss: torch.Tensor, opt: torch.optim.Optimizer, which: str) -> None:
        scaler = self.scaler_d if which == "D" else self.scaler_g
        if scaler is None:
            loss.backward()
            opt.step()
            return
        scaler.scale(loss).backward()
        scaler.step(opt)  # fused Adam takes the scale and inf flag on the device: no host sync
        scaler.update()


def precision(amp: str, device: torch.device, cuda_graph: bool = False) -> Precision:
    """perf.amp -> Precision: 'auto' is bf16 on CUDA and fp32 on the CPU."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if amp == "fp32":
        return Precision(None, device.type)
    if amp == "bf16":
        return Precision(torch.bfloat16, device.type, cache=not cuda_graph)
    if cuda_graph:
        raise ValueError("perf.cuda_graph=true works with perf.amp fp32 or bf16, not fp16 (its scaler syncs)")
    if amp == "fp16":
        return Precision(torch.float16, device.type, torch.amp.GradScaler(device.type),
                         torch.amp.GradScaler(device.type))
    raise ValueError(f"perf.amp: {amp!r} is not auto, fp32, bf16 or fp16")


def adam(params, lr: float, betas: tuple[float, float], device: torch.device, fused: bool | None,
         capturable: bool = False) -> torch.optim.Adam:
    """Adam, fused into one kernel where perf.fused_adam says so (by default on CUDA)."""
    use_fused = device.type == "cuda" if fused is None else fused
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=use_fused or None, capturable=capturable)


def cuda_graph_enabled(setting: bool | None, device: torch.device) -> bool:
    """perf.cuda_graph: null means on for a CUDA device, off elsewhere; true on the CPU is an error."""
    if setting and device.type != "cuda":
        raise ValueError("perf.cuda_graph=true needs a CUDA device")
    return device.type == "cuda" if setting is None else setting


def compiled(module: nn.Module, mode: str) -> nn.Module:
    """torch.compile per perf.compile (before any DDP wrapper); 'none' returns the module itself."""
    if mode == "none":
        return module
    return torch.compile(module, mode=None if mode == "default" else mode)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def flops_per_image(step_fn, batch: int) -> float:
    """FLOPs of one training step per image, counted by PyTorch's FlopCounterMode on a real step."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step_fn()
    return counter.get_total_flops() / batch


def peak_flops(device: torch.device) -> float | None:
    """The chip's dense bf16 peak, if it is one we know."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
