"""Training across a network link: a Ray cluster on test hosts with addresses of their own (tests/hosts.py).

The test hosts themselves first. Then a cut link and a host that dies outright in the middle of an elastic run:
Ray declares the node dead, the group restarts on what is left from the last checkpoint and the run ends at
exactly train.images. Each host's name resolves to 127.0.0.1, as Debian's and Ubuntu's to 127.0.1.1, so the
process group across hosts forms only because every rank binds to the interface holding its node's address
(distributed/rendezvous.choose_interface); tests/test_ray_up.py trains across three hosts started by `ray up`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcgan_dist import checkpoint
from hosts import PREFIX, Host, available, made_hosts, tag_of

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(available() is not None, reason=str(available()))]

REPO = Path(__file__).resolve().parent.parent
RAY_CLI = str(Path(sys.executable).with_name("ray"))
BATCH = 16
# Ray's GCS declares a node dead after health checks every 1 s, 5 missed in a row (its defaults, 3 s and 5 after a
# 10 s timeout, took 65 s here: docs/cluster.md has both timelines). Authentication off, as set, not as found: Ray
# 2.60's `ray start --head` turns token authentication on when ~/.ray/auth_token exists (a local `ray.init()` run as
# this user leaves one), and the hosts share this machine's home, while a worker's `ray start` does not look there
# and is refused.
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
       "RAY_health_check_failure_threshold": "5", "RAY_AUTH_MODE": "disabled"}
# After a lost node, Ray Train first tries to restart the group at its old size, which cannot start, gives up after
# its worker-group start timeout (60 s by default; docs/cluster.md has the timeline with both), and tries again
# until its view of the nodes (refreshed every 20 s) has lost the node too: 3 s here, so that little of the wait
# runs past that refresh. The timeout bounds only the wait for the group's placement group (free CPUs are reserved
# at once), and a start that timed out is retried without counting as a failure. Ray Train's controller polls the
# group every 0.5 s (2 s by default): it sees the failure, and the end of the run, sooner.
START_TIMEOUT = json.dumps({"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3",
                                         "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}})


def _start_cluster(head: Host, others: list[Host]) -> str:
    """`ray start` on every host (one CPU each); the dashboard address."""
    import os

    env = {**os.environ, **ENV}
    r = head.run(RAY_CLI, "start", "--head", f"--node-ip-address={head.address}", "--port=6379", "--num-cpus=1",
                 "--include-dashboard=true", f"--dashboard-host={head.address}", "--dashboard-port=8265",
                 "--disable-usage-stats", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    for host in others:
        r = host.run(RAY_CLI, "start", f"--address={head.address}:6379", f"--node-ip-address={host.address}",
                     "--num-cpus=1", "--disable-usage-stats", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
    dashboard = f"http://{head.address}:8265"
    deadline = time.monotonic() + 60
    while len(_alive_nodes(dashboard)) < 1 + len(others):
        assert time.monotonic() < deadline, f"nodes alive: {_alive_nodes(dashboard)}"
        time.sleep(1)
    return dashboard


def _nodes(dashboard: str) -> list[dict]:
    r = subprocess.run([RAY_CLI, "list", "nodes", "--address", dashboard, "--format", "json", "--detail"],
                       capture_output=True, text=True, timeout=60)
    return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else []


def _alive_nodes(dashboard: str) -> list[str]:
    return sorted(n["node_ip"] for n in _nodes(dashboard) if n["state"] == "ALIVE")


def _stop_cluster(hosts: list[Host]) -> None:
    for host in hosts:
        host.run(RAY_CLI, "stop", "--force", timeout=60)


def _overrides(share: Path, target: int, *more: str) -> list[str]:
    every = 10 * 2 * BATCH
    return [f"data.shards={share / 'shards'}", "data.builtin=null", "data.loader_workers=0", "data.shuffle_buffer=200",
            "model.ngf=8", "model.ndf=8", f"train.batch_size={BATCH}", f"train.images={target}",
            "train.device=cpu", f"log.every_images={every}", f"log.sample_every_images={target}",
            "log.grid_size=16", f"run_dir={share / 'run'}", "trainer.num_workers=2", "trainer.cpus_per_worker=1",
            *more]


def _submit(dashboard: str, job: str, overrides: list[str], *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([RAY_CLI, "job", "submit", "--address", dashboard, "--submission-id", job, *options,
                           "--working-dir", str(REPO), "--", "python", "-m", "dcgan_dist.train", "--config",
                           "configs/mnist_local.yaml", *overrides], capture_output=True, text=True, timeout=300)


def _where(logs: str) -> dict[str, str]:
    """rank -> the address it ran on, from each rank's start-up line."""
    return dict(re.findall(r"dcgan_dist: rank (\d) of 2 on node \S+ \(([\d.]+)\)", logs))


def _made_by(tag: str) -> list[str]:
    """Everything tests/hosts.py made under one tag that still exists: namespaces, links, folders."""
    things = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    things += re.findall(r"^\d+: ([^:@]+)", subprocess.run(["ip", "-o", "link", "show"], capture_output=True,
                                                            text=True).stdout, re.MULTILINE)
    things += [p.name for p in Path("/var/tmp").iterdir()]
    return sorted(t for t in things if t.startswith(PREFIX) and tag_of(t) == tag)


SSH = ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"]


