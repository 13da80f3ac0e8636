"""Files that appear whole or not at all: written under a temporary name, fsynced, renamed, directory fsynced.

Every writer of the project that must survive a kill or a full disk (checkpoints, shards, manifests, progress
records, configs) goes through atomic_open, so there is one durability rule: after it returns, the file and its
name are on disk. Temporary names carry TMP_TAG (and the writer's pid, so that writers never collide): clean-up
removes every tagged file under a folder, whichever process left it, and nothing else. So it is for a folder the
caller alone writes to, as the shard tool's locked OUTDIR.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

TMP_TAG = ".dcgan-tmp-"


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
        with open(tmp, "wb") as f:
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
