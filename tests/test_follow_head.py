"""The worker-side follower of cluster/local.yaml (`python -m dcgan_dist.distributed.follow_head $RAY_HEAD_IP:6379`).

First which processes it takes for the session's, on a /proc written by the test: every one of Ray's and nothing a
user or another user runs, whatever it names. Then the follower run as the YAML runs it, against a stand-in for
one node's Ray: a session directory under RAY_TMPDIR; a ray package on the Python path whose raylet binary (a copy
of sh) names the session on its command line, as Ray's does, and runs an agent; Ray's log monitor (Python running
the package's log_monitor.py); a head that listens or refuses; and beside them, processes that name the session
without being Ray's. The real cluster, `ray up` to `ray down` on three hosts with a link cut and restored, is
tests/test_ray_up.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcgan_dist.distributed import follow_head
from dcgan_dist.distributed.processes import processes
from hosts import available, made_hosts

FOLLOW = [sys.executable, "-m", "dcgan_dist.distributed.follow_head"]
# The agent ignores SIGTERM, as a Ray agent stuck reporting to a GCS that is gone may: SIGKILL has to follow.
AGENT = "trap '' TERM; while :; do sleep 1; done"
RAYLET = f"sh -c \"{AGENT}\" & sleep 600 & wait"


def _alive(pid: int) -> bool:
    return pid in processes()


def _wait(condition, timeout: float, what) -> None:
    """Until condition(); else fail saying what (a callable: what it returns then)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.2)


