"""Files that appear whole or not at all: written under a temporary name, fsynced, renamed, directory fsynced.

Every writer of the project that must survive a kill or a full disk (checkpoints, shards, manifests, progress
records, configs) goes through atomic_open, so there is one durability rule: after it returns, the file and its
name are on disk. Temporary names carry TMP_TAG (and the writer's pid, so that writers never collide): clean-up
removes every tagged file under a folder, whichever process left it, and nothing else. So it is for a folder the
caller alone writes to: one that it holds with one_writer(), as the shard tool holds OUTDIR and the trainer its
run_dir.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

TMP_TAG = ".dcgan-tmp-"
LOCK = ".lock"


class Busy(Exception):
    """Another process holds the folder (one_writer); the message names the folder and the holder."""


@contextmanager
def one_writer(folder: str | Path, what: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold folder for this process: another process asking for it meanwhile gets Busy, naming the holder's pid,
    instead of both writing (and deleting) the same files. A POSIX record lock belongs to this process alone
    (forked workers do not inherit it, as they would a flock) and the kernel drops it when the process dies, so a
    killed run never blocks. what: how the user names the folder (OUTDIR, run_dir), for the messages; wait_s: how
    long to wait for the holder to let go before Busy."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    deadline, said = time.monotonic() + wait_s, False
    try:  # not through a link planted at the name: truncating it would truncate the link's target
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise Busy(f"cannot hold {what} {folder}: cannot open {folder / LOCK}: {err.strerror}") from None
    with os.fdopen(fd, "r+") as f:
        while True:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                f.seek(0)
                holder = f.read().strip() or "another process"
            if time.monotonic() >= deadline:
                raise Busy(f"{what} {folder} is being written by {holder}; wait for it to finish or choose "
                           f"another {what}")
            if not said:
                print(f"dcgan_dist: {what} {folder} is held by {holder}; waiting up to {wait_s:g} s for it to let "
                      f"go", file=sys.stderr, flush=True)
                said = True
            time.sleep(0.5)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.lockf(f, fcntl.LOCK_UN)


def temporary_name(path: Path) -> Path:
    """A hidden sibling of path, unique to this process and call."""
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(directory: Path) -> None:
    """Make a rename in directory durable (a no-op where the OS cannot fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file to write; it replaces path only if the block completes, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "xb") as f:  # O_EXCL: never through a link planted at the name
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def remove_temporaries(directory: str | Path) -> int:
    """Delete the temporaries that killed writers of any process left under directory; return how many."""
    removed = 0
    for p in Path(directory).rglob(f"*{TMP_TAG}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed += 1
    return removed
