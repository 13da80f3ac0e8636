"""How a run is interrupted from outside, between a launcher (ray_launch.py) and the training loop.

- Node preemption notices: the launcher hands the loop a probe; every rank calls it at each log interval, equally
  often (under Ray it is a barrier), and gets the notice, the same on every rank, or None. On a notice the loop
  writes a just-in-time checkpoint and raises Preempted, which the launcher catches to wait for the cluster to
  restart the group.
- Stops: SIGTERM, SIGINT or SIGHUP (to this process, or to a launcher's driver, which passes it on through a
  StopProbe) make the loop write a checkpoint at the count reached and raise Stopped. SIGHUP is a closed terminal
  (an SSH session that dropped): the run keeps its work, as on a SIGTERM. Under nohup it stays ignored.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import termios
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from .processes import kill_children

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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


class StopRequest:
    """SIGNALS for the duration of a run (main thread only: Python delivers signals there): the first sets
    `signum`, says `what` happens now and calls on_first(signum) if given; a second exits at once."""

    def __init__(self, what: str = "writing a checkpoint at the next step boundary, then stopping",
                 on_first: Callable[[int], None] | None = None):
        self.signum, self.what, self.on_first = 0, what, on_first
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                if s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN:
                    continue  # started under nohup: the user asked for the run to outlive the terminal
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def request(self, signum: int, source: str) -> None:
        """A stop asked for elsewhere (the launcher's driver heard the signal): as if this process had."""
        if signum and not self.signum:
            self.signum = signum
            print(f"dcgan_dist: {signal.Signals(signum).name} to {source}: writing a checkpoint at this log interval, "
                  f"then stopping", file=sys.stderr, flush=True)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGHUP:
            _leave_hung_up_terminal()
        if self.signum:
            print(f"dcgan_dist: second {signal.Signals(signum).name}: exiting at once", file=sys.stderr, flush=True)
            kill_children()
            os._exit(128 + signum)
        self.signum = signum
        if self.on_first is not None:
            self.on_first(signum)
        print(f"dcgan_dist: {signal.Signals(signum).name}: {self.what} (send it again to exit at once)",
              file=sys.stderr, flush=True)


def _leave_hung_up_terminal() -> None:
    """After a hangup every write to the terminal fails (EIO), and the first print would end the run before its
    checkpoint: stdout and stderr on a terminal that hung up go to /dev/null (nobody could read them). A terminal
    still there (a SIGHUP sent by hand) is kept: only a hung-up one fails tcgetattr with EIO."""
    for fd in (1, 2):
        try:
            termios.tcgetattr(fd)
        except termios.error as err:
            if err.args[0] == errno.EIO:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)
