"""The cluster launcher for real, across hosts: `ray up -y cluster/local.yaml` with a head and two worker hosts,
`ray dashboard`, `ray job submit` of a training with one rank on each host, a worker host's link cut and restored,
`ray down -y`, nothing left anywhere.

The hosts are tests/hosts.py's: Linux namespaces on a private bridge, each with its own address, its own /tmp and
processes, and an sshd on port 22 letting in one user whose home is a folder of its own on each host; every host
name resolves to 127.0.0.1, as Debian's and Ubuntu's to 127.0.1.1, so the training also proves the interface
choice (distributed/rendezvous.py). The test process is "your machine", with HOME set to a temporary folder
holding the auth token. Only the machine facts of cluster/local.yaml are overlaid (head_ip, worker_ips, auth, and
setup commands that activate the environment installed here instead of making one and mounting NFS: the hosts
share /var/tmp, which stands in for the shared file system; they also set Ray's health checks, as
tests/test_hosts.py does, see HEALTH_CHECKS); its start commands, file mounts and token handling run as written,
and the commands are the ones docs/cluster.md gives, with no extra environment on your machine.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dcgan_dist import checkpoint
from doc_commands import documented, exported
from hosts import Host, available, made_hosts

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(available(ssh=True) is not None, reason=str(available(ssh=True)))]

REPO = Path(__file__).resolve().parent.parent
RAY_CLI = str(Path(sys.executable).with_name("ray"))
VENV = Path(sys.executable).parent.parent
DASHBOARD = "http://127.0.0.1:8265"  # `ray dashboard`'s tunnel to the head's loopback (docs/cluster.md)
BATCH = 16
# The hosts' environment (their ~/.bashrc, which every command of the launcher sources): the head's GCS declares a
# node dead after health checks every 1 s, 5 missed in a row, as tests/test_hosts.py's cluster does. Ray's defaults
# (every 3 s, 5 missed after a 10 s timeout) took 65 s to declare the cut worker host's node dead, a third of the
# test; the partition, its healing and what `ray down` leaves are the same either way.
HEALTH_CHECKS = "RAY_health_check_period_ms=1000 RAY_health_check_timeout_ms=1000 RAY_health_check_failure_threshold=5"


def _overlaid(head: Host, workers: list[Host]) -> dict:
    """cluster/local.yaml with the hosts' facts: addresses, SSH access, and the environment installed here."""
    config = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    config["provider"].update(head_ip=head.address, worker_ips=[w.address for w in workers])
    config["auth"] = {"ssh_user": head.login.user, "ssh_private_key": str(head.login.key)}
    # Ray runs every command in a login shell that sources ~/.bashrc: the installed environment on its PATH
    # there, as the YAML's own venv step does with ~/venv.
    config["setup_commands"] = [
        f"grep -q {VENV}/bin/activate ~/.bashrc || echo '. {VENV}/bin/activate; export RAY_USAGE_STATS_ENABLED=0 "
        f"{HEALTH_CHECKS}' >> ~/.bashrc"]
    return config


def _your_machine(root: Path) -> dict:
    """The launcher's environment: a HOME of its own, its own temporary files (the local provider's state file),
    and the auth token as docs/cluster.md makes it (`ray get-auth-token --generate`, `export RAY_AUTH_MODE=token`)."""
    (root / "tmp").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(root), TMPDIR=str(root / "tmp"), RAY_USAGE_STATS_ENABLED="0")
    token = _ray(*documented("ray get-auth-token --generate")[1:], env=env, timeout=60)
    assert token.returncode == 0 and (root / ".ray" / "auth_token").is_file(), token.stderr
    return {**env, **exported("export RAY_AUTH_MODE=token")}


