"""Test hosts on this machine, each with an address of its own: Linux namespaces joined by a private link.

Each host is a network namespace with one end of a veth pair, whose other end sits on a bridge made for the test
(the test's side of the link, which holds the first address of the subnet), a PID namespace (its own `ps`,
`ray stop`, and an end that kills all its processes) and a mount namespace with a private /tmp (Ray's session
directories stay per host; files every host needs go outside /tmp). Traffic stays between the test's own
addresses: the bridge, the hosts, nothing routed further (each host's default route points at the test's side,
as a real machine's points at its gateway, so that programs which find their own address by the route to the
internet, as Ray does, find it; this machine forwards nothing, so no packet leaves). Everything made is removed
afterwards, and anything a killed test run left behind (names start with the same prefix, and no live process
owns them) is swept before the next one starts.

With `ssh=True`, every host also runs an sshd on port 22 of its address that lets root in by key, and has a /root
of its own (a folder bind-mounted in its mount namespace, with the Python installation this environment runs on
mounted back when it lives under /root, as pyenv's does), as separate machines do. Root, because the environment
installed here may live in root's private home, where no other user may run it; a second name for uid 0 would not
do: OpenSSH's client expands `~` by the uid's first passwd entry, so the launcher's `-i ~/ray_bootstrap_key.pem`
on the head would look in root's home.

As on Debian's and Ubuntu's real machines, the host name resolves to a loopback address in every host.
"""

from __future__ import annotations

import os
import re
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


def available(ssh: bool = False) -> str | None:
    """Why test hosts (with sshd if asked) cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces)"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"test hosts need {tool} (iproute2, util-linux)"
    if ssh:
        for tool in ("sshd", "ssh-keygen", "nc", "rsync"):
            if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
                return f"test hosts with sshd need {tool} (openssh-server, netcat-openbsd, rsync)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _owner_file(tag: str) -> Path:
    return Path(f"/var/tmp/{PREFIX}{tag}.owner")


def tag_of(name: str) -> str:
    """The tag of one made_hosts call, from the name of anything it made: PREFIX + 4 hex digits + what it is."""
    return name[len(PREFIX):len(PREFIX) + 4]


def _orphaned(name: str) -> bool:
    """Whether a made thing belongs to no live test process: hosts made by a test running beside this one
    (another pytest worker) are left alone."""
    owner = _owner_file(tag_of(name))
    try:
        os.kill(int(owner.read_text()), 0)
        return False
    except (OSError, ValueError):  # no owner file, or its process is gone
        return True


def sweep() -> None:
    """Remove what an earlier, killed test run left: namespaces (their processes first), links, folders."""
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX) and _orphaned(name):
            pids = _ip("netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show").stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0]
        if link.startswith(PREFIX) and _orphaned(link):
            _ip("link", "del", link, check=False)
    for made in sorted(Path("/var/tmp").glob(f"{PREFIX}*")):
        if not _orphaned(made.name):
            continue
        if made.name.endswith(("-tmp", "-root")):
            _remove_empty(made)
        elif made.name.endswith(("-home", "-ssh")):
            shutil.rmtree(made, ignore_errors=True)
    for owner in Path("/var/tmp").glob(f"{PREFIX}*.owner"):
        if _orphaned(owner.name):
            owner.unlink(missing_ok=True)


def _remove_empty(directory: Path) -> None:
    """rmdir, never more: outside its host, a host's mount point for the real /tmp is an empty folder."""
    try:
        directory.rmdir()
    except OSError:
        pass


@dataclass
class Login:
    """How to reach every host over SSH (made_hosts(ssh=True)): user, key, and the user's home on the hosts."""
    user: str
    key: Path          # the private key every host's sshd lets in
    home: Path         # the same path on every host; a folder of its own on each


@dataclass
class Host:
    """One test host: run commands in it, cut its link and restore it, end it."""
    name: str          # the network namespace
    address: str       # its address on the test's link
    link: str          # the test side's end of its veth pair
    init: int          # PID 1 of its PID namespace (REAPER), as this machine numbers it
    login: Login | None = None
    sshd_config: str = ""

    def command(self, *args: str) -> list[str]:
        """argv that runs args inside the host (its network, PIDs and mounts)."""
        return ["nsenter", "--target", str(self.init), "--net", "--pid", "--mount", "--", *args]

    def run(self, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout, **kw)

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args), **kw)

    def ssh(self) -> list[str]:
        """argv that runs a command on the host over SSH, as the cluster launcher reaches it (made_hosts(ssh=True))."""
        return ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-i", str(self.login.key), f"{self.login.user}@{self.address}"]

    def processes(self) -> list[str]:
        """The host's processes other than its init, as `ps` inside it shows them."""
        out = self.run("ps", "-eo", "pid=,args=").stdout.splitlines()
        return [line.strip() for line in out if line.split(None, 1)[0] != "1" and "ps -eo" not in line
                and not (self.sshd_config and self.sshd_config in line)]  # its sshd's listener: the machine's

    def cut(self) -> None:
        """Set the host's link down: a partition, its processes still running."""
        _ip("link", "set", self.link, "down")

    def restore(self) -> None:
        """Set the host's link up again: the partition heals."""
        _ip("link", "set", self.link, "up")

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


