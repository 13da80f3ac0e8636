"""The local trainer end to end on real MNIST shards: event files, checkpoints, exact resume after SIGKILL."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dcgan_dist import checkpoint, config, files
from dcgan_dist.train.loop import train
from dcgan_dist.train.step import STAT_NAMES
from helpers import assert_same_tensors, assert_same_weights, events, scalars
from tiny_run import exact_resume_command


def test_tiny_run_writes_events_samples_and_checkpoints(tiny_cfg):
    metrics = train(tiny_cfg)
    run = Path(tiny_cfg.run_dir)
    acc = events(run)
    tags = acc.Tags()
    for name in (*STAT_NAMES, "perf/images_per_sec", "perf/world_size", "data/skipped_samples", "data/skipped_shards"):
        assert name in tags["scalars"], name
        steps = [e.step for e in acc.Scalars(name)]
        assert steps == [64, 128, 192, 256, 320]  # logged every 64 images, counted in images
    d_x = [e.value for e in acc.Scalars("D(x)")]
    assert all(0 < v < 1 for v in d_x)
    assert all(e.value > 0 for e in acc.Scalars("perf/images_per_sec"))
    assert {"real", "samples/fixed_noise"} <= set(tags["images"])
    assert [e.step for e in acc.Images("samples/fixed_noise")] == [160, 320]
    assert "config/text_summary" in tags["tensors"]
    assert metrics["images"] == 320
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["samples-000000000160.png",
                                                                   "samples-000000000320.png"]
    saved = config.to_dict(config.load(run / "config.yaml"))
    assert saved == {**config.to_dict(tiny_cfg), "perf": saved["perf"]}  # perf: "auto" resolved
    assert "auto" not in saved["perf"].values()

    state = checkpoint.load(checkpoint.latest(run))
    assert state.images == 320 and state.resume is not None and state.resume.step == 20
    # Everything in the folder, hidden files included: no temporary (files.temporary_name) is left anywhere.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-000000000160.pt",
                                                                      "ckpt-000000000320.pt"]
    assert not [p for p in run.rglob(f"*{files.TMP_TAG}*")]


def test_keep_last_k_checkpoints(tiny_cfg):
    tiny_cfg.log.checkpoint_every_images = 64
    tiny_cfg.log.keep_checkpoints = 2
    train(tiny_cfg)
    assert [p.name for p in checkpoint.list_checkpoints(tiny_cfg.run_dir)] == ["ckpt-000000000256.pt",
                                                                               "ckpt-000000000320.pt"]


def _train_with_a_nan_in_a_batchnorm_buffer(cfg) -> None:
    """train(cfg) where, once the first checkpoint is on disk, one running variance of G's batchnorm goes NaN: the
    losses stay finite (training batchnorm normalises with the batch's own statistics), so only the check of the
    weights before the next checkpoint can see it. It happens once: the rolled-back run must go on cleanly."""
    fired = []

    def poison(module, inputs):  # before the forward: autograd sees the buffer as the forward saves it
        if isinstance(module, nn.BatchNorm2d) and module.training and not fired and \
                checkpoint.list_checkpoints(cfg.run_dir):
            module.running_var.fill_(float("nan"))
            fired.append(module)

    hook = nn.modules.module.register_module_forward_pre_hook(poison)
    try:
        train(cfg)
    finally:
        hook.remove()
    assert fired, "the NaN was never written"


def _floating(record) -> dict[str, torch.Tensor]:
    return {f"{net}.{k}": v for net in ("G", "D", "G_ema") for k, v in (getattr(record, net) or {}).items()
            if v.is_floating_point()}


def test_a_nan_only_in_a_batchnorm_buffer_is_never_checkpointed_and_rolls_back(tiny_cfg, capsys):
    tiny_cfg.train.images, tiny_cfg.log.sample_every_images = 480, 100_000
    _train_with_a_nan_in_a_batchnorm_buffer(tiny_cfg)
    out = capsys.readouterr().out
    assert "non-finite weights at 320 images in G" in out, out
    assert out.count("rolling back to the newest checkpoint") == 1, out
    paths = checkpoint.list_checkpoints(tiny_cfg.run_dir)
    assert [checkpoint.images_of(p) for p in paths] == [160, 320, 480]
    for path in paths:
        bad = [k for k, v in _floating(checkpoint.load(path)).items() if not v.isfinite().all()]
        assert not bad, f"{path.name} holds non-finite {bad}"
    assert checkpoint.load(paths[-1]).resume.rollbacks == 1


def test_a_rollback_draws_new_latents(tiny_cfg):
    """The rolled-back run repeats 160..320 images on the same data from the same checkpoint: only new latent draws
    can make its weights differ from an undisturbed run's (the NaN buffer itself never reaches a weight)."""
    from dcgan_dist.train.loop import z_for_step

    cpu = torch.device("cpu")
    assert torch.equal(z_for_step(tiny_cfg, 7, 0, 4, cpu, 1), z_for_step(tiny_cfg, 7, 0, 4, cpu, 1))
    assert not torch.equal(z_for_step(tiny_cfg, 7, 0, 4, cpu, 0), z_for_step(tiny_cfg, 7, 0, 4, cpu, 1))
    tiny_cfg.log.sample_every_images = 100_000
    undisturbed = copy.deepcopy(tiny_cfg)
    undisturbed.run_dir = str(Path(tiny_cfg.run_dir).with_name("undisturbed"))
    train(undisturbed)
    _train_with_a_nan_in_a_batchnorm_buffer(tiny_cfg)
    (a160, a320), (b160, b320) = ([checkpoint.load(checkpoint.path_for(c.run_dir, n)).G for n in (160, 320)]
                                  for c in (undisturbed, tiny_cfg))
    assert_same_tensors(a160, b160, "G before the NaN")
    assert not all(torch.equal(v, b320[k]) for k, v in a320.items() if v.is_floating_point()), \
        "the rollback repeated the steps with the latents it had drawn before"


def test_rerun_of_finished_run_resumes_and_does_nothing(tiny_cfg):
    train(tiny_cfg)
    before = checkpoint.latest(tiny_cfg.run_dir).stat().st_mtime_ns
    metrics = train(tiny_cfg)
    assert metrics == {} and checkpoint.latest(tiny_cfg.run_dir).stat().st_mtime_ns == before


def _cli(run_dir, shards, images):
    return exact_resume_command(run_dir, shards, images, "log.checkpoint_every_images=160")


def test_killed_run_resumes_to_identical_weights(mnist_shards, tmp_path):
    """SIGKILL mid-run, rerun: same images seen and bit-identical weights as an uninterrupted run (CPU)."""
    images = 1600
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(_cli(tmp_path / "straight", mnist_shards, images), env=env,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, mnist_shards, images), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not checkpoint.list_checkpoints(killed) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = checkpoint.list_checkpoints(killed)
    assert at_kill, "no checkpoint was written before the deadline"
    assert checkpoint.load(at_kill[-1]).images < images, "the run finished before it could be killed"

    resumed = subprocess.run(_cli(killed, mnist_shards, images), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    a = checkpoint.load(checkpoint.latest(tmp_path / "straight"))
    b = checkpoint.load(checkpoint.latest(killed))
    assert a.images == b.images == 1600
    # G_ema's average and its standing statistics too
    assert_same_weights(a, b, nets=("G", "D", "G_ema"), moments=("opt_G", "exp_avg"))


def test_sample_cli_writes_grid_and_npz(tiny_cfg, tmp_path):
    train(tiny_cfg)
    ckpt = checkpoint.latest(tiny_cfg.run_dir)
    out, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    r = subprocess.run([sys.executable, "-m", "dcgan_dist.sample", str(ckpt), "--n", "10", "--out", str(out),
                        "--npz", str(npz), "--seed", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(out).size[0] > 32
    x = np.load(npz)["x"]
    assert x.shape == (10, 32, 32, 1) and x.dtype == np.uint8 and x.std() > 0
    again = tmp_path / "again.npz"
    subprocess.run([sys.executable, "-m", "dcgan_dist.sample", str(ckpt), "--n", "10", "--out", str(out),
                    "--npz", str(again), "--seed", "3"], check=True, capture_output=True, timeout=120)
    assert np.array_equal(x, np.load(again)["x"])


def test_sample_cli_names_a_bad_checkpoint(tmp_path):
    bad = tmp_path / "ckpt-000000000001.pt"
    bad.write_bytes(b"truncated")
    r = subprocess.run([sys.executable, "-m", "dcgan_dist.sample", str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and str(bad) in r.stderr


def test_empty_shard_list_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dcgan_dist.train", f"data.shards={tmp_path}/none-{{0..3}}.tar",
                        "data.builtin=null", f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "matches no shard" in r.stderr


def test_pipe_urls_train_and_failed_commands_are_skipped(mnist_shards, tmp_path):
    """`pipe:` as README advertises it: a real shell command per shard; one that fails is retried, then skipped."""
    shards = f"pipe:cat {mnist_shards}/mnist5k-{{000000..000003}}.tar::pipe:cat {tmp_path}/missing.tar"
    r = subprocess.run([*_cli(tmp_path / "run", shards, 320), "data.size=2000", "data.read_retries=1",
                        "data.retry_backoff=0.01"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exited with status 1" in r.stderr and "skipping shard pipe:cat" in r.stderr
    assert checkpoint.latest(tmp_path / "run").name == "ckpt-000000000320.pt"
    assert scalars(tmp_path / "run", "data/skipped_shards")[-1][1] >= 1


def test_resolved_perf_settings_are_printed_and_saved(tiny_cfg, capsys):
    from dcgan_dist.train.perf import cpu_bf16_units

    amp = "bf16" if cpu_bf16_units() else "fp32"  # this CPU's native bf16 decides (perf.resolve)
    train(tiny_cfg)
    assert f"perf: amp {amp}, channels_last off, fused_adam off, cuda_graph off" in capsys.readouterr().out
    saved = config.load(Path(tiny_cfg.run_dir) / "config.yaml").perf
    assert (saved.amp, saved.channels_last, saved.fused_adam, saved.cuda_graph) == (amp, "false", "false", "false")


@pytest.mark.parametrize("n, channels, nrow", [(16, 1, None), (10, 3, 4), (7, 3, None), (3, 1, 8)])
def test_sample_grids_lay_out_tiles_as_torchvision_does(n, channels, nrow):
    """grids.grid keeps torchvision's make_grid layout (2-pixel black gaps, greyscale as RGB) without its import."""
    from torchvision.utils import make_grid

    from dcgan_dist.grids import grid
    from dcgan_dist.pixels import to_uint8

    images = torch.rand(n, channels, 8, 8, generator=torch.Generator().manual_seed(n)) * 2 - 1
    want = make_grid(to_uint8(images), nrow=nrow or max(1, int(n ** 0.5)), padding=2).permute(1, 2, 0).numpy()
    assert np.array_equal(grid(images, nrow), want)
