"""A worker node's Ray follows its head's: when the cluster is taken down, nothing of it stays on the node.

`ray down` of a cluster on your own machines (Ray's `local` provider, cluster/local.yaml) runs `ray stop` on the
head only; for the worker machines it merely marks them free in a state file (Ray 2.60's
LocalNodeProvider.terminate_node runs nothing on them). Each worker's raylet then lives on until it gives up on
the head's GCS (60 s), and its dashboard and runtime-env agents and its log monitor outlive it (they try to
report its death to the GCS that is gone): measured on test hosts, they were all still running minutes later.

cluster/local.yaml therefore starts this follower on every worker, right after `ray start`:

    python -m dcgan_dist.distributed.follow_head $RAY_HEAD_IP:6379

It detaches, and every `--every` seconds it looks at this node's Ray session (the one `ray start` just made, by
RAY_TMPDIR/ray/session_latest) and at the head's GCS port.

- When the head *refuses* `--refusals` connections in a row (the head machine answers and no GCS listens: the
  cluster was taken down, by `ray down` or `ray stop` on the head), it stops the session's processes (SIGTERM,
  then SIGKILL after `--grace` seconds) and exits. A head that does not answer at all (a cut link, a machine that
  is gone) is not a refusal: that is a node failure, which Ray's own health checks handle, and the follower waits.
- When the session's raylet has exited (`ray stop` here; the raylet giving up on a lost head; or, once a cut link
  is restored, the GCS telling it that its node was declared dead meanwhile), it stops what the raylet left (its
  agents, the log monitor, workers) and waits for a new raylet of the same session: the head's autoscaler runs
  the start commands here again after a partition, and the new raylet joins the same session. It follows that
  one as the first, also when `ray down` came before the restart's own follower could start. After `--linger`
  seconds with no raylet it exits.

What it stops, and nothing else: the processes of the session it follows that are Ray's, run by this user, and
what those started (run by this user too). Ray's are the raylet binary of the ray package this Python imports (by
its executable) and Python running one of Ray's programs in that package (log monitor, agents, workers), each with
the session folder among its options; the agents and workers rename themselves once started, so they are known
as what the raylet started, from the follower's first look on. A command that merely names the session (a user's
`tail -f` of a log, a shell or tmux started in the session folder, and what runs in them), another user's
process, and another session's are never touched. A process that may not be signalled is named in the log, and
the others are stopped all the same. Ray's temp dir and session folders are writable for everyone: the
session_latest link is followed only when this user made it and it names a folder of this user's in the temp dir,
and the follower's log is opened without following links.

A head restarted in place also refuses for a while; without GCS fault tolerance (an external Redis, which
cluster/local.yaml does not set up) the workers' raylets cannot rejoin it anyway. With it, raise `--refusals` to
outlast the GCS's restart, or drop the follower.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

from .processes import Process, living, processes, send
from .ray_files import latest_session

RAYLET = "core/src/ray/raylet/raylet"
LOG = "dcgan_follow_head.log"  # in the session's logs folder, beside Ray's own
# The Python programs Ray starts on a worker node, by their place in the ray package. The agents and the workers
# rename themselves once started (setproctitle: ray::DashboardAgent, ray::IDLE): those are known as what the
# raylet started, and remembered from then on, also once the raylet is gone and they are not its children any more.
SCRIPTS = ("_private/log_monitor.py", "dashboard/agent.py", "_private/runtime_env/agent/main.py",
           "_private/workers/setup_worker.py", "_private/workers/default_worker.py")


def ray_package() -> Path:
    """The folder of the ray package this Python would import, found without importing it (seconds)."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("Ray is not installed in this Python environment")
    return Path(spec.submodule_search_locations[0])


def _names_session(argv: tuple[str, ...], session: Path) -> bool:
    """Whether an option of argv gives the session folder or a path in it, as Ray's do (--session-dir=...)."""
    for arg in argv[1:]:
        option, eq, value = arg.partition("=")
        if eq and option.startswith("--") and (value == str(session) or value.startswith(f"{session}/")):
            return True
    return False


