"""The cluster launcher for real: `ray up -y cluster/local.yaml` over SSH, `ray job submit`, `ray down -y`.

This machine plays both sides. A user made for the test (root under a second name, its home in a temporary
directory) is "the cluster's machine": an sshd of the test's own, on 127.0.0.1 and a free port, lets the test's
key in as that user, and Ray
reaches it through the YAML's `auth.ssh_proxy_command` (`nc 127.0.0.1 PORT`). The test process, with HOME set to
another temporary directory holding the auth token, is "your machine". Only the machine facts of
cluster/local.yaml are overlaid (head_ip, worker_ips, auth, and setup commands that point at the environment
already installed here instead of making one); its start commands, file mounts and token handling run as
written. Everything the test makes (the user, the sshd, Ray's processes, temporary files) is removed afterwards.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dcgan_dist import checkpoint
from multirank import free_port

REPO = Path(__file__).resolve().parent.parent
RAY_CLI = str(Path(sys.executable).with_name("ray"))
VENV = Path(sys.executable).parent.parent
DASHBOARD = "http://127.0.0.1:8265"  # the head's, on its loopback (cluster/local.yaml)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("sshd", path="/usr/sbin:/usr/bin"),
                                reason="needs root (a user and an sshd of the test's own) and OpenSSH's sshd "
                                       "(.ci/run installs openssh-server, rsync and netcat-openbsd)")


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60, **kwargs)


def _processes_of(home: Path) -> list[str]:
    """The cluster's processes: Ray's name their session directory, under the cluster user's home."""
    proc = subprocess.run(["pgrep", "-a", "-f", str(home)], capture_output=True, text=True)
    return [line for line in proc.stdout.splitlines() if "pgrep" not in line]


@dataclass
class Machines:
    """Where `ray up` goes: a user reachable over SSH with key on head_ip:port."""
    user: str
    home: Path
    port: int
    key: Path
    root: Path
    head_ip: str = "127.0.0.1"


def _sshd(root: Path, m: Machines) -> subprocess.Popen:
    """An sshd of the test's own on head_ip:port, letting in m.user by key."""
    config = root / "sshd_config"
    config.write_text("\n".join([
        f"Port {m.port}", f"ListenAddress {m.head_ip}", f"HostKey {root / 'host_key'}", f"PidFile {root / 'sshd.pid'}",
        "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", f"AllowUsers {m.user}",
        f"AuthorizedKeysFile {m.home / '.ssh' / 'authorized_keys'}", "Subsystem sftp internal-sftp", ""]))
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(config), "-E", str(root / "sshd.log")])
    deadline = time.monotonic() + 10
    while subprocess.run(["nc", "-z", m.head_ip, str(m.port)]).returncode != 0:
        assert sshd.poll() is None and time.monotonic() < deadline, (root / "sshd.log").read_text()
        time.sleep(0.1)
    return sshd


