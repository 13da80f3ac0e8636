"""Node preemption notices between a launcher that hears of them (ray_launch.py) and the training loop.

The launcher hands the loop a probe; every rank calls it at each log interval, equally often (under Ray it is a
barrier), and gets the notice, the same on every rank, or None. On a notice the loop writes a just-in-time
checkpoint and raises Preempted, which the launcher catches to wait for the cluster to restart the group.
"""

from __future__ import annotations

from typing import Callable, Optional

# Called on every rank at every log interval, equally often: a preemption notice (one line) or None.
PreemptionProbe = Callable[[], Optional[str]]


class Preempted(Exception):
    """A node of this run is being reclaimed: the loop wrote a just-in-time checkpoint at `images` and stopped
    stepping (any step after it would be lost when the cluster restarts the group)."""

    def __init__(self, notice: str, images: int):
        super().__init__(f"{notice}; just-in-time checkpoint at {images} images")
        self.notice, self.images = notice, images
