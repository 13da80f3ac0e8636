"""Runs that survive what clusters and GANs do to them: signals, divergence, another world size, damaged files.

Every test drives `python -m dcgan_dist.train` (or torchrun) in a real subprocess, as a user or a scheduler would.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dcgan_dist import checkpoint, files
from dcgan_dist.distributed.processes import processes
from helpers import assert_same_weights, scalars
from tiny_run import exact_resume_command

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
IMAGES = 960


def _cli(run_dir, shards, images=IMAGES, *extra):
    return exact_resume_command(run_dir, shards, images, "log.checkpoint_every_images=320", *extra)


def _run(args, timeout=300):
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def straight(mnist_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight")
    r = _run(_cli(run, mnist_shards))
    assert r.returncode == 0, r.stderr
    return checkpoint.load(checkpoint.latest(run))


def _start_and_wait_for_checkpoint(run, shards, *extra):
    proc = subprocess.Popen(_cli(run, shards, IMAGES, *extra), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not checkpoint.list_checkpoints(run) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert checkpoint.list_checkpoints(run), "no checkpoint before the deadline"
    return proc


def test_sigterm_checkpoints_at_the_current_count_and_resumes_bit_identical(mnist_shards, tmp_path, straight):
    run = tmp_path / "run"
    proc = _start_and_wait_for_checkpoint(run, mnist_shards)
    time.sleep(0.3)  # into the next checkpoint interval
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "writing a checkpoint at the next step boundary" in err
    stopped_at = checkpoint.images_of(checkpoint.latest(run))
    assert 320 < stopped_at < IMAGES, "the stop checkpoint is not at the count the run had reached"
    assert stopped_at % 320 != 0 or stopped_at == 640  # not the periodic schedule (unless it fell on it)
    assert f"stopped by signal {int(signal.SIGTERM)} at {stopped_at} images" in err

    resumed = _run(_cli(run, mnist_shards))
    assert resumed.returncode == 0, resumed.stderr
    final = checkpoint.load(checkpoint.latest(run))
    assert final.images == IMAGES
    assert_same_weights(straight, final, moments=("opt_D", "exp_avg_sq"))
    steps = [step for step, _ in scalars(run, "loss/D")]
    assert steps == sorted(set(steps)), "TensorBoard shows some steps twice after the resume"


def test_second_signal_exits_at_once(mnist_shards, tmp_path):
    """A second SIGINT while the first still waits for its step boundary: out at once, no stop checkpoint."""
    run = tmp_path / "run"
    # A wide model's steps (about a second each on 2 cores) leave the second signal time to land in the first's.
    proc = subprocess.Popen(_cli(run, mnist_shards, 100_000, "model.ngf=128", "model.ndf=128", "train.batch_size=64",
                                 "log.checkpoint_every_images=1000000"),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    next(line for line in proc.stdout if line.startswith("perf:"))  # the run has started: its handlers are set
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 60
    while not any("writing a checkpoint at the next step boundary" in line for line in said):
        assert time.time() < deadline and proc.poll() is None, "".join(said)[-3000:]
        time.sleep(0.005)  # Python runs a handler once for signals that arrive before it ran: wait for the first
    loaders = {p.pid: p.start for p in processes().values() if p.ppid == proc.pid}
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    # Its data-loader workers went with it (killed first): one left behind could print the traceback of its broken
    # connection to the parent (multiprocessing's resource_sharer), and lingered until its watchdog noticed.
    now = processes()
    assert loaders and not [pid for pid, start in loaders.items() if pid in now and now[pid].start == start]
    proc.stdout.read()  # EOF once every holder of the pipe, loader workers too, is gone
    reader.join(timeout=60)
    err = "".join(said)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err[-3000:]
    assert "second SIGINT: exiting at once" in err and "stopped by signal" not in err, err[-3000:]
    assert checkpoint.list_checkpoints(run) == []  # the first signal's checkpoint was not waited for


def test_forced_divergence_is_caught_and_only_finite_checkpoints_remain(mnist_shards, tmp_path):
    run = tmp_path / "run"
    assert _run(_cli(run, mnist_shards, 320)).returncode == 0
    r = _run(_cli(run, mnist_shards, IMAGES, "train.lr_d=1e30", "train.lr_g=1e30", "train.max_rollbacks=2"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "non-finite" in r.stderr and "rollbacks in a row did not help" in r.stderr
    assert r.stdout.count("rolling back to the newest checkpoint") == 2
    for path in checkpoint.list_checkpoints(run):
        state = checkpoint.load(path)
        assert all(t.isfinite().all() for net in (state.G, state.D, state.G_ema or {}) for t in net.values()
                   if t.is_floating_point()), path.name
    npz = tmp_path / "s.npz"
    sample = _run([sys.executable, "-m", "dcgan_dist.sample", str(run), "--n", "8", "--out",
                   str(tmp_path / "g.png"), "--npz", str(npz)])
    assert sample.returncode == 0, sample.stderr
    assert np.load(npz)["x"].std() > 0  # a real picture, not a NaN-black one
    stop = _run(_cli(run, mnist_shards, IMAGES, "train.lr_d=1e30", "train.lr_g=1e30", "train.on_nonfinite=stop"))
    assert stop.returncode == 1 and "train.on_nonfinite=stop" in stop.stderr
    assert "rolling back" not in stop.stdout


def test_two_ranks_then_one_rank_ends_at_exactly_train_images(mnist_shards, tmp_path):
    """Written by 2 ranks (torchrun, gloo) at 320 images, resumed by 1 rank: ends at exactly train.images."""
    run = tmp_path / "run"
    base = _cli(run, mnist_shards, 320, "data.loader_workers=0")[3:]  # without `python -m dcgan_dist.train`
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "dcgan_dist.train", *base], timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert checkpoint.load(checkpoint.latest(run)).resume.geometry["world_size"] == 2
    one = _run(_cli(run, mnist_shards, 640, "data.loader_workers=0"))
    assert one.returncode == 0, one.stderr
    assert "the data stream starts a fresh pass" in one.stdout
    assert [checkpoint.images_of(p) for p in checkpoint.list_checkpoints(run)] == [320, 640]
    final = checkpoint.load(checkpoint.latest(run))
    assert final.images == 640 and final.resume.step == 10 + 20  # 10 steps of 2 x 16, then 20 of 16


def test_gpu_style_optimizer_state_resumes_on_the_cpu_with_the_configs_rates(mnist_shards, tmp_path):
    """A checkpoint written with CUDA graphs (capturable, fused Adam, step counts as float tensors)."""
    run = tmp_path / "run"
    assert _run(_cli(run, mnist_shards, 320)).returncode == 0
    path = checkpoint.latest(run)
    state = torch.load(path, weights_only=True)  # the file as a GPU run writes it
    for opt in ("opt_G", "opt_D"):
        for group in state[opt]["param_groups"]:
            group.update(capturable=True, fused=True, foreach=None)
        for s in state[opt]["state"].values():
            s["step"] = s["step"].float().reshape(())
    torch.save(state, path)
    r = _run(_cli(run, mnist_shards, 640, "train.lr_d=0.001"))
    assert r.returncode == 0, r.stderr
    assert "train.lr_d: 0.0002 in the checkpoint, 0.001 in the config (used)" in r.stdout
    final = checkpoint.load(checkpoint.latest(run))
    assert final.images == 640 and final.resume.opt_D["param_groups"][0]["lr"] == 0.001
    assert final.resume.opt_D["param_groups"][0]["capturable"] is False


def test_changed_model_shape_is_an_error_naming_the_keys(mnist_shards, tmp_path):
    run = tmp_path / "run"
    assert _run(_cli(run, mnist_shards, 320)).returncode == 0
    r = _run(_cli(run, mnist_shards, 640, "model.ngf=32", "model.nz=64"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "model.ngf=16 in the checkpoint, 32 now" in r.stderr and "model.nz=100 in the checkpoint, 64 now" in r.stderr


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(mnist_shards, tmp_path, straight):
    run = tmp_path / "run"
    assert _run(_cli(run, mnist_shards, 640)).returncode == 0
    newest = checkpoint.latest(run)
    newest.write_bytes(newest.read_bytes()[:1000])  # what a full disk leaves
    r = _run(_cli(run, mnist_shards))
    assert r.returncode == 0, r.stderr
    assert f"cannot read checkpoint {newest}" in r.stderr and "trying the checkpoint before it" in r.stderr
    assert "resumed from" in r.stdout and "ckpt-000000000320.pt" in r.stdout
    assert_same_weights(straight, checkpoint.load(checkpoint.latest(run)), moments=("opt_D", "exp_avg_sq"))


def test_milestone_checkpoints_are_kept_beside_the_newest(mnist_shards, tmp_path):
    run = tmp_path / "run"
    r = _run(_cli(run, mnist_shards, IMAGES, "log.checkpoint_every_images=160", "log.keep_checkpoints=2",
                  "log.keep_every_images=400"))
    assert r.returncode == 0, r.stderr
    kept = [checkpoint.images_of(p) for p in checkpoint.list_checkpoints(run)]
    assert kept == [480, 800, 960]  # milestones: first past 400 (480) and past 800 (800); the newest two: 800, 960


def test_collapse_alarm_speaks_after_patience_and_only_once():
    from dcgan_dist.train.health import CollapseWatch, NonFinite, check_metrics

    watch = CollapseWatch(patience=3)
    won = {"loss/D": 0.01, "loss/G": 7.0, "D(x)": 0.99, "D(G(z))/D_phase": 0.001, "D(G(z))/G_phase": 0.002}
    healthy = {**won, "loss/D": 1.2, "loss/G": 0.9, "D(G(z))/G_phase": 0.4}
    assert [watch.update({**healthy, "loss/D": 1.2 + i / 100}) for i in range(5)] == [None] * 5
    said = [watch.update({**won, "loss/G": 7.0 + i}) for i in range(6)]
    assert said[:2] == [None, None] and "D has won outright" in said[2] and said[3:] == [None] * 3
    frozen = CollapseWatch(patience=2)
    assert [frozen.update(healthy) for _ in range(3)][-1].startswith("the losses have not changed")
    with pytest.raises(NonFinite, match="at 640 images: loss/G=nan"):
        check_metrics({"loss/D": 1.0, "loss/G": float("nan")}, 640)


def _tree(run):
    """Every file under the run directory with its size and modification time: what 'untouched' compares."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def test_a_second_trainer_on_a_run_dir_in_use_is_refused_and_touches_nothing(mnist_shards, tmp_path):
    """Two `python -m dcgan_dist.train` on one run_dir: the second is refused at once, naming the first's pid, and
    leaves every file of the first as it was (before the lock, its checkpoints pruned the first's)."""
    run = tmp_path / "run"
    first = _start_and_wait_for_checkpoint(run, mnist_shards, "log.keep_checkpoints=1")
    first.send_signal(signal.SIGSTOP)  # holds still (and holds run_dir) while the second one tries
    try:
        stat = Path(f"/proc/{first.pid}/stat")
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":  # stopped: signals arrive asynchronously
            time.sleep(0.01)
        # What a writer of the first run would have in flight: not the second's to clean up.
        in_flight = files.temporary_name(checkpoint.path_for(run, 640))
        in_flight.write_bytes(b"half a checkpoint")
        before = _tree(run)
        second = _run(_cli(run, mnist_shards, 320, "log.keep_checkpoints=1", "train.seed=1"), timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"run_dir {run} is being written by pid {first.pid}" in second.stderr, second.stderr[-3000:]
        assert _tree(run) == before
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert [checkpoint.images_of(p) for p in checkpoint.list_checkpoints(run)] == [IMAGES]


def test_a_killed_writers_temporary_checkpoints_are_removed_by_the_next_start(mnist_shards, tmp_path):
    """What a SIGKILL or a second signal's os._exit leaves mid-write (a tagged temporary in checkpoints/) is gone
    after the next start; a user's own files, and tagged files outside checkpoints/, are left alone."""
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", "import os, sys\nfrom dcgan_dist import files\n"
                             "with files.atomic_open(sys.argv[1]) as f:\n    f.write(b'half a checkpoint')\n"
                             "    os.kill(os.getpid(), 9)\n", str(checkpoint.path_for(run, 320))], timeout=120)
    leftover = [p for p in checkpoint.directory(run).iterdir() if files.TMP_TAG in p.name]
    assert killed.returncode == -9 and len(leftover) == 1, leftover
    mine = [checkpoint.directory(run) / "notes.txt", run / "samples" / f".x{files.TMP_TAG}1-0"]
    for p in mine:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("a user's own file")
    r = _run(_cli(run, mnist_shards, 320))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not leftover[0].exists() and "removed 1 unfinished checkpoint file" in r.stdout
    assert all(p.read_text() == "a user's own file" for p in mine)