@pytest.fixture
def machine():
    """A user reachable over SSH on this machine, with a home of its own; all of it removed afterwards:
    processes, the user, the files."""
    root = Path(tempfile.mkdtemp(prefix="rayup", dir="/tmp"))
    root.chmod(0o755)
    m = Machines(user=f"dcgan{secrets.token_hex(3)}", home=root / "home", port=free_port(), key=root / "id_ed25519",
                 root=root)
    sshd, made_user = None, False
    try:
        # A second name for root (uid 0) with its own home: the environment installed here lives under root's
        # private home (pyenv), where no other user may run it. "*": no password, yet not a locked account
        # (which sshd without PAM refuses).
        m.home.mkdir(mode=0o700)
        _run(["useradd", "--non-unique", "--uid", "0", "--gid", "0", "--home-dir", str(m.home), "--shell",
              "/bin/bash", "--password", "*", m.user])
        made_user = True
        shutil.copy("/etc/skel/.bashrc", m.home / ".bashrc")
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(m.key)])
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key")])
        (m.home / ".ssh").mkdir(mode=0o700)
        (m.home / ".ssh" / "authorized_keys").write_text(m.key.with_suffix(".pub").read_text())
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        sshd = _sshd(root, m)
        yield m
    finally:
        subprocess.run(["pkill", "-KILL", "-f", str(m.home)], capture_output=True)
        if sshd is not None:
            sshd.send_signal(signal.SIGTERM)
            sshd.wait(timeout=10)
        time.sleep(0.5)  # the killed processes' exit before their user goes
        if made_user:
            subprocess.run(["userdel", "--force", m.user], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _overlaid(m: Machines) -> dict:
    """cluster/local.yaml with this machine's facts: addresses, SSH access, and the installed environment."""
    config = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    config["provider"].update(head_ip=m.head_ip, worker_ips=[])
    config["auth"] = {"ssh_user": m.user, "ssh_private_key": str(m.key), "ssh_proxy_command": f"nc %h {m.port}"}
    # Ray runs every command in a login shell that sources ~/.bashrc: `ray` on its PATH there (the YAML's own
    # venv step does the same), and Ray's files in a short temporary directory of the test's.
    tmp = f"{m.home}/r"
    config["setup_commands"] = [
        f"grep -q RAY_TMPDIR ~/.bashrc || echo '. {VENV}/bin/activate; export RAY_TMPDIR={tmp} TMPDIR={tmp} "
        f"RAY_USAGE_STATS_ENABLED=0' >> ~/.bashrc",
        f"mkdir -p {tmp}",
    ]
    return config


def _autoscaler_log(m: Machines) -> str:
    """The end of the head's autoscaler log: what it did to start the worker hosts' nodes."""
    logs = m.home / "r" / "ray" / "session_latest" / "logs"  # RAY_TMPDIR/ray/
    said = []
    for f in sorted(logs.glob("monitor.*")):
        lines = f.read_text(errors="replace").splitlines()
        said += [f"{f.name}: {line}" for line in lines if re.search(r"ERR|rror|ail|denied|refused", line)][-30:]
        said += [f"{f.name}: {line}" for line in lines[-5:]]
    return "\n".join(said)


def _run_or_say(command: list[str], m: Machines, **kwargs) -> subprocess.CompletedProcess:
    """A launcher command; if it hangs, an error with its output and the autoscaler's log."""
    try:
        return subprocess.run(command, capture_output=True, text=True, **kwargs)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{command[1:3]} hung: {str(err.stdout)[-3000:]}\n{str(err.stderr)[-2000:]}\n"
                             f"{_autoscaler_log(m)}") from None