def is_raylet(p: Process, ray: Path) -> bool:
    """Whether p runs the raylet binary of the ray package (by its executable, which a command line cannot fake)."""
    return bool(p.exe) and os.path.realpath(p.exe) == os.path.realpath(ray / RAYLET)


def is_ray(p: Process, session: Path, ray: Path) -> bool:
    """Whether p is one of Ray's own processes of the session: the raylet, or Python running one of Ray's programs,
    with the session folder among its options."""
    if not _names_session(p.argv, session):
        return False
    if is_raylet(p, ray):
        return True
    script = next((arg for arg in p.argv[1:] if not arg.startswith("-")), "")
    return (os.path.basename(p.exe).startswith("python") and script.endswith(SCRIPTS)
            and os.path.realpath(script) in {os.path.realpath(ray / s) for s in SCRIPTS})


def session_processes(session: Path, procs: dict[int, Process], ray: Path, uid: int) -> dict[int, int]:
    """pid -> start of the session's Ray processes run by uid, and of everything they started that uid runs too
    (never this process). Nothing else, whatever its command line names: a user's `tail -f` of a session log, or a
    shell started in the session folder, and what runs under them, are not Ray's."""
    mine = {pid: p for pid, p in procs.items() if set(p.uids) == {uid} and pid != os.getpid()}
    members = {pid for pid, p in mine.items() if is_ray(p, session, ray)}
    children: dict[int, list[int]] = {}
    for p in mine.values():
        children.setdefault(p.ppid, []).append(p.pid)
    todo = list(members)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in members:
                members.add(child)
                todo.append(child)
    return {pid: procs[pid].start for pid in members}


