"""How a run stops before its target, in one place: who asks, what the loop does, what the process exits with.

Who asks. A signal to the trainer's process (SIGTERM, SIGINT, or SIGHUP: a closed terminal, an SSH session that
dropped; under nohup it stays ignored) sets StopRequest's flag. A signal to a launcher's driver (`ray job stop`,
Ctrl-C on the driver) sets the driver's StopRequest, which passes it on to every rank through the launcher's stop
probe. A node preemption notice comes through the launcher's preemption probe. A hung rank is found by the
watchdog on every rank (watchdog.py).

What the loop does. Once per log interval, on every rank equally often (a single process also after every step),
the loop asks Interrupts.at_interval: the ranks agree through the interval's one reduction, so the answer, an
Interruption or None, is the same on every rank. On one the loop writes a checkpoint at the count reached and
raises Interruption.error(): Stopped for a signal, Preempted for a notice. A hang cannot wait for the loop (the loop
is stuck in a read or a collective): the watchdog of every rank that can still run writes its report and ends the
process with EXIT_HUNG, and the newest checkpoint is where the next attempt starts.

What follows (exit_status). Stopped: the process exits with 128 + the signal number; under Ray each rank returns
normally after its checkpoint and the driver exits so. Preempted: the Ray worker waits until the reclaimed node is
gone and Ray restarts the group without it. A hang: EXIT_HUNG, a failure for the launcher, so Ray restarts the group
from the newest checkpoint (counted against trainer.max_failures) and torchrun restarts it (--max-restarts).

So SIGTERM under Ray (`ray job stop` signals the driver): the driver's StopRequest sets the launcher's stop flag;
each rank's stop probe reads it at its next log interval; the ranks agree, write one checkpoint, return; the driver
raises Stopped and exits with status 143. A second signal to the same process exits at once (128 + signal).
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


# The exit status of a process that ended a hung run (as `timeout` ends a command that ran past its limit).
EXIT_HUNG = 124


@dataclass(frozen=True)
class Interruption:
    """What the ranks agreed at a log interval: a stop by signal (signum) or a preemption notice."""
    signum: int = 0
    notice: Notice | None = None

    def error(self, images: int, checkpoint: str) -> Exception:
        """What the loop raises once the checkpoint at `images` (the file `checkpoint`) is written."""
        if self.notice is not None:
            return Preempted(self.notice, images)
        return Stopped(self.signum, f"stopped by signal {self.signum} at {images} images; checkpoint {checkpoint}; "
                                    f"rerun the same command to resume")


def exit_status(err: Stopped) -> int:
    """The process's exit status after a stop (the rule above; a hang's is EXIT_HUNG, which the watchdog exits
    with)."""
    return 128 + err.signum


class Interrupts:
    """The loop's one question at each log interval, over this process's StopRequest and the launcher's probes."""

    def __init__(self, stop: "StopRequest", stop_probe: StopProbe | None = None,
                 preemption: PreemptionProbe | None = None):
        self.stop, self.stop_probe, self.preemption = stop, stop_probe, preemption

    def asked_here(self) -> bool:
        """Whether this process was signalled: a single process ends its interval at once (no ranks to agree)."""
        return bool(self.stop.signum)

    def request(self) -> int:
        """This rank's stop request before the ranks agree: its own signal, else its driver's (0: none)."""
        if self.stop_probe is not None:
            self.stop.request(self.stop_probe(), "the launcher's driver")
        return self.stop.signum

    def at_interval(self, signal_sum: float, ranks_asked: float, last: bool) -> Interruption | None:
        """The ranks' agreement, given the interval's reduction of request() (the sum of the signal numbers and the
        number of ranks asked): a stop if any rank was asked, else the launcher's preemption notice if any (a
        barrier under Ray: every rank asks), never at the last interval (the run ends there anyway)."""
        if ranks_asked > 0:
            return Interruption(signum=self.stop.signum or round(signal_sum / ranks_asked))
        if self.preemption is not None and not last:
            notice = self.preemption()
            if notice is not None:
                return Interruption(notice=notice)
        return None


def ignore_in_loader_workers() -> None:
    """In a DataLoader worker: the trainer answers the signals; its workers end when it does."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


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
