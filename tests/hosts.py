"""Test hosts on this machine, each with an address of its own: Linux namespaces joined by a private link.

Each host is a network namespace with one end of a veth pair, whose other end sits on a bridge made for the test
(the test's side of the link, which holds the first address of the subnet), a PID namespace (its own `ps`,
`ray stop`, and an end that kills all its processes) and a mount namespace with a private /tmp (Ray's session
directories stay per host; files every host needs go outside /tmp). Traffic stays between the test's own
addresses: the bridge, the hosts, nothing routed further. Everything made is removed afterwards, and anything a
killed test run left behind (names start with the same prefix) is swept before the next one starts.

As on Debian's and Ubuntu's real machines, the host name resolves to a loopback address in every host.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PREFIX = "dcgt"  # every namespace, link and bridge the fixture makes
# PID 1 of a host: it reaps the orphans that daemons leave (ray start's), as an init does.
REAPER = "import os, time\nwhile True:\n    try:\n        os.wait()\n    except ChildProcessError:\n        time.sleep(0.2)"


def available() -> str | None:
    """Why test hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces)"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"test hosts need {tool} (iproute2, util-linux)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def sweep() -> None:
    """Remove what an earlier, killed test run left: namespaces (their processes first) and links."""
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX):
            pids = _ip("netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show").stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0]
        if link.startswith(PREFIX):
            _ip("link", "del", link, check=False)
    for outer in Path("/var/tmp").glob(f"{PREFIX}*-tmp"):
        _remove_empty(outer)


def _remove_empty(directory: Path) -> None:
    """rmdir, never more: outside its host, a host's mount point for the real /tmp is an empty folder."""
    try:
        directory.rmdir()
    except OSError:
        pass


@dataclass
class Host:
    """One test host: run commands in it, cut its link, end it."""
    name: str          # the network namespace
    address: str       # its address on the test's link
    link: str          # the test side's end of its veth pair
    init: int          # PID 1 of its PID namespace (REAPER), as this machine numbers it

    def command(self, *args: str) -> list[str]:
        """argv that runs args inside the host (its network, PIDs and mounts)."""
        return ["nsenter", "--target", str(self.init), "--net", "--pid", "--mount", "--", *args]

    def run(self, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout, **kw)

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args), **kw)

    def processes(self) -> list[str]:
        """The host's processes other than its init, as `ps` inside it shows them."""
        out = self.run("ps", "-eo", "pid=,args=").stdout.splitlines()
        return [line.strip() for line in out if line.split(None, 1)[0] != "1" and "ps -eo" not in line]

    def cut(self) -> None:
        """Set the host's link down: a partition, its processes still running."""
        _ip("link", "set", self.link, "down")

    def end(self) -> None:
        """Kill the host's init: the kernel kills every process of its PID namespace."""
        try:
            os.kill(self.init, 9)
        except ProcessLookupError:
            pass


def _init_of(launcher: subprocess.Popen, timeout: float = 10) -> int:
    """The forked child of `unshare --fork`: PID 1 of the new PID namespace."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise RuntimeError("a test host's PID namespace did not start")


def _private_tmp(outer: Path) -> str:
    """Shell commands, run in a host's mount namespace, that give it an empty /tmp of its own, with this checkout
    and its environment still where they are when they live under /tmp (a CI clone may)."""
    keep = sorted({str(p) for p in (Path(sys.prefix), Path(__file__).resolve().parent.parent)
                   if p.is_relative_to("/tmp")})
    outer.mkdir(parents=True, exist_ok=True)
    steps = [f"mount --bind /tmp {outer}", "mount -t tmpfs tmpfs /tmp"]
    steps += [f"mkdir -p {p} && mount --bind {outer}/{Path(p).relative_to('/tmp')} {p}" for p in keep]
    return " && ".join(steps)


@contextmanager
def made_hosts(k: int) -> Iterator[list[Host]]:
    """k hosts on a private bridge; removed on the way out, whatever happened."""
    sweep()
    tag = secrets.token_hex(2)
    subnet = f"10.213.{secrets.randbelow(250) + 1}"
    bridge = f"{PREFIX}{tag}br"
    made: list[tuple[Host, subprocess.Popen]] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i in range(k):
            name, outside, inside = f"{PREFIX}{tag}h{i}", f"{PREFIX}{tag}v{i}", f"{PREFIX}{tag}e{i}"
            address = f"{subnet}.{i + 2}"
            _ip("netns", "add", name)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", name)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", name, "link", "set", inside, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            launcher = subprocess.Popen(
                ["ip", "netns", "exec", name, "unshare", "--pid", "--mount", "--fork", "--mount-proc", "sh", "-c",
                 f"{_private_tmp(Path(f'/var/tmp/{name}-tmp'))} && exec {sys.executable} -c '{REAPER}'"],
                stdin=subprocess.DEVNULL)
            host = Host(name, address, outside, _init_of(launcher))
            made.append((host, launcher))
        deadline = time.monotonic() + 10
        while any(h.run("true").returncode for h, _ in made) and time.monotonic() < deadline:
            time.sleep(0.1)  # /tmp mounted, nsenter works
        yield [h for h, _ in made]
    finally:
        for host, launcher in made:
            host.end()
            try:
                launcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                launcher.kill()
            _ip("netns", "del", host.name, check=False)
            _ip("link", "del", host.link, check=False)
            _remove_empty(Path(f"/var/tmp/{host.name}-tmp"))
        _ip("link", "del", bridge, check=False)
