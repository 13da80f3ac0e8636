"""The one place that knows about ranks: process-group set-up, rank/world/device, and cross-rank reductions.

Local mode, torchrun and Ray Train all end up here. torchrun and Ray set RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT; Ray Train also creates the process group before the training function starts.
Nothing else in the package reads these environment variables, except rendezvous.py, this module's helper for
forming the group (MASTER_ADDR/PORT, torchelastic's store, the GLOO_/NCCL_SOCKET_IFNAME it chooses), which also
tells the hang watchdog where its store is and which group (attempt) it is in.

Three questions, three names: launched() - did a launcher (torchrun, Ray Train) start this process (its
environment says so); Context.distributed - is there a process group (even of one rank: then DDP and NCCL are
in use); _several_ranks() - is there a group of more than one rank (then a collective does something; the
helpers below are no-ops otherwise). rank_and_world() answers from the group, for code that has no Context (the
evaluation commands under torchrun).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from . import rendezvous, watchdog


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this process created the process group (torchrun), so it also destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True under a distributed launcher (torchrun, Ray Train), even with one rank: the DDP/NCCL path."""
        return torch_dist.is_available() and torch_dist.is_initialized()


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda, but torch sees no CUDA device")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def launched() -> bool:
    """Whether a distributed launcher (torchrun, Ray Train) started this process."""
    return "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str = "auto", timeout_s: float = 1800, startup_timeout_s: float = 300) -> Context:
    """Join the process group that the launcher describes (none in a plain local run) and pick the device.

    timeout_s bounds every collective: a rank that died or hangs becomes an error on the others, not a hang.
    startup_timeout_s bounds the rendezvous: ranks that have not joined by then end it with an error naming them.
    Under a launcher every rank prints once where it runs (node, address, device, backend).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    owns = False
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if (world_size > 1 or launched()) and not torch_dist.is_initialized():
        if backend == "nccl":
            watchdog.nccl_tracing()  # before the group forms: its record is what a hang report shows
        store = rendezvous.join(rank, world_size, startup_timeout_s, backend)
        torch_dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                      timeout=timedelta(seconds=timeout_s))
        owns = True
    elif torch_dist.is_initialized():
        # Ray Train made the group with trainer.startup_timeout_s (its TorchConfig) so that a rendezvous that
        # cannot complete fails in bounded time; from here on collectives get their own timeout.
        backend = torch_dist.get_backend()
        torch_dist.set_timeout(timedelta(seconds=timeout_s))
    if launched() or torch_dist.is_initialized():
        print(rendezvous.whereabouts(rank, world_size, dev, backend), flush=True)
    return Context(rank, world_size, local_rank, dev, owns)


def shutdown(ctx: Context) -> None:
    """Destroy the process group this process created (Ray Train destroys its own)."""
    if ctx.owns_group and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    """Rank src's object on every rank (the object itself in a single process)."""
    if not _several_ranks():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def _several_ranks() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if not _several_ranks():
        return 0, 1
    return torch_dist.get_rank(), torch_dist.get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op in a single process)."""
    if _several_ranks():
        torch_dist.all_reduce(tensor)
    return tensor


def all_gather_stacked(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's copy of a same-shaped tensor, stacked in rank order: (world_size, *shape)."""
    if not _several_ranks():
        return tensor.unsqueeze(0)
    out = [torch.empty_like(tensor) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(out, tensor.contiguous())
    return torch.stack(out)


class CollectiveTimeout(RuntimeError):
    """A collective that waited longer than its timeout for other ranks; the message names them if known."""


def barrier(timeout_s: float = 1800) -> None:
    """Wait for every rank. On gloo a monitored barrier: a rank that does not arrive within timeout_s is named."""
    if not _several_ranks():
        return
    if torch_dist.get_backend() != "gloo":
        torch_dist.barrier()
        return
    try:
        torch_dist.monitored_barrier(timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CollectiveTimeout(f"rank {torch_dist.get_rank()} of {torch_dist.get_world_size()} waited "
                                f"{timeout_s:g} s (trainer.collective_timeout_s) at a barrier: {first}. A rank died "
                                f"or hangs, or rank-0 work (eval.*) took longer than the timeout") from None



def gather_lists(values: list[int]) -> list[list[int]]:
    """Every rank's list of ints, in rank order (a list of one in a single process)."""
    if _several_ranks():
        out: list = [None] * torch_dist.get_world_size()
        torch_dist.all_gather_object(out, list(values))
        return out
    return [list(values)]