def _ray(*args: str, env: dict, timeout: float = 120, what: str = "") -> subprocess.CompletedProcess:
    try:
        return subprocess.run([RAY_CLI, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"`ray {' '.join(args[:2])}` hung: {str(err.stdout)[-3000:]}\n"
                             f"{str(err.stderr)[-2000:]}\n{what}") from None


def _monitor_log(head: Host) -> str:
    """The end of the head's autoscaler log: what it did to start the worker hosts' nodes."""
    r = head.run("sh", "-c", "tail -n 40 /tmp/ray/session_latest/logs/monitor.log")
    return r.stdout


def _alive(env: dict) -> list[str]:
    """The addresses of the cluster's live nodes, as `ray list nodes` gives them through the dashboard."""
    r = _ray("list", "nodes", "--address", DASHBOARD, "--format", "json", "--detail", env=env, timeout=60)
    if r.returncode != 0 or not r.stdout.strip().startswith("["):
        return []
    return sorted(n["node_ip"] for n in json.loads(r.stdout) if n["state"] == "ALIVE")


def _tunnel(config: Path, env: dict) -> subprocess.Popen:
    """`ray dashboard cluster.yaml` (docs/cluster.md), in a session of its own to end it afterwards; once the
    dashboard answers through it."""
    tunnel = subprocess.Popen([RAY_CLI, "dashboard", str(config)], env=env, cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{DASHBOARD}/api/version", timeout=5).close()
            return tunnel
        except urllib.error.HTTPError:  # an answer (401 without the token): the tunnel is there
            return tunnel
        except OSError:  # refused, or the head's dashboard not answering yet
            assert tunnel.poll() is None and time.monotonic() < deadline, "`ray dashboard` did not tunnel"
            time.sleep(0.5)


def _raylets(host: Host) -> set[int]:
    """The pids of the raylets running on a host."""
    return {int(pid) for pid in host.run("pgrep", "-x", "raylet").stdout.split()}


def _left(hosts: list[Host]) -> dict[str, list[str]]:
    return {h.address: h.processes() for h in hosts if h.processes()}


def test_ray_up_three_hosts_job_across_them_ray_down(hosts_share):
    """`ray up -y` -> three nodes alive at three addresses -> `ray job submit` of a 3-worker run, one rank on each
    host, its process group formed across the links -> TensorBoard events and checkpoints -> a worker host's link
    cut until its node is declared dead, then restored -> `ray down -y` -> nothing of Ray left on any host."""
    target, every = 40 * 3 * BATCH, 10 * 3 * BATCH
    run_dir = hosts_share / "run"
    with made_hosts(3, ssh=True) as hosts, tempfile.TemporaryDirectory(prefix="dcgan-yours-") as yours:
        head, *workers = hosts
        config = _overlaid(head, workers)
        config_path = Path(yours) / "local.yaml"
        config_path.write_text(yaml.safe_dump(config))
        env = _your_machine(Path(yours) / "home")
        tunnel = None
        try:
            t0 = time.monotonic()
            up = _ray("up", "-y", str(config_path), "--no-config-cache", env=env, timeout=240,
                      what=_monitor_log(head))
            assert up.returncode == 0, f"{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
            print(f"ray up: returned after {time.monotonic() - t0:.0f} s")
            # The workers' nodes come after: the head's autoscaler starts them over SSH.
            tunnel = _tunnel(config_path, env)
            addresses = sorted(h.address for h in hosts)
            deadline = time.monotonic() + 240
            while _alive(env) != addresses:
                assert time.monotonic() < deadline, f"nodes alive: {_alive(env)}\n{_monitor_log(head)}"
                time.sleep(2)
            print(f"ray up: 3 nodes alive at {addresses} after {time.monotonic() - t0:.0f} s")
            token = (Path(yours) / "home" / ".ray" / "auth_token").read_text()
            home = head.login.home
            for host in hosts:  # file_mounts, as written: the checkout and the token, on every host
                assert host.run("test", "-f", f"{home}/dcgan-dist/dcgan_dist/train/loop.py").returncode == 0
                assert host.run("cat", f"{home}/.ray/auth_token").stdout == token

            # The job, as docs/cluster.md submits it with RAY_ADDRESS exported, at test size on CPUs; 2 CPUs a worker
            # (each host has 2): one rank per host.
            job = f"dcgan-up-{secrets.token_hex(4)}"
            submit = _ray(
                "job", "submit", "--submission-id", job, "--working-dir", ".", "--runtime-env-json",
                '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "300"}}', "--",
                "python", "-m", "dcgan_dist.train", "--config", "configs/mnist_local.yaml",
                f"data.shards={hosts_share / 'shards'}", "data.builtin=null", "data.loader_workers=0",
                "data.shuffle_buffer=200", "model.ngf=8", "model.ndf=8", f"train.batch_size={BATCH}",
                f"train.images={target}", "train.device=cpu", f"log.every_images={every}",
                f"log.sample_every_images={target}", f"log.checkpoint_every_images={target // 2}",
                "log.grid_size=16", "trainer.num_workers=3", "trainer.cpus_per_worker=2", f"run_dir={run_dir}",
                f"trainer.storage_path={hosts_share / 'ray'}",
                env={**env, **exported("export RAY_ADDRESS=http://127.0.0.1:8265")}, timeout=300,
                what=_monitor_log(head))
            # `ray job submit` follows the log; ask for the end as docs/cluster.md does (`ray job status`, `logs`).
            deadline = time.monotonic() + 120
            while True:
                status = _ray("job", "status", "--address", DASHBOARD, job, env=env, timeout=60).stdout
                if re.search(r"succeeded|failed|stopped", status, re.IGNORECASE):
                    break
                assert time.monotonic() < deadline, f"the job did not end: {status}"
                time.sleep(2)
            logs = _ray("job", "logs", "--address", DASHBOARD, job, env=env, timeout=60).stdout
            assert re.search("succeeded", status, re.IGNORECASE), f"{submit.stdout[-3000:]}\n{logs[-4000:]}"

            # One rank on each host, each bound to the interface holding its host's address.
            where = dict(re.findall(r"dcgan_dist: rank (\d) of 3 on node \S+ \(([\d.]+)\)", logs))
            assert sorted(where.values()) == addresses and set(where) == {"0", "1", "2"}, logs[-4000:]
            chosen = re.findall(r"GLOO_SOCKET_IFNAME=(dcgt\w+) \(chosen: holds ([\d.]+)\)", logs)
            assert sorted(a for _, a in chosen) == addresses, logs[-4000:]
            # Each progress line once in `ray job logs` (Train V2's print patch doubled them: ray_launch.run).
            progress = [line for line in logs.splitlines() if re.search(rf"\] \d+/{target} images ", line)]
            assert len(progress) == target // every and len(set(progress)) == len(progress), logs[-4000:]

            events = sorted((run_dir / "tb").glob("events.out.tfevents.*"))
            assert len(events) == 1
            acc = EventAccumulator(str(events[0]))
            acc.Reload()
            assert [e.step for e in acc.Scalars("loss/D")] == list(range(every, target + 1, every))
            assert {e.value for e in acc.Scalars("perf/world_size")} == {3}
            assert [checkpoint.images_of(p) for p in checkpoint.list_checkpoints(run_dir)] == [target // 2, target]
            final = checkpoint.load(checkpoint.path_for(run_dir, target), resumable=True)
            assert final.images == target and final.resume.geometry["world_size"] == 3

            # A partition that heals: a worker host's link cut until Ray declares its node dead, then restored. Its
            # raylet learns that it was declared dead and exits. The head's autoscaler may then run the worker's
            # start commands there again, in the same session (`ray stop`, `ray start`, the follower): a `ray down`
            # between its `ray start` and its follower (it ends the autoscaler, and with it the rest of the
            # commands) leaves a raylet no follower of its own watches. The test runs that `ray start`, as the YAML
            # gives it and over SSH as the autoscaler does, then `ray down`: nothing is left there either.
            lost = workers[-1]
            assert any("dcgan_dist.distributed.follow_head" in line for line in lost.processes()), lost.processes()
            first = _raylets(lost)
            assert first, lost.processes()
            t_cut = time.monotonic()
            lost.cut()
            deadline = time.monotonic() + 180
            while lost.address in _alive(env):
                assert time.monotonic() < deadline, f"the cut host's node was not declared dead: {_alive(env)}"
                time.sleep(2)
            t_dead = time.monotonic()
            lost.restore()
            deadline = time.monotonic() + 60
            while _raylets(lost) & first:
                assert time.monotonic() < deadline, f"the raylet declared dead still runs: {lost.processes()}"
                time.sleep(0.5)
            print(f"link cut: node declared dead after {t_dead - t_cut:.0f} s; link restored: its raylet exited "
                  f"after {time.monotonic() - t_dead:.0f} s")
            start = next(c for c in config["worker_start_ray_commands"] if "ray start" in c)
            restart = subprocess.run([*lost.ssh(), f"bash --login -c -i 'export RAY_HEAD_IP={head.address}; {start}'"],
                                     capture_output=True, text=True, timeout=120)
            follower_log = lost.run("cat", "/tmp/ray/session_latest/logs/dcgan_follow_head.log").stdout
            assert restart.returncode == 0 and _raylets(lost), (f"{restart.stdout[-2000:]}\n{restart.stderr[-2000:]}\n"
                                                                 f"{lost.processes()}\n{follower_log}")
        finally:
            if tunnel is not None:
                os.killpg(tunnel.pid, signal.SIGTERM)
                tunnel.wait(timeout=30)
            t_down = time.monotonic()
            down = _ray("down", "-y", str(config_path), env=env, timeout=180)
            # The launcher's SSH control sockets: /tmp/ray_ssh_<hash of this user>/<hash of the cluster name>.
            control = Path(f"/tmp/ray_ssh_{hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]}")
            shutil.rmtree(control / hashlib.sha256(config["cluster_name"].encode()).hexdigest()[:10],
                          ignore_errors=True)
            if control.is_dir() and not any(control.iterdir()):
                control.rmdir()
        assert down.returncode == 0, f"{down.stdout[-3000:]}\n{down.stderr[-3000:]}"
        # Nothing of Ray on any host: the workers' too (their follower stops them once the head's GCS is gone;
        # the SSH sessions of the launcher and of the head's autoscaler end on their own, ControlPersist=10s).
        deadline = time.monotonic() + 60
        while _left(hosts) and time.monotonic() < deadline:
            time.sleep(1)
        assert not _left(hosts), f"left running after `ray down`: {_left(hosts)}"
        print(f"ray down: nothing left on any host after {time.monotonic() - t_down:.0f} s")
