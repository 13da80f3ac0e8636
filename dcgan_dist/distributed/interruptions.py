"""How a run is interrupted from outside, between a launcher (ray_launch.py) and the training loop.

- Node preemption notices: the launcher hands the loop a probe; every rank calls it at each log interval, equally
  often (under Ray it is a barrier), and gets the notice, the same on every rank, or None. On a notice the loop
  writes a just-in-time checkpoint and raises Preempted, which the launcher catches to wait for the cluster to
  restart the group.
- Stops: SIGTERM or SIGINT (to this process, or to a launcher's driver, which passes it on through a StopProbe)
  make the loop write a checkpoint at the count reached and raise Stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Notice:
    """A preemption notice: the line the logs show, and what the launcher waits on before the group restarts."""
    text: str
    deadline: float          # when the nodes are reclaimed, UNIX seconds
    nodes: frozenset[str]    # the reclaimed nodes' IDs

    def __str__(self) -> str:
        return self.text


# Called on every rank at every log interval, equally often: a preemption notice or None.
PreemptionProbe = Callable[[], Optional[Notice]]
# Called on every rank at every log interval: the signal number a launcher's driver was stopped with, or 0.
StopProbe = Callable[[], int]


class Preempted(Exception):
    """A node of this run is being reclaimed: the loop wrote a just-in-time checkpoint at `images` and stopped
    stepping (any step after it would be lost when the cluster restarts the group)."""

    def __init__(self, notice: Notice, images: int):
        super().__init__(f"{notice}; just-in-time checkpoint at {images} images")
        self.notice, self.images = notice, images


class Stopped(Exception):
    """The run stopped on a signal after writing its checkpoint; the exit status is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