@pytest.mark.skipif(available(ssh=True) is not None, reason=str(available(ssh=True)))
def test_test_hosts_are_machines_of_their_own_and_leave_nothing_behind():
    """tests/hosts.py itself: each host has its own address (its name resolving to loopback), /tmp, /root and
    processes, and an sshd on port 22 that lets root in by key; all of it is gone after the `with`, also when the
    test inside fails, and what a killed test process left is swept by the next one."""
    with pytest.raises(RuntimeError, match="a failing test"):
        with made_hosts(2, ssh=True) as hosts:
            tag = tag_of(hosts[0].name)
            for host, other in (hosts, hosts[::-1]):
                assert re.findall(r"inet ([\d.]+)/24", host.run("ip", "-o", "-4", "addr").stdout) == [host.address]
                assert host.run("getent", "hosts", host.run("hostname").stdout.strip()).stdout.startswith("127.")
                assert host.processes() == []  # its sshd's listener aside: nothing of this machine's
                ssh = [*SSH, "-i", str(host.login.key), f"root@{host.address}"]
                r = subprocess.run([*ssh, "touch /tmp/mine /root/mine && hostname -I"], capture_output=True,
                                   text=True, timeout=60)
                assert r.returncode == 0 and r.stdout.split() == [host.address], r.stderr
                assert host.run("ls", "/tmp/mine", "/root/mine").returncode == 0
                assert other.run("ls", "/tmp/mine").returncode != 0 and other.run("ls", "/root/mine").returncode != 0
                host.run("rm", "-f", "/tmp/mine", "/root/mine")
            assert not Path("/tmp/mine").exists() and not Path("/root/mine").exists()
            assert _made_by(tag)
            raise RuntimeError("a failing test")
    assert _made_by(tag) == []

    # A test process killed while its hosts live: the next made_hosts sweeps them (and only orphans).
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\nsys.path.insert(0, sys.argv[1])\n"
                              "from hosts import made_hosts, tag_of\nwith made_hosts(1, ssh=True) as (h,):\n"
                              "    print(tag_of(h.name), flush=True)\n    time.sleep(600)", str(REPO / "tests")],
                             stdout=subprocess.PIPE, text=True)
    orphan = child.stdout.readline().strip()
    child.kill()
    child.wait()
    assert _made_by(orphan)
    with made_hosts(1) as (host,):
        assert _made_by(orphan) == [] and _made_by(tag_of(host.name))


def _job(dashboard: str, job: str) -> tuple[str, str]:
    """(status, logs) of a job."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    return str(client.get_job_status(job).value).lower(), client.get_job_logs(job)


@pytest.mark.parametrize("loss", ["link cut", "host killed"])
def test_an_elastic_group_outlives_a_lost_host_and_ends_at_train_images(hosts_share, loss):
    """`trainer.min_workers=1` with its defaults (max_failures 3 for an elastic group): the worker host's link set
    down (a partition), or its processes killed outright (its PID namespace ended), at N images. Ray declares the
    node dead, the group restarts on the head's host from the last checkpoint and ends at exactly train.images;
    the test prints the timeline and the images done twice."""
    periodic, target = 20 * 2 * BATCH, 120 * 2 * BATCH
    with made_hosts(2) as hosts:
        head, other = hosts
        try:
            dashboard = _start_cluster(head, [other])
            job = f"dcgan-hosts-{loss.split()[1]}"
            # A rank cut off with its host waits in its collective for the rank that Ray ended on the head until
            # trainer.collective_timeout_s; when it is rank 0, the restarted rank 0 waits that long for it to let
            # go of run_dir (files.one_writer), as a partitioned machine's hold on a shared file system lasts its
            # lease: 30 s, about when the smaller group has started anyway (60 s cost up to 30 s more).
            r = _submit(dashboard, job, _overrides(hosts_share, target, f"log.checkpoint_every_images={periodic}",
                                                   "trainer.min_workers=1", "trainer.collective_timeout_s=30"),
                        "--no-wait", "--runtime-env-json", START_TIMEOUT)
            assert r.returncode == 0, r.stdout + r.stderr
            run, t = hosts_share / "run", {}
            deadline = time.monotonic() + 420
            while time.monotonic() < deadline:
                status, logs = _job(dashboard, job)
                if status in ("succeeded", "failed", "stopped"):
                    break
                logged = [int(n) for n in re.findall(rf"\] (\d+)/{target} images", logs)]
                if "lost" not in t and max(logged, default=0) >= 2 * periodic and len(_where(logs)) == 2:
                    t["lost"] = time.monotonic()
                    other.cut() if loss == "link cut" else other.end()
                    # The progress at the loss: `ray job logs` lags the run, so also what rank 0 had checkpointed.
                    on_disk = [checkpoint.images_of(p) for p in checkpoint.list_checkpoints(run)]
                    t["logged before"] = max(logged + on_disk)
                if "lost" in t and "dead" not in t and other.address not in _alive_nodes(dashboard):
                    t["dead"] = time.monotonic()
                resumed = [int(n) for n in re.findall(r"resumed from \S+ at (\d+) images", logs)]
                if "lost" in t and "resumed" not in t and resumed:
                    t["resumed"], t["resumed at"] = time.monotonic(), resumed[-1]
                time.sleep(1)
            t["done"] = time.monotonic()
            assert status == "succeeded", f"{status}; {t}\n{logs[-4000:]}"
            assert {"lost", "dead", "resumed"} <= set(t), f"the loss did not play out: {t}\n{logs[-4000:]}"
            assert t["resumed at"] % periodic == 0 and t["resumed at"] <= t["logged before"], t
            final = checkpoint.load(checkpoint.latest(run), resumable=True)
            assert final.images == target and final.resume.geometry["world_size"] == 1
            print(f"{loss} at {t['logged before']} images logged: node declared dead after "
                  f"{t['dead'] - t['lost']:.0f} s, resumed from {t['resumed at']} on one host after "
                  f"{t['resumed'] - t['lost']:.0f} s (about {t['logged before'] - t['resumed at']} images done "
                  f"again), done at exactly {final.images} after {t['done'] - t['lost']:.0f} s")
        finally:
            _stop_cluster([head])
