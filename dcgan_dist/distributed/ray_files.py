"""Where Ray keeps its files on this machine, by Ray's own rule: RAY_TMPDIR, else TMPDIR, else /tmp, then ray/.

Apart from ray_launch so that the node-side follower (follow_head) needs no import of Ray.
"""

from __future__ import annotations

import os
from pathlib import Path


def ray_temp_dir() -> Path:
    """Where `ray start` (without --temp-dir) puts its sessions and its record of the cluster."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray"


def current_cluster_file() -> Path:
    """The address of the cluster `ray start` started or joined on this machine; `ray stop` removes it."""
    return ray_temp_dir() / "ray_current_cluster"
