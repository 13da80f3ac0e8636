"""Ray Train on a real two-node Ray cluster on this machine: DDP over gloo, SyncBN, a killed worker, `ray job submit`
and `ray job stop`, a preemption notice.

One cluster serves the module (a head and a second node, one CPU each, so the two training workers land on
different nodes). Its files live in a short temporary directory (RAY_TMPDIR; Unix socket paths must stay short),
and token authentication stays on with a token made for this module (RAY_AUTH_TOKEN), not one in ~/.ray.

Every Ray process listens and talks on loopback (127.0.0.1) only, never this machine's outward address: the nodes
get node_ip_address 127.0.0.1, and multi-node clusters are switched off in Ray's own sense (as on macOS and
Windows), because otherwise Ray turns a 127.0.0.1 address given to ray.init, or RAY_ADDRESS in a job's driver,
into the outward address (services.resolve_ip_for_localhost), where nothing listens, and the driver waits on
it for ever. The switch only steers that lookup; Cluster starts its second node all the same.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dcgan_dist import checkpoint
from multirank import free_port

REPO = Path(__file__).resolve().parent.parent
RAY_CLI = str(Path(sys.executable).with_name("ray"))
GLOBAL_BATCH = 2 * 16  # two workers x tiny_cfg's per-rank batch


@pytest.fixture(scope="module")
def two_nodes():
    """(cluster, dashboard URL) of a fresh two-node cluster, stopped afterwards whatever happened."""
    import ray
    from ray._private import ray_constants
    from ray._raylet import Config as RayConfig
    from ray.cluster_utils import Cluster

    root = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    cluster = None
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", root)
        env.setenv("RAY_AUTH_MODE", "token")
        env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")  # Ray Train's controller: 5 s by default
        # Ray Train's controller polls its worker group every 0.5 s (2 s by default): it sees a dead worker, and the
        # end of a run, sooner.
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        env.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")  # Ray's processes and job drivers: loopback
        env.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # this process, which read it at import
        RayConfig.initialize("")  # `import ray` read RAY_AUTH_MODE already; ray.init re-reads it the same way
        try:
            dashboard_port = free_port()
            cluster = Cluster(initialize_head=True, head_node_args={
                "node_ip_address": "127.0.0.1", "num_cpus": 1, "gcs_server_port": free_port(),
                "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
                "dashboard_agent_listen_port": free_port(),  # free ports: other clusters may be running
                # A killed node is seen dead in about 5 s instead of 15 (the preemption test waits for that).
                "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}})
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
            assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}, ray.nodes()
            yield cluster, f"http://127.0.0.1:{dashboard_port}"
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
            shutil.rmtree(root, ignore_errors=True)
    RayConfig.initialize("")  # back to this process's own authentication mode


def _events(run_dir: Path, tag: str) -> list[list]:
    """One scalar's events in each TensorBoard event file of a run (one file per attempt), oldest file first."""
    files = sorted((run_dir / "tb").glob("events.out.tfevents.*"), key=lambda p: float(p.name.split(".")[3]))
    events = []
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        events.append(acc.Scalars(tag) if tag in acc.Tags()["scalars"] else [])
    return events


def _scalars(run_dir: Path, tag: str = "loss/D") -> list[list[int]]:
    """The steps (images) of one scalar in each TensorBoard event file of a run, oldest file first."""
    return [[e.step for e in attempt] for attempt in _events(run_dir, tag)]


def _alive_workers(address: str) -> list:
    """Ray Train's worker actors alive on the cluster now."""
    from ray.util.state import list_actors

    return list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])


