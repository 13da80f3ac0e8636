"""Forming the process group in bounded time, and saying where each rank runs.

torch's own env:// rendezvous waits as long as the collective timeout (30 minutes by default) for a rank that
never comes, and then says only how many joined. Here every rank first registers itself (node and the address it
reaches the rendezvous from) in the launcher's store under its rank; rank 0 waits at most startup_timeout_s for
all of them and then writes one verdict, "ok" or the names of the ranks missing, which every rank that joined
reads and raises. A rank that cannot reach the store at all says so after the same time. The process group is
then built on that store, so there is still one rendezvous.

Under torchrun the agent already serves the store (TORCHELASTIC_USE_AGENT_STORE): every rank joins it as a
client, and the keys carry the restart count so a restarted attempt never reads the last one's.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from datetime import timedelta

import torch
import torch.distributed as torch_dist

INTERFACE_SETTINGS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_CHOSEN_PREFIX = "DCGAN_DIST_CHOSE_"  # + a setting: the address whose interface choose_interface set it to
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


class RendezvousError(RuntimeError):
    """The ranks did not all meet within trainer.startup_timeout_s; the message names who is missing and why."""


def _master() -> tuple[str, int]:
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        raise RendezvousError("MASTER_ADDR and MASTER_PORT must both be set for a run of more than one rank "
                              "(torchrun and Ray Train set them)")
    return host, int(port)


def local_address(host: str, port: int) -> str:
    """The address this machine would use to reach host:port (the interface's, which a UDP connect picks)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))  # nothing is sent
            return s.getsockname()[0]
    except OSError:
        return "no route"


def interface_of(address: str) -> str | None:
    """The name of this machine's network interface whose IPv4 address is `address`, or None (not Linux, or
    no interface holds it)."""
    try:
        import fcntl
    except ImportError:
        return None
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                ifreq = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
        if socket.inet_ntoa(ifreq[20:24]) == address:
            return name
    return None


def choose_interface(address: str) -> None:
    """Bind the process group's sockets (gloo's, NCCL's bootstrap) to the interface holding `address`, this
    rank's address as the other ranks reach it, unless the user named one.

    Left alone, gloo binds to the address the host name resolves to, which Debian's and Ubuntu's /etc/hosts make a
    loopback one (127.0.1.1): ranks on other hosts then cannot connect. Interface names differ between nodes, so
    every rank chooses its own; interface_settings() says what was chosen.
    """
    name = interface_of(address)
    if name is None:
        return
    for var in INTERFACE_SETTINGS:
        if not os.environ.get(var):
            os.environ[var] = name
            os.environ[_CHOSEN_PREFIX + var] = address


def interface_settings() -> str:
    """The interface settings in force, each marked when this project chose it."""
    def one(var: str) -> str:
        chosen = os.environ.get(_CHOSEN_PREFIX + var)
        return f"{var}={os.environ.get(var, 'unset')}" + (f" (chosen: holds {chosen})" if chosen else "")
    return ", ".join(one(var) for var in INTERFACE_SETTINGS)


def node() -> str:
    return socket.gethostname()


def where() -> dict:
    """This rank's node and the address it reaches the rendezvous from, for the hang watchdog's heartbeat."""
    host, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    return {"node": node(), "address": local_address(host, int(port)) if port.isdigit() else "?"}


def group() -> str:
    """This process group's rendezvous address, which each start of a group (each attempt) has anew."""
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"


def store_board_address() -> tuple[str, int, str] | None:
    """(host, port, key prefix) of the store a torchrun attempt met in, for the watchdog's board; None when no
    launcher set one (a plain process) or the store lives in a rank (Ray Train's: the Ray launcher has its own)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    host, port = _master()
    return host, port, f"dcgan/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/watch/"


def whereabouts(rank: int, world_size: int, device: torch.device, backend: str) -> str:
    """One line: where this rank runs and how it talks to the others."""
    host, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    address = local_address(host, int(port)) if port.isdigit() else "?"
    return (f"dcgan_dist: rank {rank} of {world_size} on node {node()} ({address}), pid {os.getpid()}, device "
            f"{device}, backend {backend}; rendezvous {host}:{port}; {interface_settings()}")


def _hint(host: str, port: int, world_size: int) -> str:
    return (f"Check that every node reaches {host}:{port} over TCP (firewall, security group), that MASTER_ADDR "
            f"is an address the other nodes can route to (127.0.0.1 only works on one machine), that every rank "
            f"was started with WORLD_SIZE={world_size}, and that the interface settings name the interface with "
            f"that route (now {interface_settings()})")


def join(rank: int, world_size: int, timeout_s: float, backend: str) -> torch_dist.Store:
    """Meet the other ranks within timeout_s and return the store to build the process group on."""
    host, port = _master()
    address = local_address(host, port)
    choose_interface(address)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    me = f"rank {rank} of {world_size} on node {node()} ({address})"
    try:
        store = torch_dist.TCPStore(host, port, is_master=rank == 0 and not agent,
                                    timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except RuntimeError as err:
        what = "cannot serve" if rank == 0 and not agent else "cannot reach"
        raise RendezvousError(f"{me}: {what} the rendezvous at {host}:{port} within {timeout_s:g} s "
                              f"(trainer.startup_timeout_s): {str(err).strip().splitlines()[0]}. "
                              f"{_hint(host, port, world_size)}") from None
    prefix = f"dcgan/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store.set(f"{prefix}joined/{rank}", me)
    verdict_key = f"{prefix}verdict"
    if rank == 0:
        _judge(store, prefix, world_size, timeout_s, host, port, backend)
    else:
        try:
            store.wait([verdict_key], timedelta(seconds=timeout_s + 30))
            verdict = store.get(verdict_key).decode()
            store.set(f"{prefix}read/{rank}", "1")
        except RuntimeError as err:
            raise RendezvousError(f"{me}: lost the rendezvous at {host}:{port} before rank 0 said that every rank "
                                  f"joined ({str(err).strip().splitlines()[0]}); rank 0's error says more. "
                                  f"{_hint(host, port, world_size)}") from None
        if verdict != "ok":
            raise RendezvousError(f"{me}: {verdict}. {_hint(host, port, world_size)}")
    return torch_dist.PrefixStore(f"{prefix}pg", store)


def _judge(store, prefix: str, world_size: int, timeout_s: float, host: str, port: int, backend: str) -> None:
    """Rank 0: wait for every rank's registration, then say "ok" or who is missing (and raise that)."""
    deadline = time.monotonic() + timeout_s
    keys = [f"{prefix}joined/{r}" for r in range(world_size)]
    while True:
        missing = [r for r in range(world_size) if not store.check([keys[r]])]
        if not missing:
            store.set(f"{prefix}verdict", "ok")
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    joined = [store.get(keys[r]).decode() for r in range(world_size) if r not in missing]
    names = ", ".join(map(str, missing))
    verdict = (f"the {backend} process group did not form within {timeout_s:g} s (trainer.startup_timeout_s): "
               f"rank{'s' if len(missing) > 1 else ''} {names} of {world_size} never joined the rendezvous at "
               f"{host}:{port}; joined: {'; '.join(joined)}")
    store.set(f"{prefix}verdict", verdict)
    # Keep the store up until the ranks that joined have read the verdict (they end with it, not a lost connection).
    readers = [f"{prefix}read/{r}" for r in range(1, world_size) if r not in missing]
    until = time.monotonic() + 10
    while readers and not store.check(readers) and time.monotonic() < until:
        time.sleep(0.1)
    raise RendezvousError(f"{verdict}. {_hint(host, port, world_size)}")