def refused(host: str, port: int, timeout: float) -> bool:
    """Whether the head's machine answered that nothing listens on the port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:  # unreachable or no answer: a partition or a lost machine, not a taken-down cluster
        return False


def stop(members: dict[int, int], grace: float) -> tuple[list[int], dict[int, str]]:
    """SIGTERM the members still alive, SIGKILL those left after grace seconds; the pids signalled, and those that
    could not be (pid -> why: the others are stopped all the same)."""
    signalled = list(living(members))
    refusals: dict[int, str] = {}
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        refusals.update(send([pid for pid in living(members) if pid not in refusals], sig))
        deadline = time.monotonic() + wait
        while set(living(members)) - set(refusals) and time.monotonic() < deadline:
            time.sleep(0.2)
    return signalled, refusals


def _stopped(members: dict[int, int], grace: float, session: Path) -> str:
    """Stop members; say what was stopped and what could not be."""
    signalled, refusals = stop(members, grace)
    said = f"stopped {len(signalled)} processes of {session.name}: {sorted(signalled)}"
    return said + "".join(f"; could not signal {pid}: {why}" for pid, why in sorted(refusals.items()))


def follow(head: tuple[str, int], session: Path, ray: Path, every: float, refusals: int, grace: float,
           linger: float, members: dict[int, int]) -> str:
    """Watch the session until the cluster is down, stopping what a raylet that exited left; say why it ended.

    The session, not one raylet: after a partition heals, the GCS tells this node's raylet that the node was
    declared dead and it exits; the head's autoscaler then runs the start commands here again, and the new raylet
    joins the same session. Its processes are followed as the first's were, also when what started them here (the
    autoscaler's SSH session) ended before it could start a follower of its own (`ray down` meanwhile).
    members: those known already (pid -> start), as what the raylet started: once it is gone, they are orphans that
    nothing else identifies."""
    in_a_row = 0
    unled: dict[int, int] = {}  # pid -> looks in a row that saw it with no raylet running
    raylet_seen = time.monotonic()
    while True:
        procs = processes()
        members = living({**members, **session_processes(session, procs, ray, os.getuid())}, procs)
        in_a_row = in_a_row + 1 if refused(*head, timeout=every) else 0
        if in_a_row >= refusals:
            why = f"the head's GCS at {head[0]}:{head[1]} refused {in_a_row} connections in a row (cluster down)"
            break
        if any(is_raylet(procs[pid], ray) for pid in members):
            unled, raylet_seen = {}, time.monotonic()
        else:
            unled = {pid: unled.get(pid, 0) + 1 for pid in members}
            # Seen twice with no raylet: left by one that exited, not started just before a new one (`ray start`
            # starts the log monitor first).
            left = {pid: start for pid, start in members.items() if unled[pid] >= 2}
            if left:
                print(f"follow_head: this node's raylet has exited; {_stopped(left, grace, session)}", flush=True)
                members = {pid: start for pid, start in members.items() if pid not in left}
            if time.monotonic() - raylet_seen >= linger:
                why = f"no raylet of the session ran on this node for {linger:.0f} s"
                break
        time.sleep(every)
    return f"{why}; {_stopped(members, grace, session)}"


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (the head's GCS, e.g. $RAY_HEAD_IP:6379)")
    return host, int(port)


def open_log(session: Path) -> int:
    """The follower's log, LOG in the session's logs folder, opened for appending without following a link at any
    step and only where this user owns folder, logs folder and file: Ray makes its session folders writable for
    everyone, so anyone could have planted a link (or a FIFO, which O_NONBLOCK refuses) there."""
    fds = [os.open(session, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)]
    try:
        fds.append(os.open("logs", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
        fds.append(os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644,
                           dir_fd=fds[-1]))
        for fd, what in zip(fds, (session, session / "logs", session / "logs" / LOG)):
            info = os.fstat(fd)
            if info.st_uid != os.getuid() or (fd == fds[-1] and not stat.S_ISREG(info.st_mode)):
                raise PermissionError(f"{what} is not this user's (uid {os.getuid()})")
        return fds.pop()
    finally:
        for fd in fds:
            os.close(fd)


def _detach(log: int, path: Path) -> bool:
    """Fork into the background (a new session, output to the log fd); True in the follower, False in the caller."""
    ready_r, ready_w = os.pipe()
    first = os.fork()
    if first:
        os.close(ready_w)
        pid = os.read(ready_r, 32).decode()
        os.waitpid(first, 0)
        print(f"follow_head: following this node's Ray as pid {pid}; log: {path}")
        return False
    os.close(ready_r)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.write(ready_w, str(os.getpid()).encode())
    os.close(ready_w)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcgan_dist.distributed.follow_head",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("head", type=_address, help="the head's GCS address, HOST:PORT ($RAY_HEAD_IP:6379)")
    parser.add_argument("--session", type=Path, default=None,
                        help="the Ray session to follow (default: the newest one, RAY_TMPDIR/ray/session_latest)")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between looks (default 2)")
    parser.add_argument("--refusals", type=int, default=3,
                        help="refused connections in a row that mean the cluster is down (default 3)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL of what is left (default 10)")
    parser.add_argument("--linger", type=float, default=300.0,
                        help="seconds to wait for a new raylet of the session (the head's autoscaler restarting "
                             "this node) after the last one exited, before giving up (default 300)")
    parser.add_argument("--foreground", action="store_true", help="stay attached (default: detach)")
    args = parser.parse_args(argv)
    try:
        ray = ray_package()
        session = args.session.resolve() if args.session else latest_session()
    except ValueError as err:
        print(f"error: no Ray session to follow: {err}; start `python -m dcgan_dist.distributed.follow_head` after "
              f"`ray start`", file=sys.stderr)
        return 1
    procs = processes()
    members = session_processes(session, procs, ray, os.getuid())
    if not any(is_raylet(procs[pid], ray) for pid in members):
        print(f"error: no raylet of the Ray session {session} runs on this node as this user: start "
              f"`python -m dcgan_dist.distributed.follow_head` after `ray start`", file=sys.stderr)
        return 1
    if not args.foreground:
        try:
            log = open_log(session)
        except OSError as err:
            print(f"error: cannot write the follower's log in {session / 'logs'}: {err}", file=sys.stderr)
            return 1
        if not _detach(log, session / "logs" / LOG):
            return 0
    print(f"follow_head: following {session} (head {args.head[0]}:{args.head[1]}, ray {ray})", flush=True)
    why = follow(args.head, session, ray, args.every, args.refusals, args.grace, args.linger, members)
    print(f"follow_head: {why}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