def _fake_proc(root: Path, entries: list[tuple]) -> Path:
    """A /proc with one folder per (pid, ppid, uid, exe, argv, cwd): stat, cmdline, status, exe and cwd links."""
    for pid, ppid, uid, exe, argv, cwd in entries:
        d = root / str(pid)
        d.mkdir(parents=True)
        comm = Path(argv[0]).name[:15]
        (d / "stat").write_text(f"{pid} ({comm}) S {ppid} {' '.join(['0'] * 17)} {1000 + pid} 0 0\n")
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
        (d / "status").write_text(f"Name:\t{comm}\nPid:\t{pid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        if exe:  # another user's exe is not readable: none
            (d / "exe").symlink_to(exe)
        (d / "cwd").symlink_to(cwd)
    return root


def test_only_the_sessions_ray_processes_of_this_user_are_its(tmp_path):
    """The raylet (by its binary in the installed ray package), Ray's Python programs of the session (by their path
    in it) and what they started, renamed (ray::DashboardAgent, ray::IDLE) or not: selected. A user's `tail -f` of
    a session log, a tmux server started in the session folder and a python under it, a look-alike log_monitor.py
    outside the ray package, another session's raylet, and another user's raylet of this session, with what it
    and this user's raylet started as that user: not selected."""
    ray = follow_head.ray_package()
    session, other_session = tmp_path / "ray" / "session_1", tmp_path / "ray" / "session_2"
    me, them = os.getuid(), os.getuid() + 4242
    raylet, python = str(ray / follow_head.RAYLET), "/usr/bin/python3.11"
    raylet_argv = [raylet, f"--raylet_socket_name={session}/sockets/raylet", f"--session_dir={session}"]
    ray_ = [  # pid, ppid, uid, exe, argv, cwd
        (100, 1, me, raylet, raylet_argv, "/"),
        (101, 1, me, python, ["python3", "-u", str(ray / "_private/log_monitor.py"), f"--session-dir={session}",
                              f"--logs-dir={session}/logs"], "/"),
        (102, 100, me, python, ["ray::DashboardAgent"], "/"),
        (103, 100, me, python, ["ray::RuntimeEnvAgent"], "/"),
        (104, 100, me, python, ["ray::IDLE"], "/"),
        (105, 104, me, python, ["python3", "-c", "from multiprocessing.spawn import spawn_main"], "/"),
        (106, 100, me, python, ["python3", "-u", str(ray / "dashboard/agent.py"), f"--session-dir={session}"], "/"),
    ]
    not_ray = [
        (110, 1, me, "/usr/bin/tail", ["tail", "-f", f"{session}/logs/raylet.out"], "/"),
        (120, 1, me, "/usr/bin/tmux", ["tmux", "new-session", "-d", "-c", str(session)], str(session)),
        (121, 120, me, "/usr/bin/bash", ["-bash"], str(session)),
        (122, 121, me, python, ["python", "train.py", f"--out={session}/x"], str(session)),
        (130, 1, me, python, ["python3", str(tmp_path / "site/ray/_private/log_monitor.py"),
                              f"--session-dir={session}"], "/"),
        (140, 1, me, raylet, [raylet, f"--session_dir={other_session}"], "/"),
        (141, 140, me, python, ["ray::DashboardAgent"], "/"),
        (150, 1, them, "", [raylet, f"--session_dir={session}"], "/"),
        (151, 150, them, "", ["ray::DashboardAgent"], "/"),
        (152, 150, me, python, ["ray::IDLE"], "/"),  # under another user's process
        (107, 100, them, "", ["sudo", "true"], "/"),
    ]
    procs = processes(_fake_proc(tmp_path / "proc", ray_ + not_ray))
    assert len(procs) == len(ray_) + len(not_ray)
    members = follow_head.session_processes(session, procs, ray, me)
    assert sorted(members) == sorted(p[0] for p in ray_)
    assert members[102] == procs[102].start


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run the stop as another user")
def test_a_process_that_may_not_be_signalled_is_reported_and_the_rest_are_stopped():
    """stop() run as nobody over one of root's processes and two of nobody's: the kernel refuses the first
    (PermissionError), which is reported, and the two others are stopped all the same."""
    nobody = 65534
    root_s = subprocess.Popen(["sleep", "600"])
    theirs = [subprocess.Popen(["sleep", "600"], user=nobody, group=nobody) for _ in range(2)]
    try:
        procs = processes()
        members = {p.pid: procs[p.pid].start for p in [root_s, *theirs]}
        read, write = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                os.setgid(nobody)
                os.setuid(nobody)
                result = follow_head.stop(members, grace=1.0)
                os.write(write, json.dumps(result).encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(child, 0)
        with os.fdopen(read) as f:
            said = f.read()
        assert said, "stop() raised"
        signalled, refusals = json.loads(said)
        assert sorted(signalled) == sorted(members) and list(refusals) == [str(root_s.pid)], said
        assert "not permitted" in refusals[str(root_s.pid)]
        for p in theirs:
            p.wait(timeout=10)
        assert root_s.poll() is None
    finally:
        for p in [root_s, *theirs]:
            p.kill()
            p.wait()


def _ray_package(site: Path) -> Path:
    """A ray package on a Python path of its own: a raylet binary (sh, copied) and Ray's log monitor script."""
    ray = site / "ray"
    (ray / follow_head.RAYLET).parent.mkdir(parents=True)
    (ray / "__init__.py").write_text("")
    shutil.copy("/bin/sh", ray / follow_head.RAYLET)
    (ray / "_private").mkdir()
    (ray / "_private" / "log_monitor.py").write_text("import time\ntime.sleep(600)\n")
    return ray


def _start_ray(ray: Path, session: Path) -> tuple[subprocess.Popen, int, subprocess.Popen]:
    """The stand-in's `ray start`: the log monitor, the raylet and the agent the raylet starts."""
    monitor = subprocess.Popen([sys.executable, "-u", str(ray / "_private" / "log_monitor.py"),
                                f"--session-dir={session}", f"--logs-dir={session}/logs"])
    raylet = subprocess.Popen([str(ray / follow_head.RAYLET), "-c", RAYLET, "raylet",
                               f"--raylet_socket_name={session}/sockets/raylet", f"--session_dir={session}"],
                              start_new_session=True)  # its group: what it started, ended with it at the end
    _wait(lambda: any(p.ppid == raylet.pid and "trap" in " ".join(p.argv) for p in processes().values()), 10,
          "the agent did not start")
    agent = next(p.pid for p in processes().values() if p.ppid == raylet.pid and "trap" in " ".join(p.argv))
    return raylet, agent, monitor


@pytest.fixture
def node(tmp_path):
    """A node's Ray session: RAY_TMPDIR/ray/session_latest -> a session with a running raylet, its agent and the
    log monitor; a head listening on a free port; processes that are not Ray's: an unrelated one, a user's
    `tail -f` of a session log, and a shell started in the session folder with a python under it. Yields a
    namespace of them, with the follower's environment (RAY_TMPDIR, and the stand-in ray package on PYTHONPATH)."""
    session = tmp_path / "ray" / "session_2026-12-06_10-00-00_000001_42"
    (session / "logs").mkdir(parents=True)
    (session / "logs" / "raylet.out").write_text("")
    (tmp_path / "ray" / "session_latest").symlink_to(session)
    ray = _ray_package(tmp_path / "site")
    raylet, agent, monitor = _start_ray(ray, session)
    head = socket.socket()
    head.bind(("127.0.0.1", 0))
    head.listen(16)
    others = [subprocess.Popen(["sleep", "600"]),
              subprocess.Popen(["tail", "-f", f"{session}/logs/raylet.out"]),
              subprocess.Popen(["sh", "-c", f"cd {session} && python3 -c 'import time; time.sleep(600)' "
                                            f"--out={session}/x; :"], cwd=session)]
    _wait(lambda: any(p.ppid == others[2].pid for p in processes().values()), 10, "the shell's python")
    under_shell = next(p.pid for p in processes().values() if p.ppid == others[2].pid)
    path = os.pathsep.join(p for p in [str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")] if p)
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path), "PYTHONPATH": path}
    n = type("Node", (), dict(env=env, head=head, session=session, ray=ray, raylet=raylet, agent=agent,
                              monitor=monitor, others=others, under_shell=under_shell, started=[]))
    try:
        yield n
    finally:
        for pid in [agent, under_shell]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in [raylet, *n.started]:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in [raylet, monitor, *others, *n.started]:
            p.kill()
            p.wait()
        head.close()


def _not_rays_alive(n) -> None:
    """What is not Ray's lives on, whatever it names."""
    assert all(p.poll() is None for p in n.others) and _alive(n.under_shell)


def _start(env: dict, head: socket.socket | str, *options: str) -> int:
    """The YAML's command (detaches); the follower's pid, from what it prints."""
    address = head if isinstance(head, str) else f"127.0.0.1:{head.getsockname()[1]}"
    r = subprocess.run([*FOLLOW, address, "--every", "0.3", "--grace", "1", *options], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "following this node's Ray as pid" in r.stdout, r.stdout
    return int(r.stdout.split("as pid ")[1].split(";")[0])


def _log(n) -> str:
    return (n.session / "logs" / "dcgan_follow_head.log").read_text()


def test_a_refusing_head_stops_the_session_and_nothing_else(node):
    """While the head answers, nothing happens; once it refuses (the cluster was taken down), the raylet, its
    agent (which ignores SIGTERM: by SIGKILL) and the log monitor are stopped, what is not Ray's lives on, and the
    follower exits and says why in the session's log."""
    n = node
    follower = _start(n.env, n.head)
    time.sleep(2)  # several looks with the head answering
    assert n.raylet.poll() is None and _alive(n.agent) and _alive(follower)
    n.head.close()
    _wait(lambda: n.raylet.poll() is not None and n.monitor.poll() is not None and not _alive(n.agent), 20,
          "the session was not stopped")
    _wait(lambda: not _alive(follower), 10, "the follower did not exit")
    _not_rays_alive(n)
    log = _log(n)
    assert "refused 3 connections in a row (cluster down)" in log and str(n.agent) in log, log


def test_a_raylet_restarted_in_the_session_is_followed_too(node):
    """The raylet killed (as the GCS makes it exit once a partition heals): what it left (its agent, the log
    monitor) is stopped; the follower stays, and a raylet started again in the same session (the head's
    autoscaler running the start commands again) is followed as the first was: the head refusing stops it and its
    agent. With no raylet for --linger seconds, the follower gives up."""
    n = node
    follower = _start(n.env, n.head, "--linger", "30")
    n.raylet.kill()
    n.raylet.wait()
    # The follower writes its line after the processes are gone: wait for both (CI once read the log in between).
    _wait(lambda: not _alive(n.agent) and n.monitor.poll() is not None
          and "this node's raylet has exited; stopped" in _log(n), 20,
          lambda: f"the raylet's agent was left running, or not reported: {_log(n)}")
    assert _alive(follower)
    raylet, agent, monitor = _start_ray(n.ray, n.session)
    n.started += [raylet, monitor]
    time.sleep(1)
    n.head.close()
    _wait(lambda: raylet.poll() is not None and monitor.poll() is not None and not _alive(agent), 20,
          lambda: f"the restarted raylet was not stopped: {_log(n)}")
    _wait(lambda: not _alive(follower), 10, "the follower did not exit")
    _not_rays_alive(n)
    assert "refused 3 connections in a row (cluster down)" in _log(n)


def test_with_no_raylet_for_linger_seconds_the_follower_gives_up(node):
    """`ray stop` on the node (no restart follows): what is left is stopped and, --linger seconds on, the follower
    exits."""
    n = node
    follower = _start(n.env, n.head, "--linger", "2")
    n.raylet.kill()
    n.raylet.wait()
    _wait(lambda: not _alive(n.agent) and not _alive(follower), 20,
          lambda: f"the follower did not stop and exit: {_log(n)}")
    _not_rays_alive(n)
    assert "no raylet of the session ran on this node for 2 s" in _log(n), _log(n)


@pytest.mark.parametrize("planted", ["a link of another user", "a link out of the temp dir", "the log a link"])
def test_what_others_planted_in_the_world_writable_temp_dir_is_not_followed(node, tmp_path, planted):
    """Ray's temp dir and session folders are writable for everyone: a session_latest link that is not this
    user's, or that points out of the temp dir, is not followed; nor is a log that is a link (the file it points to
    is left as it was). The follower says so and exits 1, nothing detached."""
    n = node
    latest = tmp_path / "ray" / "session_latest"
    victim = tmp_path / "victim"
    victim.write_text("mine\n")
    if planted == "a link of another user":
        os.lchown(latest, os.getuid() + 4242, -1)
        said = "is not a link made by this user"
    elif planted == "a link out of the temp dir":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.symlink_to(n.session)
        latest.unlink()
        latest.symlink_to(elsewhere)
        said = "not to a session folder of"
    else:
        (n.session / "logs" / "dcgan_follow_head.log").symlink_to(victim)
        said = "cannot write the follower's log"
    r = subprocess.run([*FOLLOW, f"127.0.0.1:{n.head.getsockname()[1]}"], env=n.env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1 and said in r.stderr, r.stdout + r.stderr
    assert victim.read_text() == "mine\n"
    assert n.raylet.poll() is None and _alive(n.agent)


@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_a_head_behind_a_cut_link_is_not_a_cluster_taken_down(node):
    """The head on a test host with an address of its own, its link then set down: no answer at all is a
    partition (Ray's health checks decide about the node), not a refusal, so the follower keeps the session."""
    n = node
    with made_hosts(1) as (host,):
        host.popen(sys.executable, "-c", "import socket, time\ns = socket.socket()\ns.bind(('0.0.0.0', 6379))\n"
                   "s.listen()\ntime.sleep(600)")
        _wait(lambda: subprocess.run(["nc", "-z", host.address, "6379"]).returncode == 0, 10, "no listener")
        follower = _start(n.env, f"{host.address}:6379", "--linger", "5")
        host.cut()
        time.sleep(6)  # 20 looks of 0.3 s, each unanswered
        assert n.raylet.poll() is None and _alive(n.agent) and _alive(follower)


def test_started_before_ray_it_says_what_is_missing(tmp_path):
    """No session (ray start has not run, or failed): an error naming the session, exit 1, nothing detached."""
    r = subprocess.run([*FOLLOW, "10.0.0.10:6379"], env={**os.environ, "RAY_TMPDIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert f"no Ray session to follow: {tmp_path}/ray/session_latest does not exist" in r.stderr, r.stderr
    r = subprocess.run([*FOLLOW, "10.0.0.10"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "'10.0.0.10' is not HOST:PORT" in r.stderr, r.stderr
