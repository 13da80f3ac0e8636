"""DDP over gloo on real processes: SyncBN + DDP equals one process with the double batch; data split per rank."""

from __future__ import annotations

import copy
import io
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan_dist import config, models
from dcgan_dist.data import stream
from dcgan_dist.data.load import load_labelled
from dcgan_dist.data.shardset import resolve
from dcgan_dist.distributed import context as dist
from dcgan_dist.shard import writer
from dcgan_dist.train.nets import build_nets, make_step
from multirank import free_port, run_ranks

PER_RANK, STEPS = 4, 3
# Max abs weight difference allowed after STEPS steps. float64 checks the algorithm: any missing synchronisation
# shows up at ~1e-4 (the size of one Adam step at lr 2e-4), the measured difference is ~1e-14. In float32, Adam's
# normalisation magnifies summation-order noise in near-zero gradients: ~2e-6 measured, 1e-5 allowed.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _inputs(cfg, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS global batches of real MNIST digits and latent vectors: (STEPS, 2 x PER_RANK, ...)."""
    images, _ = load_labelled(cfg.data.shards, cfg.model.resolution, cfg.model.channels,
                                   limit=STEPS * 2 * PER_RANK)
    z = models.sample_z(STEPS * 2 * PER_RANK, cfg.model, generator=torch.Generator().manual_seed(7))
    return (images.to(dtype).view(STEPS, 2 * PER_RANK, *images.shape[1:]),
            z.to(dtype).view(STEPS, 2 * PER_RANK, -1))


def _train_steps(cfg, ctx: dist.Context, dtype) -> dict:
    """STEPS steps built as train() builds them (SyncBN conversion, DDP options) on this rank's rows of each batch;
    the final G and D states and the initial ones."""
    nets = build_nets(cfg, ctx)
    for net in (nets.G, nets.D, nets.ema.module):
        net.to(dtype)  # in place: the optimizers (and G_ema's update) keep their parameters
    nets.ema.weight = nets.ema.weight.to(dtype)
    initial = {"G": copy.deepcopy(nets.G.state_dict()), "D": copy.deepcopy(nets.D.state_dict())}
    step = make_step(nets, cfg, ctx)
    rows = slice(ctx.rank * PER_RANK, (ctx.rank + 1) * PER_RANK) if ctx.distributed else slice(None)
    for i, (real, z) in enumerate(zip(*_inputs(cfg, dtype))):
        nets.ema.prepare(i * 2 * PER_RANK)  # as the loop does: images seen before the step
        step(real[rows], z[rows])
    return {"G": nets.G.state_dict(), "D": nets.D.state_dict(),
            "G_ema": nets.ema.module.state_dict(), "initial": initial}


def _ddp_rank(rank: int, world_size: int, cfg_dict: dict) -> dict:
    cfg = config.from_dict(cfg_dict)
    ctx = dist.init("cpu")
    return {dtype: _train_steps(cfg, ctx, dtype) for dtype in TOLERANCE}


def test_two_ranks_with_syncbn_equal_one_process_with_double_batch(tiny_cfg):
    """The whole distributed step (SyncBN statistics, D run twice, DDP averaging, Adam) against plain batch 2b."""
    tiny_cfg.trainer.sync_bn = True
    tiny_cfg.train.ema_images = 16  # a short half-life: G_ema moves visibly in three steps
    tiny_cfg.perf.amp = "fp32"  # the arithmetic of distribution, in float32 and float64: not auto's bf16 on some CPUs
    ranks = run_ranks(_ddp_rank, 2, config.to_dict(tiny_cfg))
    single = dist.Context(0, 1, 0, torch.device("cpu"))
    for dtype, tol in TOLERANCE.items():
        ref = _train_steps(tiny_cfg, single, dtype)
        moved = 0.0
        for name in ("G", "D", "G_ema"):
            for key, want in ref[name].items():
                # G_ema sums the rounding of every step's G (2e-10 measured in float64): ten times the margin.
                limit = tol * 10 if name == "G_ema" else tol
                for rank, r in enumerate(ranks):
                    err = (r[dtype][name][key].double() - want.double()).abs().max().item()
                    assert err <= limit, f"{dtype} rank {rank} {name}.{key}: max abs diff {err:.2e} > {limit}"
                if name != "G_ema":
                    moved = max(moved, (want.double() - ref["initial"][name][key].double()).abs().max().item())
        assert moved > 1e-4  # the weights did move: this is not the equality of two untouched models
        # G_ema is identical on every rank, with no collective of its own: every rank averages the same G.
        for key, value in ranks[0][dtype]["G_ema"].items():
            assert torch.equal(value, ranks[1][dtype]["G_ema"][key]), f"G_ema.{key} differs between ranks"
        g_ema_moved = max((ref["G_ema"][k].double() - ref["initial"]["G"][k].double()).abs().max().item()
                          for k in ref["G_ema"] if "running" not in k and "num_batches" not in k)
        assert g_ema_moved > 1e-5


