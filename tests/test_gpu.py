"""The GPU path on a CUDA device: the whole-step graph against the eager step, the paper's model through the CLI
and resumed, torchrun over NCCL with synchronised batchnorm, and a checkpoint moving between GPU and CPU.

`python -m pytest -m gpu -n0 tests/test_gpu.py` (benchmarks/gpu_run.sh runs it first); each test is skipped with its
reason where torch sees no CUDA device. tests/test_host_reads.py pins down on the CPU what can be without one.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan_dist import checkpoint, config, models
from dcgan_dist.distributed.context import Context
from dcgan_dist.train.nets import build_nets, make_step, resolve_perf

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")]

REPO = Path(__file__).resolve().parent.parent
STEPS = 24  # the graph is captured after CudaGraphStep's 11 eager warm-up steps: 13 replays


def _cli(*args: str, timeout: float = 240) -> str:
    """Run a command as users type it (from the repository root); its stdout and stderr."""
    r = subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, f"{' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in module.parameters()])


def _relative(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return float((a - b).norm() / scale.norm())


def test_graphed_step_matches_the_eager_step_and_replays_a_new_g_ema_beta_each_step(mnist_shards, tmp_path):
    """Two identical nets from the same seed, fed the same batches: one through CudaGraphStep (perf.*=auto), one
    eagerly. Each replay's G_ema update uses that step's beta (checked against the lerp computed here), and after
    STEPS steps G, D, G_ema, Adam's moments and every step's statistics agree within bf16 tolerance."""
    cfg = config.load(None, [f"data.shards={mnist_shards}", "data.builtin=null", "train.batch_size=64",
                             "train.device=cuda", f"run_dir={tmp_path}"])
    ctx = Context(0, 1, 0, torch.device("cuda", torch.cuda.current_device()))
    resolved = resolve_perf(cfg, ctx.device)
    assert resolved.cuda_graph and resolved.amp == "bf16" and resolved.fused_adam, resolved.describe()
    graphed, eager = build_nets(cfg, ctx, resolved), build_nets(cfg, ctx, resolved)
    initial = _flat(graphed.G)
    assert torch.equal(initial, _flat(eager.G))
    graph_step = make_step(graphed, cfg, ctx)
    eager.resolved = dataclasses.replace(eager.resolved, cuda_graph=False)  # the same nets, optimizers and
    # precision, stepped without a graph
    eager_step = make_step(eager, cfg, ctx)
    gen = torch.Generator(device="cuda").manual_seed(1)
    n = cfg.train.batch_size
    stats_g, stats_e, betas = [], [], []
    for i in range(STEPS):
        real = torch.rand(n, 1, 32, 32, device="cuda", generator=gen).mul_(2).sub_(1)
        real = real.contiguous(memory_format=torch.channels_last)
        z = models.sample_z(n, cfg.model, device="cuda", generator=gen)
        for nets in (graphed, eager):
            nets.ema.prepare(i * n)
        betas.append(1 - float(graphed.ema.weight))
        ema_before = [p.clone() for p in graphed.ema.module.parameters()]
        stats_g.append(graph_step(real, z))
        stats_e.append(eager_step(real, z))
        torch.cuda.synchronize()
        # This step's update, whichever beta the graph was captured with: G_ema = lerp(G_ema, G, 1 - beta).
        for old, new, g in zip(ema_before, graphed.ema.module.parameters(), models.base_module(graphed.G).parameters()):
            torch.testing.assert_close(new, torch.lerp(old, g, 1 - betas[-1]), rtol=1e-5, atol=1e-6)
    assert graph_step.graph is not None, "the step was never captured"
    assert len(set(betas[11:])) == STEPS - 11, f"beta did not move across the replays: {betas}"
    moved = _flat(eager.G) - initial
    assert float(moved.abs().max()) > 0
    for name, a, b in (("G", graphed.G, eager.G), ("D", graphed.D, eager.D),
                       ("G_ema", graphed.ema.module, eager.ema.module)):
        start = initial if name != "D" else None
        ref = (_flat(b) - start) if start is not None else moved
        assert _relative(_flat(a), _flat(b), ref) < 0.05, f"{name}: the graph drifted from the eager step"
    for opt_a, opt_b in ((graphed.opt_g, eager.opt_g), (graphed.opt_d, eager.opt_d)):
        m_a = torch.cat([s["exp_avg"].flatten() for s in opt_a.state.values()])
        m_b = torch.cat([s["exp_avg"].flatten() for s in opt_b.state.values()])
        assert _relative(m_a, m_b, m_b) < 0.05
        assert all(float(s["step"]) == STEPS for s in opt_a.state.values())
    torch.testing.assert_close(torch.stack(stats_g), torch.stack(stats_e), rtol=0.05, atol=0.02)


def _photo_folder(folder: Path, n: int, side: int = 96) -> Path:
    """n crops of scikit-image's colour photographs as PNG files, a folder as users hand to the shard tool."""
    from skimage import data as skd

    folder.mkdir(parents=True)
    photos = [skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket()]
    rng = np.random.default_rng(0)
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - side), rng.integers(0, p.shape[1] - side)
        Image.fromarray(p[y:y + side, x:x + side, :3]).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="module")
