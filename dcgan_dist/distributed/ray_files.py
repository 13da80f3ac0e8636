"""Where Ray keeps its files on this machine, by Ray's own rule: RAY_TMPDIR, else TMPDIR, else /tmp, then ray/.

Apart from ray_launch so that the node-side follower (follow_head) needs no import of Ray.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def ray_temp_dir() -> Path:
    """Where `ray start` (without --temp-dir) puts its sessions and its record of the cluster."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray"


def current_cluster_file() -> Path:
    """The address of the cluster `ray start` started or joined on this machine; `ray stop` removes it."""
    return ray_temp_dir() / "ray_current_cluster"


def latest_session() -> Path:
    """The session `ray start` last made on this machine, by RAY_TMPDIR/ray/session_latest, trusted only as far as
    this user made it: the temp dir is world-writable (Ray makes it so), and anyone may plant a link there. The link
    must be this user's and name a folder of this user's, not a link, directly inside the temp dir; else ValueError."""
    temp = ray_temp_dir()
    link = temp / "session_latest"
    _owned(link, stat.S_ISLNK, f"{link} does not exist", f"{link} is not a link made by this user")
    target = Path(os.path.normpath(temp / os.readlink(link)))
    if target.parent != Path(os.path.normpath(temp)) or not target.name.startswith("session_"):
        raise ValueError(f"{link} points to {target}, not to a session folder of {temp}")
    _owned(target, stat.S_ISDIR, f"{link} points to {target}, which does not exist",
           f"{target} is not a folder of this user's")
    return target


def _owned(path: Path, is_kind, missing: str, foreign: str) -> None:
    """ValueError unless path itself (not what a link names) exists, is_kind(mode) and belongs to this user."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ValueError(missing) from None
    if not is_kind(info.st_mode) or info.st_uid != os.getuid():
        raise ValueError(f"{foreign} (uid {os.getuid()})")