def _private_mounts(name: str, home: Path | None) -> str:
    """Shell commands, run in a host's mount namespace, that give it an empty /tmp of its own, and with `home` a
    /root of its own (that folder), each with this checkout and its environment (venv and the Python it runs on)
    still where they are when they live there (a CI clone may live under /tmp; pyenv's Python lives in /root)."""
    keep = {Path(sys.prefix), Path(sys.base_prefix), Path(__file__).resolve().parent.parent}
    steps = []
    for private, fresh in (("/tmp", "tmpfs tmpfs"), ("/root", f"--bind {home}")):
        if private == "/root" and home is None:
            continue
        outer = Path(f"/var/tmp/{name}{private.replace('/', '-')}")  # where the machine's folder stays reachable
        outer.mkdir(parents=True, exist_ok=True)
        steps += [f"mount --bind {private} {outer}", f"mount {'-t ' if 'tmpfs' in fresh else ''}{fresh} {private}"]
        steps += [f"mkdir -p {p} && mount --bind {outer}/{p.relative_to(private)} {p}"
                  for p in sorted(keep) if p.is_relative_to(private)]
    return " && ".join(steps)


def _run(*args: str) -> None:
    subprocess.run(args, capture_output=True, text=True, check=True, timeout=60)


def _make_login(tag: str, k: int) -> Login:
    """Root's key pair, and each host's own /root with it authorized."""
    ssh = Path(f"/var/tmp/{PREFIX}{tag}-ssh")
    ssh.mkdir(mode=0o700)
    login = Login(user="root", key=ssh / "id_ed25519", home=Path("/root"))
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(login.key))
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "host_key"))
    for i in range(k):
        home = _home_of(tag, i)
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        home.chmod(0o700)
        (home / ".ssh" / "authorized_keys").write_text(login.key.with_suffix(".pub").read_text())
        shutil.copy("/etc/skel/.bashrc", home / ".bashrc")
        shutil.copy("/etc/skel/.profile", home / ".profile")
    return login


def _home_of(tag: str, i: int) -> Path:
    return Path(f"/var/tmp/{PREFIX}{tag}h{i}-home")


def _start_sshd(host: Host, login: Login) -> subprocess.Popen:
    """An sshd on port 22 of the host's address, inside the host, letting in login.user by key."""
    ssh = login.key.parent
    host.sshd_config = str(ssh / f"sshd_config.{host.name}")
    Path(host.sshd_config).write_text("\n".join([
        "Port 22", f"ListenAddress {host.address}", f"HostKey {ssh / 'host_key'}", "PidFile /tmp/sshd.pid",
        "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", f"AllowUsers {login.user}", "Subsystem sftp internal-sftp", ""]))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    sshd = host.popen("/usr/sbin/sshd", "-D", "-f", host.sshd_config, "-E", str(ssh / f"sshd.{host.name}.log"),
                      stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while subprocess.run(["nc", "-z", "-w", "1", host.address, "22"]).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sshd of test host {host.address} did not start: "
                               + (ssh / f"sshd.{host.name}.log").read_text(errors="replace")[-2000:])
        time.sleep(0.1)
    return sshd


@contextmanager
def made_hosts(k: int, ssh: bool = False) -> Iterator[list[Host]]:
    """k hosts on a private bridge, with an sshd on port 22 of each if asked; removed on the way out, whatever
    happened."""
    sweep()
    tag = secrets.token_hex(2)
    taken = set(re.findall(r"inet 10\.213\.(\d+)\.", _ip("-o", "-4", "addr", "show").stdout))
    subnet = f"10.213.{secrets.choice([n for n in range(1, 251) if str(n) not in taken])}"
    bridge = f"{PREFIX}{tag}br"
    made: list[tuple[Host, subprocess.Popen]] = []
    daemons: list[subprocess.Popen] = []
    login = None
    _owner_file(tag).write_text(str(os.getpid()))
    try:
        if ssh:
            login = _make_login(tag, k)
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
            _ip("-n", name, "route", "add", "default", "via", f"{subnet}.1")
            home = _home_of(tag, i) if login else None
            launcher = subprocess.Popen(
                ["ip", "netns", "exec", name, "unshare", "--pid", "--mount", "--fork", "--mount-proc", "sh", "-c",
                 f"{_private_mounts(name, home)} && exec {sys.executable} -c '{REAPER}'"],
                stdin=subprocess.DEVNULL)
            host = Host(name, address, outside, _init_of(launcher), login)
            made.append((host, launcher))
        deadline = time.monotonic() + 10
        while any(h.run("true").returncode for h, _ in made) and time.monotonic() < deadline:
            time.sleep(0.1)  # /tmp mounted, nsenter works
        if login is not None:
            daemons += [_start_sshd(host, login) for host, _ in made]
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
            _remove_empty(Path(f"/var/tmp/{host.name}-root"))
        _ip("link", "del", bridge, check=False)
        for daemon in daemons:  # ended with their hosts
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
        if ssh:  # each host's /root, the keys and sshd's files (the hosts' mounts ended with them)
            for made_dir in [_home_of(tag, i) for i in range(k)] + [Path(f"/var/tmp/{PREFIX}{tag}-ssh")]:
                shutil.rmtree(made_dir, ignore_errors=True)
        _owner_file(tag).unlink(missing_ok=True)
