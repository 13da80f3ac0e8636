"""No host read inside the training step, counted on the CPU with the step built as it is built for CUDA.

On CUDA the whole step (both phases, both fused Adam updates, G_ema, the statistics) is captured as one graph, and
any read of a device value by the host (`.item()`, `float(t)`, `bool(t)`, `.tolist()`: aten._local_scalar_dense
underneath) is a device synchronisation per step in eager mode and an error, or a value frozen into the graph, under
capture. Every such read dispatches aten._local_scalar_dense, on the CPU too, so counting that op while the CPU runs
the same op sequence finds the next host read anyone adds to the step, before a GPU ever sees it.
"""

from __future__ import annotations

import dataclasses
import traceback
import warnings
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dcgan_dist import config, models
from dcgan_dist.data.load import load_labelled
from dcgan_dist.distributed.context import Context
from dcgan_dist.train import perf
from dcgan_dist.train.nets import build_nets, make_step
from multirank import free_port


class HostReads(TorchDispatchMode):
    """Counts reads of device values by the host; keeps where each happened for the failure message.

    `.item()`, `float(t)`, `int(t)` and `bool(t)` dispatch aten._local_scalar_dense on any device. `.tolist()`,
    `.numpy()` and `.cpu()` copy to the host on CUDA but are plain memory reads of a CPU tensor that dispatch
    nothing, so those methods are wrapped while the counter is on."""

    COPIES = ("tolist", "numpy", "cpu")

    def __init__(self):
        super().__init__()
        self.where: list[str] = []
        self._saved: dict = {}

    def _seen(self) -> None:
        self.where.append("".join(traceback.format_stack(limit=9)[:-2]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._seen()
        return func(*args, **(kwargs or {}))

    def _wrapped(self, original):
        def method(tensor, *args, **kwargs):
            self._seen()
            return original(tensor, *args, **kwargs)
        return method

    def __enter__(self):
        for name in self.COPIES:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrapped(self._saved[name]))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def cuda_like(cfg) -> perf.Resolved:
    """The settings `perf.*=auto` resolves to on a CUDA device (bf16, channels_last, fused capturable Adam, the
    whole-step graph), as build_nets applies them; the graph itself cannot be made on the CPU."""
    resolved = perf.resolve(cfg.perf, "cuda")
    assert (resolved.amp, resolved.channels_last, resolved.fused_adam, resolved.cuda_graph) == \
        ("bf16", True, True, True), resolved
    return resolved


def _batches(cfg, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` batches of real digits (channels_last, as the loop hands them to a CUDA step) and latents."""
    images, _ = load_labelled(cfg.data.shards, cfg.model.resolution, cfg.model.channels,
                              limit=steps * cfg.train.batch_size)
    z = models.sample_z(steps * cfg.train.batch_size, cfg.model, generator=torch.Generator().manual_seed(3))
    n = cfg.train.batch_size
    return [(images[i * n:(i + 1) * n].contiguous(memory_format=torch.channels_last), z[i * n:(i + 1) * n])
            for i in range(steps)]


def _count_step_reads(cfg, ctx: Context, warmup: int = 2, counted: int = 3) -> HostReads:
    """Build the nets as for CUDA, run `warmup` steps (the graph is captured after eager warm-up steps too, and
    the optimizers make their state in the first), then count host reads over `counted` steps."""
    nets = build_nets(cfg, ctx, cuda_like(cfg))
    assert nets.ema is not None and nets.prec.dtype is torch.bfloat16 and not nets.prec.cache
    for opt in (nets.opt_g, nets.opt_d):
        assert opt.defaults["fused"] and opt.defaults["capturable"]
    step = make_step_eager(nets, cfg, ctx)
    reads = HostReads()
    for i, (real, z) in enumerate(_batches(cfg, warmup + counted)):
        nets.ema.prepare(i * cfg.train.batch_size)  # on the host before the step, as the loop does
        if i < warmup:
            step(real, z)
            continue
        with reads:
            stats = step(real, z)
        assert stats.shape == (5,) and stats.device.type == "cpu"
    return reads


def make_step_eager(nets, cfg, ctx):
    """What CudaGraphStep warms up with and then captures: make_step's wrappers (DDP under a process group), then
    gan_step with the nets' optimizers, precision and G_ema."""
    resolved = nets.resolved  # make_step would build a CudaGraphStep, which needs CUDA
    nets.resolved = dataclasses.replace(resolved, cuda_graph=False)
    eager = make_step(nets, cfg, ctx)
    nets.resolved = resolved
    return eager


@pytest.fixture
def small_cfg(mnist_shards, tmp_path):
    def make(name: str | None, *overrides: str):
        return config.load(name, [f"data.shards={mnist_shards}", "data.builtin=null", "train.batch_size=8",
                                  "model.resolution=32", "model.channels=1", "model.ngf=8", "model.ndf=8",
                                  f"run_dir={tmp_path / 'run'}", *overrides])
    return make


def _fail_message(reads: HostReads) -> str:
    return (f"{len(reads.where)} host read(s) inside the training step as built for CUDA; the first at:\n"
            + (reads.where[0] if reads.where else ""))


@pytest.mark.parametrize("name", [None, "lsun_bedroom_64"])
def test_the_step_as_built_for_cuda_reads_nothing_on_the_host(small_cfg, name):
    """Both phases, both fused capturable Adam updates, G_ema and the statistics: zero host reads, for the
    embedded default and the paper's model (kernel 5, uniform z), G_ema on by default in both."""
    cfg = small_cfg(name)
    reads = _count_step_reads(cfg, Context(0, 1, 0, torch.device("cpu")))
    assert not reads.where, _fail_message(reads)


def test_the_step_under_ddp_and_syncbn_reads_nothing_on_the_host(small_cfg):
    """The same under a process group (gloo, one rank): DDP's wrappers and the synchronised batchnorm, built
    without torch's deprecation warning for broadcast_buffers."""
    import torch.distributed as torch_dist

    cfg = small_cfg(None, "trainer.sync_bn=true")
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            reads = _count_step_reads(cfg, Context(0, 1, 0, torch.device("cpu")))
    finally:
        torch_dist.destroy_process_group()
    assert not reads.where, _fail_message(reads)


def test_the_counter_sees_the_host_reads_it_is_for():
    """The counter itself: each way a host read is written is seen, and G_ema's old update (a tensor weight
    handed to _foreach_lerp_, which has no tensor-weight overload) was one."""
    t = torch.ones(3)
    reads = HostReads()
    with reads:
        t.sum().item()
        float(t[0])
        bool(t[1] > 0)
        t.tolist()
        t.numpy()
        t.cpu()
        torch._foreach_lerp_([torch.zeros(3)], [t], torch.tensor(0.5))
    assert len(reads.where) == 3 + 3 + 1
    with HostReads() as quiet:
        t.add_(1).mul_(torch.tensor(2.0))
    assert not quiet.where


def test_g_ema_update_is_the_lerp_with_a_beta_read_on_the_device(small_cfg):
    """The update matches torch.lerp to float tolerance for the weights it meets (the first update's w = 1 copies
    G), and a new value written into the weight tensor changes the next update (what a graph replay relies on)."""
    cfg = small_cfg(None)
    nets = build_nets(cfg, Context(0, 1, 0, torch.device("cpu")), replace(cuda_like(cfg), channels_last=False))
    ema, G = nets.ema, nets.G
    for w in (1.0, 0.3, 0.9, 0.004):
        with torch.no_grad():
            for p in G.parameters():
                p.add_(torch.randn_like(p))
        before = [p.clone() for p in ema.module.parameters()]
        ema.weight.fill_(w)
        ema.update()
        for old, new, g in zip(before, ema.module.parameters(), G.parameters()):
            torch.testing.assert_close(new, torch.lerp(old, g, w), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA device the GPU tests run instead of skipping")
def test_the_gpu_tests_skip_cleanly_where_there_is_no_cuda():
    """README: `python -m pytest -m gpu -n0 tests/test_gpu.py`, as typed: every GPU test is collected and skipped
    with its reason, and pytest exits 0 (benchmarks/gpu_run.sh runs the same command first)."""
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-n0", "-rs", "tests/test_gpu.py"],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # Every test in the file, counted from it: a GPU test added there is checked to skip too.
    tests = (Path(__file__).resolve().parent / "test_gpu.py").read_text().count("\ndef test_")
    assert r.stdout.count("needs a CUDA device (torch sees none)") == tests and f"{tests} skipped" in r.stdout, \
        r.stdout
