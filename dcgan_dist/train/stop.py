"""SIGTERM and SIGINT (spot reclaim, `ray job stop`, Kubernetes, Slurm, Ctrl-C) ask the loop to stop cleanly.

The first signal sets a flag; the loop checks it at step boundaries (every step in one process, at each log
interval under a distributed launcher, where all ranks must agree through the interval's reduction), writes a
checkpoint at the current image count and exits. A second signal exits at once.

Under Ray Train the loop runs in a worker thread, where no signal arrives: the signal reaches the driver
(`ray job stop`, Ctrl-C), which passes it on through Ray (distributed/ray_launch.py), and each rank's loop asks
at every log interval (StopProbe) and sets the same flag with request().
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installed for the duration of a run (main thread only: Python delivers signals there)."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
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
        if self.signum:
            print(f"dcgan_dist: second {signal.Signals(signum).name}: exiting at once", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"dcgan_dist: {signal.Signals(signum).name}: writing a checkpoint at the next step boundary, then "
              f"stopping (send it again to exit at once)", file=sys.stderr, flush=True)


def ignore_in_loader_workers(_worker_id: int) -> None:
    """DataLoader worker_init_fn: the trainer answers the signals; its workers end when it does."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
