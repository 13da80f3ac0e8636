"""A worker node's Ray follows its head's: when the cluster is taken down, nothing of it stays on the node.

`ray down` of a cluster on your own machines (Ray's `local` provider, cluster/local.yaml) runs `ray stop` on the
head only; for the worker machines it merely marks them free in a state file (Ray 2.60's
LocalNodeProvider.terminate_node runs nothing on them). Each worker's raylet then lives on until it gives up on
the head's GCS (60 s), and its dashboard and runtime-env agents and its log monitor outlive it (they try to
report its death to the GCS that is gone): measured on test hosts, they were all still running minutes later.

cluster/local.yaml therefore starts this follower on every worker, right after `ray start`:

    python -m dcgan_dist.distributed.follow_head $RAY_HEAD_IP:6379

It detaches, and every `--every` seconds it looks at this node's Ray session (the one `ray start` just made) and
at the head's GCS port. It stops the session's processes (raylet, agents, log monitor, workers: SIGTERM, then
SIGKILL after `--grace` seconds) and exits when

- the head *refuses* `--refusals` connections in a row: the head machine answers and no GCS listens, i.e. the
  cluster was taken down (`ray down`, `ray stop` on the head). A head that does not answer at all (a cut link,
  a machine that is gone) is not a refusal: that is a node failure, which Ray's own health checks handle, and
  the follower waits;
- the session's raylet has exited (`ray stop` here, or the raylet gave up on a lost head): whatever of the
  session is left is stopped with it.

It only ever stops processes of the session it follows (found by the session directory on their command line,
and everything they started), so a follower left from an earlier `ray start` never touches a newer session.

A head restarted in place also refuses for a while; without GCS fault tolerance (an external Redis, which
cluster/local.yaml does not set up) the workers' raylets cannot rejoin it anyway. With it, raise `--refusals` to
outlast the GCS's restart, or drop the follower.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

from .processes import Process, living, processes, send
from .ray_files import ray_temp_dir


def session_processes(session: Path, procs: dict[int, Process]) -> dict[int, int]:
    """pid -> start of the session's processes: those naming its directory, and everything they started (never
    this process, which may name it too)."""
    names = re.compile(re.escape(str(session)) + r"(/|\s|$)")
    members = {p.pid for p in procs.values() if names.search(p.cmdline) and p.pid != os.getpid()}
    children: dict[int, list[int]] = {}
    for p in procs.values():
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


def stop(members: dict[int, int], grace: float) -> list[int]:
    """SIGTERM the members still alive, SIGKILL those left after grace seconds; the pids signalled."""
    signalled = list(living(members))
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        send(living(members), sig)
        deadline = time.monotonic() + wait
        while living(members) and time.monotonic() < deadline:
            time.sleep(0.2)
    return signalled


def follow(head: tuple[str, int], session: Path, every: float, refusals: int, grace: float) -> str:
    """Watch until the cluster is down or the session's raylet is gone, stop what is left; say why."""
    members: dict[int, int] = {}
    in_a_row = 0
    while True:
        procs = processes()
        members = living({**members, **session_processes(session, procs)}, procs)
        if not any(procs[pid].comm == "raylet" for pid in members):
            why = "this node's raylet has exited"
            break
        in_a_row = in_a_row + 1 if refused(*head, timeout=every) else 0
        if in_a_row >= refusals:
            why = f"the head's GCS at {head[0]}:{head[1]} refused {in_a_row} connections in a row (cluster down)"
            break
        time.sleep(every)
    signalled = stop(members, grace)
    return f"{why}; stopped {len(signalled)} processes of {session.name}: {sorted(signalled)}"


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (the head's GCS, e.g. $RAY_HEAD_IP:6379)")
    return host, int(port)


def _detach(log: Path) -> bool:
    """Fork into the background (a new session, output to log); True in the follower, False in the caller."""
    ready_r, ready_w = os.pipe()
    first = os.fork()
    if first:
        os.close(ready_w)
        pid = os.read(ready_r, 32).decode()
        os.waitpid(first, 0)
        print(f"follow_head: following this node's Ray as pid {pid}; log: {log}")
        return False
    os.close(ready_r)
    os.setsid()
    if os.fork():
        os._exit(0)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
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
    parser.add_argument("--foreground", action="store_true", help="stay attached (default: detach)")
    args = parser.parse_args(argv)
    session = (args.session or ray_temp_dir() / "session_latest").resolve()
    procs = processes()
    if not any(procs[pid].comm == "raylet" for pid in session_processes(session, procs)):
        print(f"error: no raylet of the Ray session {session} runs on this node: start "
              f"`python -m dcgan_dist.distributed.follow_head` after `ray start`", file=sys.stderr)
        return 1
    if not args.foreground and not _detach(session / "logs" / "dcgan_follow_head.log"):
        return 0
    print(f"follow_head: following {session} (head {args.head[0]}:{args.head[1]})", flush=True)
    print(f"follow_head: {follow(args.head, session, args.every, args.refusals, args.grace)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
