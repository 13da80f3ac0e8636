"""Run a function on N real processes joined in a gloo process group, the way torchrun or Ray would start them."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on this machine that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # the machine's cores are shared by every rank
    from dcgan_dist.distributed import context as dist

    dist.init("cpu")
    try:
        torch.save(fn(rank, world_size, *args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """fn(rank, world_size, *args) on each rank (a module-level function); its results in rank order.

    A rank that has not finished after `timeout` seconds (a hang in a collective) fails the call.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(max(0.1, deadline - time.monotonic())):  # returns whenever any rank ends
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__}: ranks still running after {timeout} s (a hang?)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
