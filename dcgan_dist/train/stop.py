"""SIGTERM, SIGINT and SIGHUP (spot reclaim, `ray job stop`, Kubernetes, Slurm, Ctrl-C, a closed terminal) ask the
loop to stop cleanly.

The first signal sets a flag; the loop checks it at step boundaries (every step in one process, at each log
interval under a distributed launcher, where all ranks must agree through the interval's reduction), writes a
checkpoint at the current image count and exits. A second signal exits at once.

Under Ray Train the loop runs in a worker thread, where no signal arrives: the signal reaches the driver
(`ray job stop`, Ctrl-C), which passes it on through Ray (distributed/ray_launch.py), and each rank's loop asks
at every log interval (StopProbe) and sets the same flag with request(). The flag is
distributed/interruptions.StopRequest, which the driver uses too; this module keeps the loader workers out of it.
"""

from __future__ import annotations

import signal

from ..distributed.interruptions import SIGNALS


def ignore_in_loader_workers(_worker_id: int) -> None:
    """DataLoader worker_init_fn: the trainer answers the signals; its workers end when it does."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