def _compression_rank(rank: int, world_size: int, cfg_dict: dict) -> dict:
    """For each perf.grad_compression: D's gradients on this rank's own batch alone (no_sync), then as DDP
    averaged them over the ranks, D built and wrapped by build_nets + make_step as train() does."""
    out = {}
    for compression in ("none", "bf16", "fp16"):
        cfg = config.from_dict(cfg_dict)
        cfg.perf.grad_compression = compression
        ctx = dist.init("cpu")
        nets = build_nets(cfg, ctx)
        make_step(nets, cfg, ctx)
        x = torch.randn(PER_RANK, 1, 32, 32, generator=torch.Generator().manual_seed(rank))
        with nets.D_wrapped.no_sync():
            nets.D_wrapped(x).sum().backward()
        local = [p.grad.clone() for p in nets.D.parameters()]
        nets.opt_d.zero_grad(set_to_none=False)
        nets.D_wrapped(x).sum().backward()
        out[compression] = {"local": local, "averaged": [p.grad.clone() for p in nets.D.parameters()]}
    return out


def test_grad_compression_all_reduces_in_half_precision(tiny_cfg):
    """perf.grad_compression=bf16/fp16: DDP's average is exactly what the half-precision all-reduce of the ranks'
    gradients gives (each rank's bucket cast, halved, summed, cast back to fp32); none: the fp32 average."""
    ranks = run_ranks(_compression_rank, 2, config.to_dict(tiny_cfg))
    for compression, dtype in (("none", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        (a, b) = (r[compression]["local"] for r in ranks)
        got = ranks[0][compression]["averaged"]
        assert all(torch.equal(g, h) for g, h in zip(got, ranks[1][compression]["averaged"]))  # same on both
        for g, ga, gb in zip(got, a, b):
            assert g.dtype == torch.float32
            want = (ga.to(dtype) / 2 + gb.to(dtype) / 2).float()
            if compression == "none":
                assert torch.allclose(g, want, rtol=1e-6, atol=1e-9)
            else:
                assert torch.equal(g, want), f"{compression}: max diff {(g - want).abs().max():.3e}"
    # Compression is visible: the half-precision averages are not the fp32 one.
    assert any(not torch.equal(c, n) for c, n in zip(ranks[0]["bf16"]["averaged"], ranks[0]["none"]["averaged"]))
    with pytest.raises(config.ConfigError, match="perf.grad_compression"):
        config.load(None, ["perf.grad_compression=int8"])


def _id_image(i: int) -> bytes:
    """A 32x32 greyscale PNG whose first two pixels spell its sample id."""
    arr = np.zeros((32, 32), np.uint8)
    arr[0, 0], arr[0, 1] = i % 256, i // 256
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_numbered_shards(outdir, sizes) -> None:
    outdir.mkdir()
    infos, first = [], 0
    for k, size in enumerate(sizes):
        samples = [(f"s{i:05d}", {"png": _id_image(i)}) for i in range(first, first + size)]
        infos.append(writer.write_shard(outdir / writer.shard_name("ids", k), samples))
        first += size
    writer.write_manifest(outdir, infos, source="test:numbered", options={})


def _data_rank(rank: int, world_size: int, cfg_dict: dict) -> dict:
    cfg = config.from_dict(cfg_dict)
    shards = resolve(cfg.data.shards)
    per_pass = stream.steps_per_pass(shards, cfg, world_size)
    loader = stream.make_loader(shards, cfg, rank, world_size, pin_memory=False)
    ids, steps = [], 0
    for images, _, _ in loader:
        # The collective every training step makes: a rank that ran out of batches would hang the other here.
        dist.all_reduce_sum(torch.ones(1))
        if steps < per_pass:
            ids += (images[:, 0, 0, 0].long() + 256 * images[:, 0, 1, 0].long()).tolist()  # uint8 NHWC
        steps += 1
        if steps == per_pass + 3:  # a few steps into the second pass
            break
    return {"ids": ids, "steps": steps, "per_pass": per_pass}


def test_three_shards_two_ranks_two_loader_workers_read_each_sample_once(tmp_path):
    """Fewer shards than (rank, worker) slots, unequal sizes, no resampling: one pass has no repeats, no hang."""
    sizes = (30, 30, 23)
    _write_numbered_shards(tmp_path / "ids", sizes)
    cfg = config.load(None, [f"data.shards={tmp_path / 'ids'}", "data.builtin=null", "data.resample=false",
                             "data.loader_workers=2", "data.shuffle_buffer=8", "train.batch_size=2",
                             "model.resolution=32", "model.channels=1"])
    ranks = run_ranks(_data_rank, 2, config.to_dict(cfg), timeout=90)
    per_pass = ranks[0]["per_pass"]
    assert all(r["steps"] == per_pass + 3 for r in ranks)
    read = ranks[0]["ids"] + ranks[1]["ids"]
    assert len(read) == 2 * per_pass * 2
    assert len(set(read)) == len(read), "a sample was read twice in one pass"
    assert set(read) <= set(range(sum(sizes)))
    assert len(read) >= sum(sizes) - 2 * 2 * 2 * 2  # the pass covers all but less than a batch per slot


def _late_rank(rank, world_size):
    import time as _time

    if rank == 1:
        _time.sleep(6)  # never reaches the barrier in time
        return "late"
    try:
        dist.barrier(timeout_s=2)
    except dist.CollectiveTimeout as err:
        return str(err)
    return "passed"


def test_a_missing_rank_is_named_not_waited_for_forever():
    said, late = run_ranks(_late_rank, 2, timeout=60)
    assert late == "late"
    assert "waited 2 s (trainer.collective_timeout_s)" in said and "1" in said.split("barrier:")[1]


def _eval_rank(rank: int, world_size: int, cfg_dict: dict) -> dict:
    """The in-training coverage evaluation on this rank, as the loop calls it; rank 0's scores."""
    from dcgan_dist.evaluate import during_training
    from dcgan_dist.train.runlog import RunLog

    cfg = config.from_dict(cfg_dict)
    ctx = dist.init("cpu") if world_size > 1 else dist.Context(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(3)
    g, d = models.build(cfg.model)
    evaluator = during_training.build(cfg, ctx)
    log = RunLog(cfg.run_dir, cfg, 320, 0) if ctx.is_main else None
    try:
        return evaluator(g, None, d, 160, log)
    finally:
        if log is not None:
            log.close()


def test_evaluation_during_training_is_shared_by_the_ranks_and_scores_the_same(tiny_cfg, tmp_path):
    """Each rank classifies its half of the samples (the judge fit once, on rank 0, and sent): the same scores."""
    for key, value in (("eval.metric", "coverage"), ("eval.samples", 64), ("eval.real_samples", 300)):
        section, name = key.split(".")
        setattr(getattr(tiny_cfg, section), name, value)
    tiny_cfg.run_dir = str(tmp_path / "one")
    single = _eval_rank(0, 1, config.to_dict(tiny_cfg))
    tiny_cfg.run_dir = str(tmp_path / "two")
    shared, other = run_ranks(_eval_rank, 2, config.to_dict(tiny_cfg), timeout=180)
    assert other == {}  # rank 1 embedded its share and reported nothing
    assert shared["eval/coverage"] == pytest.approx(single["eval/coverage"], rel=1e-6)
    assert shared["eval/coverage_judge_accuracy"] == single["eval/coverage_judge_accuracy"]


def _rank_command(rank: int, world_size: int, port: int, mnist_shards, run_dir) -> tuple[list[str], dict]:
    """`python -m dcgan_dist.train` as torchrun or a hand-made launcher starts one rank: the env:// variables."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
           "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1"}
    env.pop("GLOO_SOCKET_IFNAME", None)
    return [sys.executable, "-m", "dcgan_dist.train", f"data.shards={mnist_shards}", "data.builtin=null",
            "train.device=cpu", f"run_dir={run_dir}", "trainer.startup_timeout_s=5"], env


def test_a_rank_that_never_comes_ends_the_start_up_with_its_name(mnist_shards, tmp_path):
    """WORLD_SIZE=3 but only ranks 0 and 1 start (a node that cannot reach the head): within
    trainer.startup_timeout_s both end with an error that names rank 2, the ranks that did join and their nodes,
    and the interface settings to check; not torch's half-hour wait."""
    port = free_port()
    commands = [_rank_command(r, 3, port, mnist_shards, tmp_path / "run") for r in (0, 1)]
    procs = [subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for command, env in commands]
    outs = [p.communicate(timeout=120) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode != 0, f"rank {rank} did not fail: {out[-1000:]}"
        said = err.strip().splitlines()[-1]
        assert said.startswith("error: "), err[-2000:]
        assert "rank 2 of 3 never joined the rendezvous at 127.0.0.1" in said, said
        assert "within 5 s (trainer.startup_timeout_s)" in said, said
        assert f"rank 0 of 3 on node {socket.gethostname()}" in said and "rank 1 of 3 on node" in said, said
        # Chosen by each rank (the interface of its route to the rendezvous), named in the message.
        assert "GLOO_SOCKET_IFNAME=lo (chosen: holds 127.0.0.1)" in said and "NCCL_SOCKET_IFNAME" in said, said
        assert "Traceback" not in err, err[-2000:]


def test_a_rank_that_cannot_reach_the_rendezvous_says_so(mnist_shards, tmp_path):
    """Rank 1 alone, pointed at an address where nothing listens (the head's firewall, a wrong MASTER_ADDR)."""
    command, env = _rank_command(1, 2, free_port(), mnist_shards, tmp_path / "run")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    said = proc.stderr.strip().splitlines()[-1]
    assert said.startswith("error: rank 1 of 2 on node") and "cannot reach the rendezvous at 127.0.0.1:" in said, \
        proc.stderr[-2000:]
    assert "within 5 s (trainer.startup_timeout_s)" in said and "GLOO_SOCKET_IFNAME" in said, said


def test_each_rank_binds_to_the_interface_holding_its_address(monkeypatch):
    """rendezvous.choose_interface: the interface whose address the other ranks reach this one at, for gloo and
    NCCL alike, marked as chosen in the start-up line; a setting of the user's own is left as it is.
    (tests/test_hosts.py shows it across hosts whose names resolve to loopback.)"""
    from dcgan_dist.distributed import rendezvous

    environ = {k: v for k, v in os.environ.items() if not k.endswith("_SOCKET_IFNAME")}
    monkeypatch.setattr(os, "environ", environ)  # this process's own, back as it was afterwards
    assert rendezvous.interface_of("127.0.0.1") == "lo" and rendezvous.interface_of("203.0.113.9") is None
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")  # the user's
    rendezvous.choose_interface("127.0.0.1")
    assert environ["GLOO_SOCKET_IFNAME"] == "lo" and environ["NCCL_SOCKET_IFNAME"] == "ib0"
    assert rendezvous.interface_settings() == "GLOO_SOCKET_IFNAME=lo (chosen: holds 127.0.0.1), NCCL_SOCKET_IFNAME=ib0"