def _ray_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files that Ray Train stored (default storage: <run_dir>/ray/<run name>/)."""
    return sorted((run_dir / "ray" / run_dir.name).glob("ckpt-*/checkpoints/ckpt-*.pt"))


@pytest.mark.ray
def test_workers_that_do_not_fit_a_local_instance_fail_at_once(two_nodes, mnist_shards, tmp_path):
    """No cluster to join (none in RAY_ADDRESS, none that `ray start` recorded here; two_nodes runs, visible in
    `ps` only, and is not joined by guess): Ray starts a local instance, which can never hold 4 GPU workers; say
    so, don't wait (a joined cluster would wait for its autoscaler instead)."""
    ray_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    # two_nodes' token stays in the environment: joining it by guess would succeed, and then wait.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_dir, RAY_USAGE_STATS_ENABLED="0")
    try:
        proc = subprocess.run([sys.executable, "-m", "dcgan_dist.train", f"data.shards={mnist_shards}",
                               "data.builtin=null", f"run_dir={tmp_path / 'run'}", "trainer.num_workers=4",
                               "trainer.use_gpu=true"], capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"it waited, on a cluster it joined by guess: {err.stderr}") from None
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert proc.returncode != 0
    assert "trainer: this machine has" in proc.stderr and "0 GPU of the 4 needed" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.ray
def test_the_cluster_ray_start_recorded_here_is_joined(two_nodes, mnist_shards, tmp_path):
    """The same command where `ray start` has recorded a cluster on this machine (RAY_TMPDIR/ray/
    ray_current_cluster, here naming two_nodes): it joins that cluster, which may yet grow, so it waits for the
    autoscaler and says so instead of failing."""
    cluster, _ = two_nodes
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(cluster.address)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "dcgan_dist.train", f"data.shards={mnist_shards}",
                             "data.builtin=null", f"run_dir={tmp_path / 'run'}", "trainer.num_workers=4",
                             "trainer.use_gpu=true"], stderr=subprocess.PIPE, text=True, env=env)
    said = []
    try:
        deadline = time.monotonic() + 120
        while not any("waiting for the autoscaler" in line for line in said) and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            said.append(line)
    finally:
        proc.kill()
        proc.wait()
    assert any("the cluster has 2 CPU of the 4 needed, 0 GPU of the 4 needed now; waiting for the autoscaler" in line
               for line in said), "".join(said)[-2000:]


@pytest.mark.ray
def test_worker_killed_on_two_nodes_resumes_and_ends_at_target(two_nodes, tiny_cfg):
    """SyncBN + DDP over gloo across two nodes; SIGKILL one worker after the first checkpoint; Ray restarts the
    group from that checkpoint (FailureConfig) and the run ends at exactly train.images."""
    from dcgan_dist.distributed import ray_launch
    from dcgan_dist.train.loop import train

    cluster, _ = two_nodes
    cfg = tiny_cfg
    target = 100 * GLOBAL_BATCH
    cfg.trainer.num_workers, cfg.trainer.sync_bn, cfg.trainer.max_failures = 2, True, 1
    cfg.train.images, cfg.log.every_images = target, 10 * GLOBAL_BATCH
    cfg.log.checkpoint_every_images, cfg.log.sample_every_images = 20 * GLOBAL_BATCH, target
    run_dir = Path(cfg.run_dir)

    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = ray_launch.run(cfg, train)
        except BaseException as err:  # reported by the main thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    killed, nodes, deadline = None, set(), time.monotonic() + 300  # a hang guard: CI's restart took 70 s
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        workers = _alive_workers(cluster.address)
        if len(workers) == 2:
            nodes = {w.node_id for w in workers}
            if _ray_checkpoints(run_dir):
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    thread.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not thread.is_alive(), "training did not finish in time"
    assert "error" not in outcome, f"training failed: {outcome.get('error')!r}"
    assert killed is not None, "the run ended before a worker could be killed"
    assert len(nodes) == 2, f"both workers ran on one node: {nodes}"

    result = outcome["result"]
    final = checkpoint.load(checkpoint.latest(result.checkpoint.path), map_location="cpu")
    assert final.images == target and final.resume.step == target // GLOBAL_BATCH
    assert final.resume.geometry["world_size"] == 2
    assert any("running_mean" in k for k in final.D)  # synchronised BN saves plain batchnorm entries

    # The first attempt's events, then the resumed attempt's: it picked up after a checkpoint, not at 0.
    steps = _scalars(run_dir)
    assert len(steps) >= 2, f"one TensorBoard event file: the run never restarted ({steps})"
    resumed_from = steps[-1][0] - cfg.log.every_images
    assert 0 < resumed_from and resumed_from % cfg.log.checkpoint_every_images == 0, steps
    assert steps[-1][-1] == target


