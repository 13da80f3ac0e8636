"""A hung rank is found within trainer.hang_timeout_s, named with the stacks that could be taken, and the run goes on
from its newest checkpoint to exactly train.images: through the trainer's command line, with real processes
stopped by SIGSTOP (issue 36).

Under Ray (two CPU workers over gloo): one rank's process stopped, and one of a rank's loader workers stopped. Under
torchrun: one rank stopped, the run exits non-zero naming it. A `pipe:` shard whose command never writes: the read
gives up after data.io_timeout and the shard is skipped and counted, not waited on until a collective times out.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dcgan_dist import checkpoint
from dcgan_dist.distributed import processes
from dcgan_dist.distributed.interruptions import EXIT_HUNG
from helpers import events, scalars
from multirank import free_port
from tiny_run import TINY

HANG_S = 6.0  # trainer.hang_timeout_s in these tests
# What a report may take past the timeout: the board read twice 2.5 beats apart (beat: hang_timeout_s / 8), a
# second for the loader workers' stacks, and this machine's slowness with Ray beside it.
REPORT_S = 12.0


def _rank_pids(text: str) -> dict[int, int]:
    """rank -> pid from the ranks' start-up lines (rendezvous.whereabouts); the newest attempt's last."""
    return {int(r): int(p) for r, p in re.findall(r"dcgan_dist: rank (\d+) of \d+ on node .*?, pid (\d+),", text)}


def _start(command: list[str], log: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _wait_for(what, timeout: float, proc: subprocess.Popen, log: Path):
    """what() until it is truthy; fails with the log when the process ended first or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) first:\n{log.read_text()[-6000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:g} s:\n{log.read_text()[-6000:]}")


def _end(proc: subprocess.Popen) -> None:
    """Whatever happened: nothing of the run left (a stopped process ignores every signal but SIGKILL)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)


def _loader_child(pid: int) -> int:
    """One of a rank's loader workers: a child process of the rank running the same Python."""
    kids = [p for p in processes.processes().values() if p.ppid == pid]
    assert kids, f"rank pid {pid} has no loader worker"
    return min(p.pid for p in kids)


def _ray_train(run_dir: Path, shards, images: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dcgan_dist.train", "--run-dir", str(run_dir), f"data.shards={shards}", *TINY,
            f"train.images={images}", "log.checkpoint_every_images=256", "trainer.num_workers=2",
            "trainer.max_failures=1", f"trainer.hang_timeout_s={HANG_S:g}", "data.io_timeout=1",
            "data.read_retries=0", *extra]


@pytest.fixture
def one_node_of_two_cpus(ray_tmpdir):
    """(cluster, ID of its one worker node) of a Ray cluster on this machine's loopback: a head with no CPU (the
    driver's) and a node of 2 CPUs; the test may add nodes. Stopped afterwards."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    cluster = None
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", ray_tmpdir)
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")  # Ray's processes and the driver: loopback
        env.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        try:
            cluster = Cluster(initialize_head=True, head_node_args={
                "node_ip_address": "127.0.0.1", "num_cpus": 0, "gcs_server_port": free_port(),
                "include_dashboard": False, "dashboard_agent_listen_port": free_port(),
                "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}})
            node = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", dashboard_agent_listen_port=free_port())
            cluster.wait_for_nodes()
            yield cluster, node.node_id
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()


def _rank_nodes(text: str) -> list[dict[int, str]]:
    """Each attempt's rank -> Ray node ID, from the ranks' lines (ray_launch.worker_loop), in order."""
    attempts: list[dict[int, str]] = []
    for rank, node in re.findall(r"dcgan_dist: rank (\d+) is on Ray node ([0-9a-f]+)", text):
        if not attempts or int(rank) in attempts[-1]:
            attempts.append({})
        attempts[-1][int(rank)] = node
    return attempts


@pytest.mark.ray
def test_hung_ranks_under_ray_are_reported_restarted_and_their_node_left_out(mnist_shards, tmp_path,
                                                                             one_node_of_two_cpus):
    """Two hangs in one run of `python -m dcgan_dist.train trainer.num_workers=2` on a cluster: after the first
    checkpoint one of rank 1's loader workers is stopped with SIGSTOP (rank 1 waits for data, rank 0 in a
    collective); after the restarted group's first checkpoint, rank 1's own process. Each time, within
    hang_timeout_s plus the report's own seconds, rank 0's report names rank 1, why, and holds the stacks; rank 1's
    (when it can still run) names its stopped loader worker; Ray restarts the group from the newest checkpoint
    (trainer.max_failures=2). Both groups run on the cluster's one worker node; before the second hang a second
    node joins; the first hung twice in a row, so the third group runs on the new one, and the run ends at exactly
    train.images."""
    cluster, first_node = one_node_of_two_cpus
    address = cluster.address
    run_dir, log, images = tmp_path / "run", tmp_path / "driver.log", 12288
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = _start([sys.executable, "-m", "dcgan_dist.train", "--run-dir", str(run_dir), f"data.shards={mnist_shards}",
                   *TINY, f"train.images={images}", "log.every_images=128", "log.checkpoint_every_images=512",
                   "trainer.num_workers=2", "trainer.max_failures=2", f"trainer.hang_timeout_s={HANG_S:g}",
                   "data.io_timeout=1", "data.read_retries=0"], log, env=env)
    hangs, seen, found_in, victims, timeline = run_dir / "hangs", set(), [], [], []
    began = time.monotonic()
    try:
        for attempt, stop in enumerate(["loader worker", "rank"]):
            newest = _wait_for(lambda: checkpoint.latest(run_dir) if checkpoint.latest(run_dir) not in seen else None,
                               240, proc, log)
            seen.add(newest)
            pid = _wait_for(lambda: _rank_pids(log.read_text()).get(1) if attempt == 0 or
                            _rank_pids(log.read_text()).get(1) != victims[0][1] else None, 60, proc, log)
            victim = _loader_child(pid) if stop == "loader worker" else pid
            if stop == "rank":  # somewhere to go once the first node is left out
                second_node = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1",
                                               dashboard_agent_listen_port=free_port()).node_id
                cluster.wait_for_nodes()
            os.kill(victim, signal.SIGSTOP)
            stopped_at, before = time.monotonic(), set(hangs.glob("*-rank0.txt"))
            report = _wait_for(lambda: sorted(set(hangs.glob("*-rank0.txt")) - before), HANG_S + REPORT_S + 30,
                               proc, log)[0]
            found_in.append(time.monotonic() - stopped_at)
            victims.append((victim, pid, report))
            seen.add(checkpoint.latest(run_dir))
            # The restarted group: its rank 0 says where it resumed from.
            resumed = log.read_text().count("resumed from")
            _wait_for(lambda: log.read_text().count("resumed from") > resumed, 180, proc, log)
            timeline.append((stop, found_in[-1], time.monotonic() - stopped_at))
        proc.wait(300)
        text = log.read_text()
        assert proc.returncode == 0, text[-6000:]
        for stop, reported, restarted in timeline:  # docs/cluster.md "Hangs" gives these (pytest -s shows them)
            print(f"{stop} stopped: reported after {reported:.1f} s, the group restarted and resumed after "
                  f"{restarted:.1f} s")
        print(f"the whole run, two hangs included: {time.monotonic() - began:.0f} s")
    finally:
        _end(proc)
        processes.send([v for v, _, _ in victims], signal.SIGKILL)
    assert all(t < HANG_S + REPORT_S for t in found_in), f"hangs reported {found_in} s after the stops"
    (worker, pid1, first), (_, pid2, second) = victims
    # Rank 0 waited in a collective both times; its reports name rank 1 as the one that did not arrive, and why.
    for report, pid, why in ((first, pid1, "waiting for its next batch"), (second, pid2, "no sign of life")):
        text_ = report.read_text()
        assert re.search(rf"did not arrive: rank 1 \(node \S+, [\d.]+, pid {pid}, Ray node [0-9a-f]+, last step "
                         rf"done at \d+ images\): {why}", text_), text_[:3000]
        assert "every thread" in text_ and 'File "' in text_  # faulthandler's stacks of rank 0's threads
    # The first time rank 1 could still run: its own report has its stacks and names its stopped loader worker.
    rank1 = [r.read_text() for r in hangs.glob("*-rank1.txt")]
    assert any(f"child pid {worker} (stopped (T))" in r and "every thread" in r for r in rank1), rank1
    assert text.count("hang: did not arrive: rank 1") >= 2  # the terminal's alarm (rank 0's log), each time
    alarms = [e.tensor_proto.string_val[0].decode() for e in events(run_dir).Tensors("alarm/text_summary")]
    assert sum(a.startswith("hang: did not arrive: rank 1") and "s lost waiting" in a for a in alarms) >= 2, alarms
    # Where each group ran: the first two on the first node, which hung twice in a row; the third on the second.
    groups = _rank_nodes(text)
    assert [set(g.values()) for g in groups] == [{first_node}, {first_node}, {second_node}], groups
    assert f"node {first_node[:12]} hung 2 times in a row: the next worker groups leave it out" in text
    final = checkpoint.load(checkpoint.latest(run_dir), map_location="cpu")
    assert final.images == images
    assert final.resume.geometry["world_size"] == 2


@pytest.fixture
def ray_tmpdir():
    """A Ray instance's own temporary folder, short (a Unix socket path has a 107-byte limit), removed after."""
    path = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_hung_rank_under_torchrun_ends_the_run_non_zero_naming_it(mnist_shards, tmp_path):
    """torchrun with two ranks, rank 1 stopped after the first checkpoint: rank 0 reports within the bound,
    naming rank 1, and exits with EXIT_HUNG; torchrun (no restarts) exits non-zero."""
    run_dir, log = tmp_path / "run", tmp_path / "torchrun.log"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = _start([torchrun, "--nproc-per-node", "2", "-m", "dcgan_dist.train", "--run-dir", str(run_dir),
                   f"data.shards={mnist_shards}", *TINY, "train.images=100000", "log.checkpoint_every_images=256",
                   f"trainer.hang_timeout_s={HANG_S:g}"], log)
    try:
        _wait_for(lambda: checkpoint.latest(run_dir), 240, proc, log)
        pid = _wait_for(lambda: _rank_pids(log.read_text()).get(1), 30, proc, log)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        reports = _wait_for(lambda: sorted((run_dir / "hangs").glob("*-rank0.txt")), HANG_S + REPORT_S + 30,
                            proc, log)
        found_in = time.monotonic() - stopped_at
        proc.wait(120)  # torchrun's own teardown: SIGTERM, which a stopped rank keeps pending, then SIGKILL
    finally:
        _end(proc)
    text = log.read_text()
    assert found_in < HANG_S + REPORT_S, f"the hang was reported {found_in:.1f} s after the stop"
    assert proc.returncode != 0, text[-4000:]
    assert f"exitcode  : {EXIT_HUNG}" in text or f"exitcode: {EXIT_HUNG}" in text, text[-4000:]
    report = reports[0].read_text()
    assert re.search(rf"did not arrive: rank 1 \(node \S+, [\d.]+, pid {pid}, .*no sign of life", report), report[:3000]