def test_sighup_from_a_closed_terminal_checkpoints_at_the_count_reached_and_resumes(mnist_shards, tmp_path,
                                                                                      straight):
    """The run's terminal hangs up (an SSH session closed): a checkpoint at the count reached, exit 128 + SIGHUP,
    although every later write to the terminal fails; the same command resumes, and under nohup a SIGHUP is
    ignored."""
    run = tmp_path / "run"
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(_cli(run, mnist_shards), env=ENV, stdin=terminal, stdout=terminal, stderr=terminal,
                            start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # its controlling terminal
    os.close(terminal)
    said = b""
    deadline = time.time() + 240
    while not checkpoint.list_checkpoints(run):
        assert time.time() < deadline and proc.poll() is None, said.decode(errors="replace")[-3000:]
        if select.select([controller], [], [], 0.05)[0]:
            said += os.read(controller, 1 << 16)  # a terminal nobody reads blocks its writers
    time.sleep(0.3)  # into the next checkpoint interval
    os.close(controller)  # the hangup: the kernel sends SIGHUP to the session
    assert proc.wait(timeout=120) == 128 + signal.SIGHUP
    stopped_at = checkpoint.images_of(checkpoint.latest(run))
    assert 320 < stopped_at < IMAGES, "the stop checkpoint is not at the count the run had reached"

    resumed = subprocess.Popen(_cli(run, mnist_shards), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # nohup
    said = ""
    while not said.endswith("\n") or "perf:" not in said:  # the run has started: its handlers are set
        line = resumed.stdout.readline()
        assert line, said[-3000:]
        said += line
    resumed.send_signal(signal.SIGHUP)
    said += resumed.stdout.read()  # to the end (communicate() would miss what readline buffered)
    assert resumed.wait(timeout=240) == 0, said[-3000:]
    assert f"resumed from {checkpoint.path_for(run, stopped_at)}" in said, said[-3000:]
    assert_same_weights(straight, checkpoint.load(checkpoint.latest(run)), moments=("opt_D", "exp_avg_sq"))


def test_a_start_that_fails_after_the_loader_workers_began_still_ends(mnist_shards, tmp_path):
    """Run.start creates the loader's workers, which ignore SIGTERM (stop.py), before it writes config.yaml: a failure
    there left them alive, and the process waited for them at exit for ever (188cd17: still running after 120 s)."""
    run = tmp_path / "run"
    (run / "config.yaml").mkdir(parents=True)  # config.yaml cannot be written
    r = subprocess.run([sys.executable, "-m", "dcgan_dist.train", f"data.shards={mnist_shards}", "data.builtin=null",
                        "data.loader_workers=2", f"run_dir={run}", "train.images=640"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "config.yaml" in r.stderr, r.stderr
    assert not [p for p in run.iterdir() if files.TMP_TAG in p.name]