@pytest.mark.ray
def test_ray_job_stop_checkpoints_the_count_reached_and_the_same_job_resumes(two_nodes, mnist_shards, tmp_path):
    """The documented commands as typed: `ray job submit --no-wait --working-dir . -- python -m dcgan_dist.train
    ... trainer.num_workers=2`, `ray job stop` once it logged N images -> a checkpoint at >= N images (at a log
    interval, not a periodic one), the driver's exit 128 + SIGTERM; then the same `ray job submit` resumes from
    that checkpoint and ends at exactly train.images."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    _, dashboard = two_nodes
    client = JobSubmissionClient(dashboard)
    run_dir = tmp_path / "job-run"
    every, periodic, target = 10 * GLOBAL_BATCH, 100 * GLOBAL_BATCH, 150 * GLOBAL_BATCH
    overrides = [
        f"data.shards={mnist_shards}", "data.builtin=null", "data.loader_workers=1", "data.shuffle_buffer=200",
        "model.ngf=8", "model.ndf=8", "train.batch_size=16", f"train.images={target}", "train.device=cpu",
        f"log.every_images={every}", f"log.sample_every_images={target}", f"log.checkpoint_every_images={periodic}",
        "log.grid_size=16", f"run_dir={run_dir}", "trainer.num_workers=2", "trainer.sync_bn=true",
        "perf.amp=bf16",  # what auto picks on CPUs with native bf16: synchronised batchnorm under bf16 autocast
    ]
    # As docs/cluster.md and README give it: the job's driver may take this long after `ray job stop` before Ray
    # kills it (default 3 s).
    runtime_env = '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "300"}}'

    def submit(job: str, *wait: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY_CLI, "job", "submit", "--address", dashboard, "--submission-id", job, *wait, "--runtime-env-json",
             runtime_env, "--working-dir", str(REPO), "--", sys.executable, "-m", "dcgan_dist.train", "--config",
             "configs/mnist_local.yaml", *overrides], capture_output=True, text=True, timeout=240)

    first = f"dcgan-stop-{secrets.token_hex(4)}"
    assert submit(first, "--no-wait").returncode == 0
    reached, deadline = 0, time.monotonic() + 180
    while reached < 2 * every and time.monotonic() < deadline:
        assert client.get_job_status(first) in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(first)
        time.sleep(0.5)
        reached = max([0, *(step for attempt in _scalars(run_dir) for step in attempt)])
    assert reached >= 2 * every, f"the job logged {reached} images in time:\n{client.get_job_logs(first)[-3000:]}"
    asked = time.monotonic()
    stop = subprocess.run([RAY_CLI, "job", "stop", "--address", dashboard, first], capture_output=True, text=True,
                          timeout=180)
    took = time.monotonic() - asked  # `ray job stop` waits until the job has stopped
    logs = client.get_job_logs(first)
    assert stop.returncode == 0 and client.get_job_status(first) == JobStatus.STOPPED, stop.stdout + logs[-3000:]
    written = [checkpoint.images_of(p) for p in checkpoint.list_checkpoints(run_dir)]
    at_stop = max(written)
    assert at_stop >= reached and at_stop % every == 0 and at_stop % periodic != 0 and at_stop < target, written
    assert f"stopped by signal {signal.SIGTERM.value}" in logs, logs[-3000:]
    assert at_stop in _stored_images(run_dir), "the stop's checkpoint was not reported to Ray"
    print(f"ray job stop: logged {reached} images when stopped, checkpoint at {at_stop}, stopped after {took:.1f} s")

    second = submit(f"dcgan-stop-{secrets.token_hex(4)}")  # `ray job submit` waits for the end
    assert second.returncode == 0, f"{second.stdout[-3000:]}\n{second.stderr[-3000:]}"
    assert f"at {at_stop} images" in second.stdout, second.stdout[-3000:]  # "resumed from ... at N images"
    steps = _scalars(run_dir)
    assert steps[-1][0] == at_stop + every and steps[-1][-1] == target, steps
    final = checkpoint.load(_ray_checkpoints(run_dir)[-1], resumable=True)
    assert final.images == target and final.resume.geometry["world_size"] == 2


def _images(path: Path) -> int:
    return int(path.stem.split("-")[1])  # ckpt-000000001600.pt


def _stored_images(run_dir: Path) -> list[int]:
    """The image counts of the checkpoints Ray Train stored so far."""
    return [_images(p) for p in _ray_checkpoints(run_dir)]


def _world_size(path: Path) -> int | None:
    """The world size a stored checkpoint was written at; None while Ray is still copying it in."""
    try:
        return checkpoint.load(path).resume.geometry["world_size"]
    except checkpoint.CheckpointError:
        return None


@pytest.mark.ray
@pytest.mark.slow
def test_preemption_notice_checkpoints_then_the_group_shrinks_and_grows(two_nodes, mnist_shards, tmp_path):
    """`python -m dcgan_dist.train ... trainer.num_workers=2 trainer.min_workers=1` (an elastic group) on two
    nodes. `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds 10` on the node of
    one worker (a spot reclaim notice) -> a just-in-time checkpoint at the next log interval, later than the last
    periodic one -> that node killed at the deadline -> the group goes on with one worker from that checkpoint ->
    a node joins -> the group grows back to two and the run ends at exactly train.images. Any failure other than
    the preemption fails the run (max_failures=0). Runs last in the module: it leaves the cluster with a new
    second node."""
    cluster, _ = two_nodes
    run_dir = tmp_path / "run"
    # The notice's deadline: the just-in-time checkpoint came 1.5 s after the drain here (Ray Train polls drains every
    # second, then the next log interval), and the test waits for it before it kills the node in any case.
    notice_s = 10
    every, periodic = 8 * GLOBAL_BATCH, 25 * GLOBAL_BATCH  # never the same image count before 6400
    target = 400 * GLOBAL_BATCH
    command = [sys.executable, "-m", "dcgan_dist.train", f"data.shards={mnist_shards}", "data.builtin=null",
               "data.loader_workers=0", "data.shuffle_buffer=200", "model.ngf=8", "model.ndf=8", "train.batch_size=16",
               f"train.images={target}", "train.device=cpu", f"log.every_images={every}",
               f"log.sample_every_images={target}", f"log.checkpoint_every_images={periodic}", "log.grid_size=16",
               f"run_dir={run_dir}", "trainer.num_workers=2", "trainer.min_workers=1", "trainer.sync_bn=true",
               "trainer.max_failures=0", "trainer.max_preemption_failures=1", "trainer.elastic_check_s=2"]

    head = cluster.head_node.node_id
    others = {n.node_id: n for n in cluster.list_all_nodes() if n.node_id != head}
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                  env={**os.environ, "RAY_ADDRESS": cluster.address})
    seen: dict = {}  # what the test saw, in order
    deadline = time.monotonic() + 300
    try:
        while driver.poll() is None and time.monotonic() < deadline:
            stored = _stored_images(run_dir)
            if "drained" not in seen:
                group = _alive_workers(cluster.address)
                periodic_ones = [n for n in stored if n % periodic == 0]
                if len(group) == 2 and periodic_ones:
                    seen["nodes"] = {w.node_id for w in group}
                    seen["drained"] = next(w.node_id for w in group if w.node_id in others)
                    seen["last periodic"] = max(periodic_ones)
                    drain = subprocess.run(
                        [RAY_CLI, "drain-node", "--address", cluster.address, "--node-id", seen["drained"],
                         "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot instance reclaim",
                         "--deadline-remaining-seconds", str(notice_s)], capture_output=True, text=True,
                        timeout=60)
                    assert drain.returncode == 0, drain.stdout + drain.stderr
                    seen["deadline"] = time.monotonic() + notice_s
            elif "just in time" not in seen:
                just_in_time = [n for n in stored if n % periodic != 0]
                if just_in_time:
                    seen["just in time"] = just_in_time[0]
            elif "killed" not in seen:
                if time.monotonic() > seen["deadline"]:
                    # The reclaim itself, at the deadline as a spot instance's: the node goes at once (no
                    # graceful stop).
                    cluster.remove_node(others[seen["drained"]], allow_graceful=False)
                    seen["killed"] = time.monotonic()
            elif "joined" not in seen:
                # The shrunk group has checkpointed (with one worker) before a node comes back.
                if 1 in {_world_size(p) for p in _ray_checkpoints(run_dir) if _images(p) > seen["just in time"]}:
                    seen["one worker after the deadline, s"] = time.monotonic() - seen["deadline"]
                    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
                    seen["joined"] = True
            time.sleep(0.2)
    finally:
        if driver.poll() is None:
            driver.kill()
    said = log_path.read_text()
    assert driver.wait() == 0, f"the run failed or hung; {seen}\n{said[-4000:]}"
    assert "joined" in seen, f"the run ended before the preemption played out: {seen}"
    assert len(seen["nodes"]) == 2, f"both workers ran on one node: {seen}"
    assert "preemption notice: node" in said and "writing a just-in-time checkpoint" in said, said[-4000:]

    # The just-in-time checkpoint: at a log interval after the notice, later than the last periodic checkpoint.
    last_periodic, just_in_time = seen["last periodic"], seen["just in time"]
    assert just_in_time > last_periodic and just_in_time % every == 0, seen

    # Attempts, one TensorBoard file each: two workers until the notice (nothing stepped after the checkpoint),
    # one worker from the just-in-time checkpoint on, then two again to the end.
    sizes = [[int(e.value) for e in attempt] for attempt in _events(run_dir, "perf/world_size")]
    steps = _scalars(run_dir)
    assert len(steps) == 3, f"expected three attempts (two workers, one, two): {steps}"
    assert [set(s) for s in sizes] == [{2}, {1}, {2}], sizes
    assert steps[0][-1] == just_in_time, f"attempt 1 stepped past its just-in-time checkpoint: {steps[0][-3:]}"
    assert steps[1][0] == just_in_time + every, f"attempt 2 did not resume at {just_in_time}: {steps[1][:3]}"
    # The growth restart: each restart says where it resumed. The grown group resumed from a periodic checkpoint
    # of the one-worker group, at most one log interval past that group's last log; what it repeats depends on
    # which of that group's checkpoints Ray had registered (864 images, more than one interval, in one run here).
    resumed = sorted({int(n) for n in re.findall(r"resumed from \S+ at (\d+) images", said)})
    assert len(resumed) == 2 and resumed[0] == just_in_time, resumed
    grown_from = resumed[1]
    repeated = steps[1][-1] - grown_from
    assert just_in_time < grown_from and grown_from % periodic == 0 and repeated > -every, (grown_from, steps[1])
    assert steps[2][0] == (grown_from // every + 1) * every, (grown_from, steps[2][:2])
    assert steps[2][-1] == target

    final = checkpoint.load(_ray_checkpoints(run_dir)[-1])
    assert final.images == target and final.resume.geometry["world_size"] == 2
    print(f"preemption: last periodic checkpoint {last_periodic} images, just-in-time {just_in_time}; a one-worker "
          f"checkpoint {seen['one worker after the deadline, s']:.1f} s after the deadline; grown back at "
          f"{grown_from} images (repeats {max(0, repeated)} images)")
