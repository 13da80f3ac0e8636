"""The worker-side follower of cluster/local.yaml (`python -m dcgan_dist.distributed.follow_head $RAY_HEAD_IP:6379`),
run as the YAML runs it, against a stand-in for one node's Ray: a session directory under RAY_TMPDIR, a "raylet"
(an executable of that name, naming the session on its command line, as Ray's does) with an agent it started, and a
head that listens or refuses. The real cluster, `ray up` to `ray down` on three hosts, is tests/test_ray_up.py's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcgan_dist.distributed import follow_head
from hosts import available, made_hosts

FOLLOW = [sys.executable, "-m", "dcgan_dist.distributed.follow_head"]
# The agent ignores SIGTERM, as a Ray agent stuck reporting to a GCS that is gone may: SIGKILL has to follow.
RAYLET = ("import subprocess, sys, time\n"
          "subprocess.Popen(['sh', '-c', 'trap \"\" TERM; while :; do sleep 1; done'])\n"
          "time.sleep(600)")


def _alive(pid: int) -> bool:
    procs = follow_head.processes()
    return pid in procs


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.fixture
def node(tmp_path):
    """A node's Ray session: RAY_TMPDIR/ray/session_latest -> a session with a running raylet and its agent; a
    head listening on a free port; an unrelated process. Yields (env, head socket, raylet, agent pid, other)."""
    session = tmp_path / "ray" / "session_2026-12-06_10-00-00_000001_42"
    (session / "logs").mkdir(parents=True)
    (tmp_path / "ray" / "session_latest").symlink_to(session)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "raylet").symlink_to(sys.executable)
    raylet = subprocess.Popen([str(tmp_path / "bin" / "raylet"), "-c", RAYLET, f"--session_dir={session}"])
    head = socket.socket()
    head.bind(("127.0.0.1", 0))
    head.listen(16)
    other = subprocess.Popen(["sleep", "600"])
    _wait(lambda: any(p.ppid == raylet.pid for p in follow_head.processes().values()), 10, "the agent did not start")
    agent = next(p.pid for p in follow_head.processes().values() if p.ppid == raylet.pid)
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path)}
    try:
        yield env, head, raylet, agent, other
    finally:
        for pid in (raylet.pid, agent, other.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raylet.wait()
        other.wait()
        head.close()


def _start(env: dict, head: socket.socket | str) -> int:
    """The YAML's command (detaches); the follower's pid, from what it prints."""
    address = head if isinstance(head, str) else f"127.0.0.1:{head.getsockname()[1]}"
    r = subprocess.run([*FOLLOW, address, "--every", "0.3", "--grace", "1"], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "following this node's Ray as pid" in r.stdout, r.stdout
    return int(r.stdout.split("as pid ")[1].split(";")[0])


def test_a_refusing_head_stops_the_session_and_nothing_else(node):
    """While the head answers, nothing happens; once it refuses (the cluster was taken down), the raylet and its
    agent are stopped (the agent, which ignores SIGTERM, by SIGKILL), the unrelated process lives on, and the
    follower exits and says why in the session's log."""
    env, head, raylet, agent, other = node
    follower = _start(env, head)
    time.sleep(2)  # several looks with the head answering
    assert raylet.poll() is None and _alive(agent) and _alive(follower)
    head.close()
    _wait(lambda: raylet.poll() is not None and not _alive(agent), 20, "the session was not stopped")
    _wait(lambda: not _alive(follower), 10, "the follower did not exit")
    assert other.poll() is None
    log = Path(env["RAY_TMPDIR"], "ray", "session_latest", "logs", "dcgan_follow_head.log").read_text()
    assert "refused 3 connections in a row (cluster down)" in log and str(agent) in log, log


def test_a_raylet_that_exits_takes_what_it_left_with_it(node):
    """The raylet killed (the head still answering): its orphaned agent is stopped and the follower exits."""
    env, head, raylet, agent, other = node
    follower = _start(env, head)
    raylet.kill()
    raylet.wait()
    _wait(lambda: not _alive(agent), 20, "the raylet's agent was left running")
    _wait(lambda: not _alive(follower), 10, "the follower did not exit")
    assert other.poll() is None
    log = Path(env["RAY_TMPDIR"], "ray", "session_latest", "logs", "dcgan_follow_head.log").read_text()
    assert "this node's raylet has exited" in log, log


@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_a_head_behind_a_cut_link_is_not_a_cluster_taken_down(node):
    """The head on a test host with an address of its own, its link then set down: no answer at all is a
    partition (Ray's health checks decide about the node), not a refusal, so the follower keeps the session."""
    env, _, raylet, agent, other = node
    with made_hosts(1) as (host,):
        host.popen(sys.executable, "-c", "import socket, time\ns = socket.socket()\ns.bind(('0.0.0.0', 6379))\n"
                   "s.listen()\ntime.sleep(600)")
        _wait(lambda: subprocess.run(["nc", "-z", host.address, "6379"]).returncode == 0, 10, "no listener")
        follower = _start(env, f"{host.address}:6379")
        host.cut()
        time.sleep(6)  # 20 looks of 0.3 s, each unanswered
        assert raylet.poll() is None and _alive(agent) and _alive(follower)


def test_started_before_ray_it_says_what_is_missing(tmp_path):
    """No session (ray start has not run, or failed): an error naming the session, exit 1, nothing detached."""
    r = subprocess.run([*FOLLOW, "10.0.0.10:6379"], env={**os.environ, "RAY_TMPDIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert f"no raylet of the Ray session {tmp_path}/ray/session_latest runs on this node" in r.stderr, r.stderr
    r = subprocess.run([*FOLLOW, "10.0.0.10"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "'10.0.0.10' is not HOST:PORT" in r.stderr, r.stderr