def _launcher_env(m: Machines) -> dict:
    """Your machine: its own HOME (with the auth token the YAML's file_mounts copies) and temporary files.

    RAY_TMPDIR is the head's: the local provider keeps which machines are in use in a file there
    (RAY_TMPDIR/ray/cluster-<name>.state), which `ray up` writes and copies to the same path on the head, where the
    autoscaler reads it to start the worker hosts' nodes."""
    client = m.root / "client"
    (client / ".ray").mkdir(parents=True, exist_ok=True)
    (client / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    (client / "tmp").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # RAY_AUTH_MODE=token as docs/cluster.md exports it: `ray job submit` sends the token only then.
    env.update(HOME=str(client), TMPDIR=str(client / "tmp"), RAY_TMPDIR=str(m.home / "r"),
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_UP_enable_autoscaler_v2="0")
    return env


@pytest.mark.ray
@pytest.mark.slow
def test_ray_up_job_submit_ray_down(machine, mnist_shards):
    """`ray up -y` -> `ray job submit` of a 2-worker run -> TensorBoard events and checkpoints -> `ray down -y`
    -> no Ray process left."""
    m = machine
    config = _overlaid(m)
    yaml_path = m.root / "cluster.yaml"
    yaml_path.write_text(yaml.safe_dump(config))
    env = _launcher_env(m)
    run_dir = m.home / "runs" / "up"
    target, every = 40 * 32, 10 * 32
    try:
        up = _run_or_say([RAY_CLI, "up", "-y", str(yaml_path), "--no-config-cache"], m, timeout=180, env=env,
                         cwd=REPO)
        assert up.returncode == 0, f"{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        assert (m.home / "dcgan-dist" / "dcgan_dist" / "train" / "loop.py").is_file()  # file_mounts: the checkout
        assert (m.home / ".ray" / "auth_token").read_text() == (m.root / "client/.ray/auth_token").read_text()
        assert any("raylet" in p for p in _processes_of(m.home)), "no Ray process runs in the cluster's home"

        # The job, as docs/cluster.md submits it: through the dashboard on the head's loopback.
        job = f"dcgan-up-{secrets.token_hex(4)}"
        submit = _run_or_say(
            [RAY_CLI, "job", "submit", "--address", DASHBOARD, "--submission-id", job,
             "--working-dir", ".", "--", "python", "-m", "dcgan_dist.train", "--config", "configs/mnist_local.yaml",
             f"data.shards={mnist_shards}", "data.builtin=null", "data.num_workers=0", "data.shuffle_buffer=200",
             "model.ngf=8", "model.ndf=8", "train.batch_size=16", f"train.images={target}", "train.device=cpu",
             f"log.every_images={every}", f"log.sample_every_images={target}",
             f"log.checkpoint_every_images={target // 2}", "log.grid_size=16", f"run_dir={run_dir}",
             "trainer.num_workers=2"],
            m, timeout=240, env=env, cwd=REPO)
        # `ray job submit` follows the log, and may stop following while a node joins: ask for the end, as
        # docs/cluster.md does (`ray job status`, `ray job logs`).
        deadline = time.monotonic() + 150
        while True:
            status = _run_or_say([RAY_CLI, "job", "status", "--address", DASHBOARD, job], m, timeout=60, env=env)
            if re.search(r"succeeded|failed|stopped", status.stdout, re.IGNORECASE):
                break
            assert time.monotonic() < deadline, f"the job did not end: {status.stdout}\n{_autoscaler_log(m)}"
            time.sleep(2)
        logs = _run_or_say([RAY_CLI, "job", "logs", "--address", DASHBOARD, job], m, timeout=60, env=env).stdout
        assert re.search("succeeded", status.stdout, re.IGNORECASE), f"{submit.stdout[-3000:]}\n{logs[-4000:]}\n{_autoscaler_log(m)}"

        events = sorted((run_dir / "tb").glob("events.out.tfevents.*"))
        assert len(events) == 1
        acc = EventAccumulator(str(events[0]))
        acc.Reload()
        assert [e.step for e in acc.Scalars("loss/D")] == list(range(every, target + 1, every))
        assert {e.value for e in acc.Scalars("perf/world_size")} == {2}
        final = checkpoint.load(checkpoint.path_for(run_dir, target), resumable=True)
        assert final.images == target and final.resume.geometry["world_size"] == 2

        # Each progress line once in `ray job logs` (Train V2's print patch showed every one twice: ray_launch.run).
        progress = [line for line in logs.splitlines() if re.search(rf"\] \d+/{target} images ", line)]
        assert len(progress) == target // every and len(set(progress)) == len(progress), logs[-4000:]

        # Each rank said once where it runs.
        where = dict(re.findall(r"dcgan_dist: rank (\d) of 2 on node \S+ \(([\d.]+)\), device cpu, backend gloo",
                                logs))
        assert set(where) == {"0", "1"}, logs[-4000:]
    finally:
        down = subprocess.run([RAY_CLI, "down", "-y", str(yaml_path)], capture_output=True, text=True,
                              timeout=120, env=env, cwd=REPO)
        # The launcher's SSH control sockets: /tmp/ray_ssh_<hash of this user>/<hash of the cluster name>.
        control = Path(f"/tmp/ray_ssh_{hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]}")
        shutil.rmtree(control / hashlib.sha256(config["cluster_name"].encode()).hexdigest()[:10], ignore_errors=True)
        if control.is_dir() and not any(control.iterdir()):
            control.rmdir()
    assert down.returncode == 0, f"{down.stdout[-3000:]}\n{down.stderr[-3000:]}"
    deadline = time.monotonic() + 30
    while _processes_of(m.home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_of(m.home), f"left running after `ray down`: {_processes_of(m.home)}"