def test_a_pipe_shard_that_never_writes_on_one_rank_is_skipped_not_taken_for_a_hang(mnist_shards, tmp_path):
    """torchrun with two ranks; one `pipe:` shard's command, read by one rank, never writes: the read gives up
    after data.io_timeout (each retry too), the shard is skipped and counted, the other rank waits for it in a
    collective meanwhile, and with a hang timeout shorter than that wait no hang is declared (a step is allowed a
    stalled read's own bound): the run ends at train.images, without waiting for a collective timeout."""
    tars = sorted(Path(mnist_shards).glob("*.tar"))[:3]
    stall = tmp_path / "stall.sh"
    stall.write_text("#!/bin/sh\nexec sleep 3600\n")
    stall.chmod(0o755)
    shards = "::".join([f"pipe:cat {tars[0]}", f"pipe:{stall}", f"pipe:cat {tars[1]}", f"pipe:cat {tars[2]}"])
    run_dir = tmp_path / "run"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "dcgan_dist.train", "--run-dir", str(run_dir),
                           f"data.shards={shards}", "data.size=2000", *TINY, "train.images=1024",
                           "data.io_timeout=2", "data.read_retries=1", "data.retry_backoff=0",
                           f"trainer.hang_timeout_s={HANG_S:g}"],
                          capture_output=True, text=True, timeout=300)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-4000:]
    assert "wrote nothing for 2 s (data.io_timeout)" in said
    assert not (run_dir / "hangs").exists(), said[-4000:]
    assert checkpoint.load(checkpoint.latest(run_dir), map_location="cpu").images == 1024
    assert max(v for _, v in scalars(run_dir, "data/skipped_shards")) >= 1  # once in each pass over the data
    assert not any("sleep 3600" in " ".join(p.argv) for p in processes.processes().values()), \
        "the stalled command outlived the run"