def raw_photo_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    out = root / "shards"
    _cli(sys.executable, "-m", "dcgan_dist.shard", str(_photo_folder(root / "png", 3000)), str(out),
         "--format", "raw", "--shard-size", "500", "--quiet")
    return out


def _weights(run_dir: Path) -> dict:
    record = checkpoint.load(checkpoint.latest(run_dir))
    return {"images": record.images, **{k: torch.cat([v.float().flatten() for v in getattr(record, k).values()
                                                       if v.is_floating_point()]) for k in ("G", "D", "G_ema")}}


def test_papers_model_through_the_cli_resumes_within_the_graphs_tolerance(raw_photo_shards, tmp_path):
    """`python -m dcgan_dist.train --config lsun_bedroom_64` (every perf switch auto: bf16, channels_last, fused
    Adam, the whole-step graph) on raw shards made by the shard tool: 2,048 images, then resumed to 4,096, against
    an uninterrupted 4,096. cuDNN's autotuned kernels and bf16 make it not bit-identical on a GPU, so the resumed
    run's end must sit within 10% of how far the uninterrupted run moved over the same images."""
    common = ["--config", "lsun_bedroom_64", f"data.shards={raw_photo_shards}", "log.every_images=1024",
              "log.sample_every_images=2048", "log.checkpoint_every_images=2048"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    out = _cli(sys.executable, "-m", "dcgan_dist.train", *common, f"run_dir={whole}", "train.images=4096")
    assert "cuda_graph on" in out and "amp bf16" in out and "fused_adam on" in out, out
    _cli(sys.executable, "-m", "dcgan_dist.train", *common, f"run_dir={split}", "train.images=2048")
    at_2048 = _weights(split)
    resumed = _cli(sys.executable, "-m", "dcgan_dist.train", *common, f"run_dir={split}", "train.images=4096")
    assert "resumed from" in resumed and "at 2048 images" in resumed, resumed
    a, b = _weights(split), _weights(whole)
    assert a["images"] == b["images"] == 4096
    for net in ("G", "D", "G_ema"):
        assert torch.isfinite(a[net]).all()
        segment = b[net] - at_2048[net]
        assert float(segment.abs().max()) > 0
        assert _relative(a[net], b[net], segment) < 0.10, f"{net}: the resumed run left the uninterrupted one"


def test_torchrun_one_process_per_gpu_with_sync_bn_over_nccl(mnist_shards, tmp_path):
    """torchrun --nproc_per_node=<GPUs> with trainer.sync_bn=true: NCCL, nn.SyncBatchNorm, DDP, the graph."""
    gpus = torch.cuda.device_count()
    run = tmp_path / "run"
    text = _cli("torchrun", "--standalone", f"--nproc_per_node={gpus}", "-m", "dcgan_dist.train",
             f"data.shards={mnist_shards}", "data.builtin=null", "trainer.sync_bn=true", "train.images=8192",
             "log.every_images=2048", f"run_dir={run}")
    for rank in range(gpus):
        assert f"rank {rank} of {gpus}" in text and "backend nccl" in text, text[-3000:]
    assert f"done: {8192 + (-8192) % (64 * gpus)} images" in text
    record = checkpoint.load(checkpoint.latest(run))
    assert all(torch.isfinite(v).all() for v in record.G.values() if v.is_floating_point())
    # The synchronised batchnorm kept nn.BatchNorm2d's names, so the checkpoint loads into the plain model.
    models.Generator(config.from_dict(record.config).model).load_state_dict(record.G)


def test_a_checkpoint_written_on_the_gpu_resumes_on_the_cpu_and_back(mnist_shards, tmp_path):
    """README: a checkpoint moves between devices. GPU to 512 images, the CPU to 1,024, the GPU to 1,536."""
    common = [sys.executable, "-m", "dcgan_dist.train", f"data.shards={mnist_shards}", "data.builtin=null",
              "model.ngf=16", "model.ndf=16", "log.every_images=256", f"run_dir={tmp_path / 'run'}"]
    for device, images in (("cuda", 512), ("cpu", 1024), ("cuda", 1536)):
        out = _cli(*common, f"train.device={device}", f"train.images={images}")
        assert f"done: {images} images" in out, out
        if images > 512:
            assert f"at {images - 512} images" in out, out
        assert ("cuda_graph on" in out) == (device == "cuda"), out
    record = checkpoint.load(checkpoint.latest(tmp_path / "run"), resumable=True)
    assert record.images == 1536 and all(v.device.type == "cpu" for v in record.G.values())
    for opt in (record.resume.opt_G, record.resume.opt_D):
        assert all(torch.isfinite(s["exp_avg"]).all() for s in opt["state"].values())



def test_a_hang_under_nccl_writes_the_flight_recorders_record_beside_the_report(mnist_shards, tmp_path):
    """torchrun, one rank per GPU (NCCL): one of rank 0's loader workers stopped after the first checkpoint; the
    watchdog's report names the wait for data, and NCCL's flight recorder (switched on before the group formed)
    is dumped beside it as nccl-trace-rank0.pkl, a pickle of the collectives the rank took part in."""
    import pickle

    from test_hangs import HANG_S, REPORT_S, _end, _loader_child, _rank_pids, _start, _wait_for
    from tiny_run import TINY

    run_dir, log = tmp_path / "run", tmp_path / "torchrun.log"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = _start([torchrun, "--nproc-per-node", "1", "-m", "dcgan_dist.train", "--run-dir", str(run_dir),
                   f"data.shards={mnist_shards}", *TINY, "train.images=1000000", "train.device=cuda",
                   "log.checkpoint_every_images=256", f"trainer.hang_timeout_s={HANG_S:g}"], log)
    try:
        _wait_for(lambda: checkpoint.latest(run_dir), 240, proc, log)
        pid = _wait_for(lambda: _rank_pids(log.read_text()).get(0), 30, proc, log)
        os.kill(_loader_child(pid), __import__("signal").SIGSTOP)
        trace = _wait_for(lambda: (run_dir / "hangs" / "nccl-trace-rank0.pkl").is_file(),
                          HANG_S + REPORT_S + 60, proc, log)
        proc.wait(120)
    finally:
        _end(proc)
    assert trace and proc.returncode != 0
    record = pickle.loads((run_dir / "hangs" / "nccl-trace-rank0.pkl").read_bytes())
    assert "entries" in record and record["entries"], sorted(record)
    report = next((run_dir / "hangs").glob("*-rank0.txt")).read_text()
    assert "every thread" in report and "stopped (T)" in report
