"""Speed options for the training step: mixed precision, channels_last, torch.compile, fused Adam, FLOP counts.

Every option is a config key (the `perf` section) with a default that is right on both the CPU and a GPU.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .. import config as config_mod

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


@dataclass(frozen=True)
class Resolved:
    """The perf settings a run uses, every "auto" decided."""
    amp: str  # fp32, bf16 or fp16
    channels_last: bool
    fused_adam: bool
    cuda_graph: bool
    notes: tuple[str, ...] = ()  # why an auto setting left a fast path off
    grad_compression: str = "none"  # DDP's gradient all-reduce dtype: none (fp32), bf16 or fp16

    def describe(self) -> str:
        on = lambda b: "on" if b else "off"  # noqa: E731
        return (f"perf: amp {self.amp}, channels_last {on(self.channels_last)}, fused_adam {on(self.fused_adam)}, "
                f"cuda_graph {on(self.cuda_graph)}, grad_compression {self.grad_compression}"
                + "".join(f"; {n}" for n in self.notes))


def _switch(key: str, value: str) -> bool | None:
    """perf switch values: auto -> None, true/false (any case, as YAML or the command line give them) -> bool."""
    lowered = str(value).lower()
    if lowered == "auto":
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    raise ValueError(f"perf.{key}: {value!r} is not auto, true or false")


# /proc/cpuinfo flags of bf16 matrix instructions: Intel AMX and AVX512-BF16 (Cooper Lake, Sapphire Rapids on),
# AMD's AVX512-BF16 (Zen 4 on), Arm's BF16 dot products (Graviton 3, Neoverse V1 on; "Features" line).
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def cpu_bf16_units(cpuinfo: str | None = None) -> str | None:
    """The CPU's native bf16 instructions by name (e.g. "avx512_bf16"), or None where it has none or it cannot be
    told (not Linux). Without them bf16 is emulated in fp32 and slower than fp32 itself, so auto keeps fp32."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return next((f for f in _CPU_BF16_FLAGS if f in flags), None)


def resolve(p, device_type: str, bf16_supported: bool = True, cpu_bf16: str | None = None) -> Resolved:
    """The fastest settings that are correct for the device and each other; explicit values always win.

    CUDA: bf16 autocast, channels_last, fused Adam and the whole-step CUDA graph; the graph stays off (with the
    reason noted) under fp16, whose gradient scaler syncs with the host, under a torch.compile mode that
    captures CUDA graphs of its own, and under gradient compression (not yet verified inside a capture). The
    CPU: eager, plain Adam, and bf16 autocast only where the CPU has native bf16 instructions (cpu_bf16, from
    cpu_bf16_units()): measured there 1.3-1.45x faster with the embedded default's digit coverage kept on two
    seeds (README); fp32 everywhere else.
    """
    cuda = device_type == "cuda"
    notes = []
    if p.amp != "auto":
        amp = p.amp
    elif cuda:
        amp = "bf16" if bf16_supported else "fp32"
    else:
        amp = "bf16" if cpu_bf16 else "fp32"
        notes.append(f"amp=auto: bf16, this CPU has {cpu_bf16}" if cpu_bf16 else
                     "amp=auto: fp32, this CPU has no native bf16 instructions")
    channels_last = _switch("channels_last", p.channels_last)
    fused = _switch("fused_adam", p.fused_adam)
    graph = _switch("cuda_graph", p.cuda_graph)
    if graph is None:
        why = None
        if cuda and amp == "fp16":
            why = "fp16's gradient scaler syncs with the host every step"
        elif cuda and p.compile in ("reduce-overhead", "max-autotune"):
            why = f"perf.compile={p.compile} captures CUDA graphs of its own"
        elif cuda and p.grad_compression != "none":
            # DDP's compression hooks are Python futures; whether they replay correctly inside the whole-step
            # capture has not been measured on a GPU yet (benchmarks/gpu_run.sh checks it): opt in explicitly.
            why = (f"perf.grad_compression={p.grad_compression} is not yet verified inside the graph "
                   "(perf.cuda_graph=true tries it)")
        graph = cuda and why is None
        if why:
            notes.append(f"cuda_graph=auto left off: {why}")
    elif graph and not cuda:
        raise ValueError("perf.cuda_graph=true needs a CUDA device")
    elif graph and amp == "fp16":
        raise ValueError("perf.cuda_graph=true works with perf.amp fp32 or bf16, not fp16 (its scaler syncs)")
    return Resolved(amp, cuda if channels_last is None else channels_last, cuda if fused is None else fused,
                    graph, tuple(notes), p.grad_compression)


def comm_hook(compression: str):
    """The DDP communication hook for perf.grad_compression: None (DDP's own fp32 all-reduce) or PyTorch's
    bf16/fp16 compression hook, which casts each gradient bucket, all-reduces it at half the bytes and casts the
    average back (so optimizers and checkpoints stay fp32). The value is config-validated (config.CHOICES)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return {"none": None, "bf16": default_hooks.bf16_compress_hook,
            "fp16": default_hooks.fp16_compress_hook}[compression]


def precision(amp: str, device: torch.device, cuda_graph: bool = False) -> Precision:
    """A resolved perf.amp (fp32, bf16 or fp16) -> Precision."""
    if amp == "fp32":
        return Precision(None, device.type)
    if amp == "bf16":
        return Precision(torch.bfloat16, device.type, cache=not cuda_graph)
    if amp == "fp16":  # resolve() has refused fp16 under the whole-step graph (its scaler syncs)
        return Precision(torch.float16, device.type, torch.amp.GradScaler(device.type),
                         torch.amp.GradScaler(device.type))
    raise ValueError(f"perf.amp: {amp!r} is not a resolved setting (fp32, bf16 or fp16)")


def adam(params, lr: float, betas: tuple[float, float], fused: bool, capturable: bool = False) -> torch.optim.Adam:
    """Adam, fused into one kernel when the resolved perf.fused_adam says so."""
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused or None, capturable=capturable)


def compiled(module: nn.Module, mode: str) -> nn.Module:
    """torch.compile per perf.compile (before any DDP wrapper); 'none' returns the module itself."""
    if mode == "none":
        return module
    return torch.compile(module, mode=None if mode == "default" else mode)


def with_resolved(cfg, resolved: Resolved):
    """A copy of cfg whose perf section holds the resolved values instead of "auto"."""
    out = config_mod.from_dict(config_mod.to_dict(cfg))
    out.perf.amp = resolved.amp
    out.perf.channels_last = str(resolved.channels_last).lower()
    out.perf.fused_adam = str(resolved.fused_adam).lower()
    out.perf.cuda_graph = str(resolved.cuda_graph).lower()
    return out


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