# --- the watchdog's rules, in this process (a fake board; the exit recorded instead of taken) ---------------------

class _Board:
    """The board as the launchers keep it: the latest beat of each rank, and the hangs reported."""

    def __init__(self):
        self.beats, self.hangs = {}, []

    def post(self, rank, beat):
        self.beats[rank] = dict(beat)

    def read(self):
        return {r: dict(b) for r, b in self.beats.items()}

    def hung(self, report):
        self.hangs.append(report)


def _watchdog(tmp_path, board=None, hang=None, first=900.0, long=1800.0, reads=0.0, **kw):
    from dcgan_dist.distributed import watchdog
    return watchdog.Watchdog(watchdog.Limits(hang, first, long, reads), rank=0, world_size=2,
                             where={"node": "n0", "address": "10.0.0.1"}, run_dir=tmp_path, board=board, **kw)


def test_the_allowance_follows_the_phase_the_first_steps_and_the_median_step(tmp_path):
    from dcgan_dist.distributed import watchdog as w
    dog = _watchdog(tmp_path, hang=None, first=900.0, long=1800.0, reads=40.0)
    assert dog.allowance() == 900.0  # the first steps: compilation, CUDA graphs, first reads
    for i in range(w.WARMUP_STEPS):
        dog.mark(w.DATA)
        dog.mark(w.STEP)
        dog.stepped(32 * (i + 1))
    dog.durations.extend([10.0] * 50)  # a 10 s median step: auto is 20 x that, above the 120 s floor
    dog.mark(w.STEP)
    assert dog.allowance() == 200.0
    dog.durations.clear()
    dog.durations.extend([0.05] * 50)
    assert dog.allowance() == w.AUTO_FLOOR_S
    dog.mark(w.DATA)
    assert dog.allowance() == w.AUTO_FLOOR_S  # a stalled read's bound (40 s) is below the floor
    dog.limits = w.Limits(6.0, 900.0, 1800.0, 40.0)
    assert dog.allowance() == 40.0  # waiting for data: as long as a stalled read takes to give up
    dog.mark(w.STEP)
    assert dog.allowance() == 40.0  # and in the collective where the other ranks wait for that one
    dog.limits = w.Limits(6.0, 900.0, 1800.0, 0.0)
    assert dog.allowance() == 6.0
    dog.mark(w.EVAL)
    assert dog.allowance() == 1800.0  # the first evaluation (and checkpoint): trainer.collective_timeout_s
    dog.limits = w.Limits(6.0, 900.0, 1800.0, 40.0)
    dog.since -= 3.0  # it took 3 s
    dog.mark(w.INTERVAL)
    dog.mark(w.EVAL)
    assert 40.0 <= dog.allowance() < 40.5  # later ones: 5 x the longest before, at least the step's (reads: 40 s)
    dog.limits = w.Limits(6.0, 900.0, 1800.0, 0.0)
    assert 15.0 <= dog.allowance() < 15.5
    dog.mark(w.CHECKPOINT)
    assert dog.allowance() == 1800.0
    dog.limits = w.Limits(0, 900.0, 1800.0, 40.0)
    assert dog.allowance() == float("inf") and dog.start()._threads == []  # 0: no watchdog
    dog.stop()


