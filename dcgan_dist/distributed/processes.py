"""This machine's processes as /proc shows them (Linux), for what must find or stop processes by their parent, owner,
executable or command line: the follower of a worker node's Ray (follow_head) and the exit at a second signal
(interruptions)."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    start: int          # clock ticks after boot: with the pid, it names one process (pids are reused)
    comm: str
    argv: tuple[str, ...]
    uids: tuple[int, ...]  # real, effective, saved and file-system uid
    exe: str            # the executable's path; "" where it may not be read (another user's process)
    state: str = "?"    # /proc's one-letter state: R running, S sleeping, D uninterruptible, T/t stopped


def processes(proc: Path = Path("/proc")) -> dict[int, Process]:
    """This machine's live processes (zombies are gone: they only wait to be reaped), from /proc."""
    found: dict[int, Process] = {}
    if not proc.is_dir():  # not Linux: nothing to find
        return found
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes().rstrip(b"\0")
            status = Path(entry.path, "status").read_text()
        except OSError:  # exited meanwhile
            continue
        try:
            exe = os.readlink(Path(entry.path, "exe")).removesuffix(" (deleted)")  # replaced since it started
        except OSError:  # not ours to read, a kernel thread, or exited meanwhile
            exe = ""
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        uids = next((line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")), [])
        if fields[0] in ("Z", "X") or not uids:
            continue
        pid = int(entry.name)
        argv = tuple(cmdline.decode(errors="replace").split("\0")) if cmdline else ()
        found[pid] = Process(pid, int(fields[1]), int(fields[19]), comm, argv, tuple(int(u) for u in uids), exe,
                             fields[0])
    return found


def living(members: dict[int, int], procs: dict[int, Process] | None = None) -> dict[int, int]:
    """Those of members (pid -> start) still running as the same processes (a pid may be reused)."""
    procs = processes() if procs is None else procs
    return {pid: start for pid, start in members.items() if pid in procs and procs[pid].start == start}


def send(pids, sig: int) -> dict[int, str]:
    """Signal each of pids; one that has exited meanwhile is passed over, one that may not be signalled is named in
    what is returned (pid -> why) and the others are signalled all the same."""
    refused: dict[int, str] = {}
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as err:
            refused[pid] = err.strerror
    return refused


def kill_children(wait: float = 2.0) -> None:
    """SIGKILL this process's children (data-loader workers) and reap them, waiting up to `wait` seconds: a child
    that outlives an os._exit would print the traceback of its broken connection to the parent. A signal is
    delivered asynchronously, so only the reaping says the child is gone before this process goes."""
    me = os.getpid()
    children = [pid for pid, proc in processes().items() if proc.ppid == me]
    # torch's DataLoader handles SIGCHLD by raising that a worker was killed: not now, this process is going. (Only
    # the main thread may set it; from another, the hang watchdog's, the main thread is stuck and runs no handler.)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    send(children, signal.SIGKILL)
    deadline = time.monotonic() + wait
    for pid in children:
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:  # reaped already (multiprocessing's own bookkeeping)
                break
            time.sleep(0.01)