def test_a_stalled_step_is_reported_naming_the_silent_rank_and_the_process_ends_with_exit_hung(tmp_path):
    from dcgan_dist.distributed import watchdog as w
    board, ended, alarms = _Board(), [], []
    board.post(1, {"node": "n1", "address": "10.0.0.2", "pid": 4242, "images": 64, "phase": "data", "phase_s": 0.1,
                   "seq": 7})  # rank 1 posted once and then fell silent
    dog = _watchdog(tmp_path, board=board, hang=1.0, first=1.0, exit_process=ended.append,
                    on_hang=lambda text, lost: alarms.append(text))
    dog.mark(w.DATA)
    dog.mark(w.STEP)
    dog.stepped(64)
    dog.mark(w.DATA)
    dog.mark(w.STEP)  # ... and never steps again: in a collective, waiting for rank 1
    began = time.monotonic()
    dog.start()
    while not ended and time.monotonic() - began < 30:
        time.sleep(0.1)
    dog.stop()
    assert ended == [EXIT_HUNG], "the watchdog did not end the process"
    assert time.monotonic() - began < 1.0 + 2.5 * dog.beat_s() + 5
    report = next((tmp_path / "hangs").glob("*-rank0.txt")).read_text()
    assert ("did not arrive: rank 1 (node n1, 10.0.0.2, pid 4242, last step done at 64 images): no sign of life"
            in report), report[:2000]
    assert "waiting for them: rank 0 (node n0, 10.0.0.1" in report and "phase 'step'" in report
    assert "every thread" in report and "test_a_stalled_step_is_reported" in report  # this (main) thread's stack
    assert board.hangs and board.hangs[0]["nodes"] == ["n1"]
    assert alarms and alarms[0].startswith("hang: did not arrive: rank 1")
