"""Launch the training loop on a Ray cluster: Ray Train's TorchTrainer runs it on every worker as DDP.

`python -m dcgan_dist.train ... trainer.num_workers=N` lands here, with the loop (train/loop.py's train) handed in,
so that this module knows Ray and ranks but nothing of the GAN. The driver connects to RAY_ADDRESS's cluster
(`ray job submit` sets it), else the one `ray start` recorded on this machine, else a fresh local instance, and each
Ray worker calls the same loop as a local run; Ray has already joined the process group (NCCL on GPUs, gloo on
the CPU) and set RANK/WORLD_SIZE/LOCAL_RANK, which context.init picks up.

Checkpoints: the loop has rank 0 write its checkpoint file, then calls the hook below on every rank, so every rank
calls ray.train.report equally often and only rank 0 attaches a checkpoint. After a worker dies, Ray restarts the
whole group (up to trainer.max_failures times) and ray.train.get_checkpoint() hands the loop the last one; rerunning
the same command with the same run_dir and storage resumes the same way.

Clusters that change under a run:
- Elastic groups (trainer.min_workers): Ray starts as many workers as fit, between min_workers and num_workers;
  a lost node restarts the group smaller, and every trainer.elastic_check_s Ray looks for room to grow and
  restarts it larger. Each restart resumes from the last checkpoint at the new world size (train/resume.py).
- Preemption notices (a spot reclaim, `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`): the loop asks
  ray.train.get_preemption_info() at every log interval on every rank; on a notice it writes and reports a
  just-in-time checkpoint and stops stepping, and the worker waits here (_hold) until the reclaimed node is gone,
  so that Ray restarts the group at once without it (at the latest trainer.preemption_grace_s after the
  notice's deadline). Those restarts count against trainer.max_preemption_failures, not max_failures.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

# Ray's driver folds worker lines that differ only in their numbers into one "[repeated Nx across cluster]", which
# left one rank's start-up line of N (rendezvous.py: "dcgan_dist: rank R of N on node ..."): never fold those.
# Read when Ray is imported, hence here; a pattern the user set is kept.
os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", "dcgan_dist: rank ")

import ray  # noqa: E402
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .. import checkpoint
from .. import config as config_mod
from ..config import Config, ConfigError
from ..data import storage
from . import private_api, ray_files, rendezvous, watchdog
from .interruptions import Notice, Preempted, Stopped, StopRequest

# The training loop: loop(cfg, resume_from=None, on_checkpoint=None), called on every worker.
Loop = Callable[..., dict]
# trainer.max_failures when unset for an elastic group: restarts from the last checkpoint after lost nodes.
ELASTIC_MAX_FAILURES = 3
# The oldest Ray this launcher runs on: FailureConfig(preemption_grace_s=...) is new in 2.60 (2.59 raises a
# TypeError on it); pyproject.toml asks for the same.
RAY_MIN = (2, 60)


class RayUnsupported(RuntimeError):
    """The installed Ray cannot run this launcher; the message says what to change."""


PRINT_PATCH = private_api.PRINT_PATCH_ENV_VAR


def check_ray() -> None:
    """Ray 2.60 or newer with Train V2 (its default; RAY_TRAIN_V2_ENABLED=0 turns it off), or RayUnsupported; a
    warning when it is not the Ray that pyproject.toml pins."""
    version = tuple(int(p) for p in ray.__version__.split(".")[:2])
    if version < RAY_MIN:
        raise RayUnsupported(f"Ray {ray.__version__} is installed; trainer.num_workers > 0 needs Ray "
                             f"{'.'.join(map(str, RAY_MIN))} or newer: pip install 'ray[train,default]>=2.60'")
    if not hasattr(ray.train, "get_preemption_info"):  # ray.train exports it only with Train V2 on
        raise RayUnsupported(f"RAY_TRAIN_V2_ENABLED={os.environ.get('RAY_TRAIN_V2_ENABLED')} turns Ray Train V2 off; "
                             f"this launcher uses V2's elastic groups and preemption notices: unset it")
    private_api.check()
    _say_if_not_pinned()


@functools.cache  # said once per process
def _say_if_not_pinned() -> None:
    """One line on stderr when the Ray running this differs from the one the code's pyproject.toml pins.

    Under `ray job submit --working-dir .` this process runs on the head with the cluster's Ray while the code is
    the user's checkout, whose pin is the Ray that `pip install -e .` gave the user's `ray` command and that
    `ray up` installs on the nodes: a difference means the client and the cluster disagree (Ray's job client knows
    both versions but says nothing)."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    text = pyproject.read_text() if pyproject.is_file() else ""
    pin = re.search(r'^\s*"ray\[[^\]]*\]==([^"]+)"', text, re.M) if 'name = "dcgan-dist"' in text else None
    if pin and pin.group(1) != ray.__version__:
        print(f"dcgan_dist.ray_launch: warning: Ray {ray.__version__} runs this, but {pyproject} pins Ray "
              f"{pin.group(1)} (the `ray` that `pip install -e .` gives your machine): `ray up` again installs the "
              f"pin on the cluster; or install Ray {ray.__version__} on your machine", file=sys.stderr, flush=True)


def _report(path: Path | None, metrics: dict) -> None:
    """The loop's checkpoint hook: every rank reports; rank 0 (the one given a path) attaches its file."""
    if path is None:
        ray.train.report(metrics)
        return
    # Stage the one new file in a directory of its own: Ray uploads whole directories, and the run's checkpoint
    # folder also holds the older checkpoints it keeps.
    with tempfile.TemporaryDirectory() as staging:
        checkpoint.copy_into(path, staging)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(staging), checkpoint_dir_name=path.stem)


# Ray Train's fallback when a drain names no deadline (its DEFAULT_PREEMPTION_DEADLINE_S), and how much longer
# than the deadline a held worker waits for the restart before it gives up with an error.
UNKNOWN_DEADLINE_S, HOLD_MARGIN_S = private_api.preemption_deadline_fallback_s(), 60.0
# How often Ray Train's view of the cluster's nodes is refreshed (Ray 2.60's AutoscalingCoordinator ticks every
# 20 s): a group restarted before that still counts a dead node's CPUs and GPUs, waits a minute for workers that
# cannot start there (its worker-group start timeout) and only then starts smaller.
NODE_VIEW_REFRESH_S = private_api.node_view_tick_s() + 1.0


def _preemption() -> Notice | None:
    """The loop's preemption probe: Ray's notice, or None. A barrier: every rank calls it."""
    info = ray.train.get_preemption_info()
    if info is None:
        return None
    deadline = time.time() + UNKNOWN_DEADLINE_S if info.deadline_ms is None else info.deadline_ms / 1000
    nodes = ", ".join(f"{node[:12]} (ranks {', '.join(map(str, ranks))})"
                      for node, ranks in sorted(info.preempted_node_to_ranks.items()))
    left = "no deadline given" if info.deadline_ms is None else \
        f"reclaimed in {max(0.0, info.deadline_ms / 1000 - time.time()):.0f} s"
    return Notice(f"node {nodes} {left}", deadline, frozenset(info.preempted_node_to_ranks))


def _gone(nodes: frozenset[str]) -> bool:
    """Whether Ray has seen every one of these nodes die."""
    return not nodes & {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _hold(notice: Preempted, grace_s: float) -> None:
    """After the just-in-time checkpoint: wait, without stepping, until Ray has seen the reclaimed nodes die,
    then (NODE_VIEW_REFRESH_S later) end this attempt so that Ray restarts the group at once, sized by what is
    left (a rank on a reclaimed node ends with it). Ray restarts anyway grace_s after the deadline; an error if
    even that never comes.

    Ray's own advice is to keep training after the notice. Here that would repeat all of that work (the restart
    resumes from the checkpoint) and, worse, the surviving ranks' next collective fails when the node goes, which
    Ray counts as an ordinary failure (max_failures) if it sees that error first. A restart at the deadline
    itself, before Ray has noticed the node's death, counts the dying node's CPUs and GPUs as free and waits a
    minute for workers that can never start there: hence trainer.preemption_grace_s, the wait for the death and
    then for Ray's view of the nodes to catch up (NODE_VIEW_REFRESH_S).
    Ray counts the death as a preemption only after the deadline; a node that dies earlier is an ordinary failure.
    """
    until = notice.notice.deadline + grace_s + HOLD_MARGIN_S
    nodes, gone_at = notice.notice.nodes, None
    print(f"dcgan_dist.ray_launch: rank {ray.train.get_context().get_world_rank()}: {notice}; waiting for the "
          f"reclaimed node to go, then for Ray to restart the group without it", flush=True)
    while time.time() < until:
        if gone_at is None and nodes and _gone(nodes):
            gone_at = time.time()
        if gone_at is not None and time.time() > gone_at + NODE_VIEW_REFRESH_S:
            return
        time.sleep(1.0)
    raise RuntimeError(f"{notice}, but Ray did not restart the group within {grace_s + HOLD_MARGIN_S:g} s of the "
                       f"preemption deadline")


# A node whose ranks hung this many times in a row gets no rank in the next worker group (until it is replaced).
HANGS_TO_LEAVE_OUT = 2


@ray.remote(num_cpus=0)
class RunControl:
    """The driver's side of the run, for every rank to reach: the signal the driver was stopped with (read at each
    log interval; 0: none), the watchdogs' board (heartbeats, and the hangs they report), and the nodes left out of
    the next worker group. On the driver's node, so a frozen or lost worker node cannot take it down.

    `need`: what the smallest group asks of the cluster ({"CPU": n, "GPU": m}): a node is left out only when the
    other live nodes can still hold that, so that a run on too few nodes is never left waiting for ever. Never in
    an elastic group (`elastic`): Ray sizes it by every node's resources, the one left out included, and would
    try for ever to start a group that cannot be placed."""

    def __init__(self, need: dict | None = None, elastic: bool = False):
        self.signum = 0
        self.beats: dict[int, dict] = {}
        self.hangs: list[dict] = []
        self.need, self.elastic = need or {}, elastic
        self.groups: set[str] = set()      # the worker groups whose hang is counted (every rank reports it)
        self.in_a_row: dict[str, int] = {}  # node ID -> hangs in a row that named it
        self.left_out: set[str] = set()

    def request(self, signum: int) -> None:
        self.signum = self.signum or signum

    def get(self) -> int:
        return self.signum

    def post(self, rank: int, beat: dict) -> None:
        self.beats[rank] = beat

    def read(self) -> dict[int, dict]:
        return self.beats

    def hung(self, report: dict) -> None:
        """A rank's hang report: the first one of a worker group counts, for the nodes it names and against the
        rest (a hang that named another node breaks a node's row)."""
        self.hangs.append(report)
        if report.get("group") in self.groups:
            return
        self.groups.add(report.get("group"))
        named = set(report.get("nodes") or [])
        self.in_a_row = {node: self.in_a_row.get(node, 0) + 1 for node in named}
        for node, count in self.in_a_row.items():
            if count >= HANGS_TO_LEAVE_OUT and node not in self.left_out:
                self._leave_out(node, count)

    def _leave_out(self, node: str, count: int) -> None:
        if self.elastic:
            print(f"dcgan_dist.ray_launch: node {node[:12]} hung {count} times in a row; an elastic group keeps "
                  f"every node (Ray sizes it by all of them)", flush=True)
            return
        alive = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        rest = [res for nid, res in alive.items() if nid != node and nid not in self.left_out]
        short = {k: n for k, n in self.need.items() if n > sum(res.get(k, 0) for res in rest)}
        if short:
            print(f"dcgan_dist.ray_launch: node {node[:12]} hung {count} times in a row, but the other nodes cannot "
                  f"hold the group ({short} short): it stays in", flush=True)
            return
        self.left_out.add(node)
        print(f"dcgan_dist.ray_launch: node {node[:12]} hung {count} times in a row: the next worker groups leave "
              f"it out (a node that replaces it is used again)", flush=True)

    def leave_out(self) -> list[str]:
        """The nodes left out that are still alive (a dead one's replacement has an ID of its own)."""
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        return sorted(self.left_out & alive)

    def hang_reports(self) -> list[dict]:
        return self.hangs


def _left_out(control_name: str) -> list[str]:
    """In Ray Train's controller, before each worker group starts: the nodes to leave out."""
    return ray.get(ray.get_actor(control_name).leave_out.remote(), timeout=30)


def _stop_probe(control) -> int:
    """The loop's stop probe: the driver's signal number, or 0."""
    return ray.get(control.get.remote())


class _ActorBoard:
    """The watchdog's board (distributed/watchdog.py) in the RunControl actor; each beat carries its Ray node."""
    TIMEOUT_S = 10.0

    def __init__(self, control):
        self.control, self.node_id = control, ray.get_runtime_context().get_node_id()

    def post(self, rank: int, beat: dict) -> None:
        self.control.post.remote(rank, {**beat, "node_id": self.node_id})

    def read(self) -> dict[int, dict]:
        return {int(k): v for k, v in ray.get(self.control.read.remote(), timeout=self.TIMEOUT_S).items()}

    def hung(self, report: dict) -> None:
        ray.get(self.control.hung.remote(report), timeout=self.TIMEOUT_S)


def worker_loop(loop_config: dict, loop: Loop) -> None:
    """Ray Train's per-worker function: the local training loop, resumed from Ray's latest checkpoint if any.
    A stop asked for by the driver ends it normally, after the checkpoint at the count reached."""
    cfg = config_mod.from_dict(loop_config["cfg"])
    # The ID that Ray's commands and a hang report name this rank's node by.
    print(f"dcgan_dist: rank {ray.train.get_context().get_world_rank()} is on Ray node "
          f"{ray.get_runtime_context().get_node_id()}", flush=True)
    control = ray.get_actor(loop_config["control"])
    hooks = dict(on_checkpoint=_report, preemption=_preemption, stop_probe=partial(_stop_probe, control),
                 board=_ActorBoard(control))
    restored = ray.train.get_checkpoint()
    try:
        if restored is None:
            loop(cfg, **hooks)
            return
        with restored.as_directory() as local:  # a download for bucket storage, the directory itself on a file system
            loop(cfg, resume_from=checkpoint.latest(local), **hooks)
    except Preempted as notice:
        _hold(notice, cfg.trainer.preemption_grace_s)
    except Stopped as stopped:
        print(f"dcgan_dist.ray_launch: rank {ray.train.get_context().get_world_rank()}: {stopped}", flush=True)


def _absolute(path: str) -> str:
    """Local paths resolved on the driver, so every worker (whatever its working directory) means the same."""
    return path if storage.is_remote(path) else str(Path(path).expanduser().resolve())


def resolved(cfg: Config) -> Config:
    """A checked copy of cfg for the workers, with run_dir, data.shards and storage made absolute."""
    t = cfg.trainer
    if t.num_workers < 1:
        raise ConfigError(f"trainer.num_workers: {t.num_workers}; Ray needs at least 1 (0 trains without Ray)")
    if t.use_gpu and cfg.train.device == "cpu":
        raise ConfigError("trainer.use_gpu=true with train.device=cpu: NCCL needs the model on the GPU")
    if not t.use_gpu and cfg.train.device == "cuda":
        raise ConfigError("train.device=cuda needs trainer.use_gpu=true: Ray gives GPU-less workers no GPU")
    out = config_mod.from_dict(config_mod.to_dict(cfg))
    out.run_dir = _absolute(cfg.run_dir)
    out.data.shards = "::".join(_absolute(part) for part in cfg.data.shards.split("::"))
    out.trainer.storage_path = _absolute(t.storage_path) if t.storage_path else str(Path(out.run_dir) / "ray")
    if t.max_failures is None:
        # An elastic group is asked for to outlive a lost node, and Ray counts that loss as a failure: with no
        # restarts allowed, the run would end at the first one.
        out.trainer.max_failures = ELASTIC_MAX_FAILURES if _elastic(t) else 0
    return out


def _elastic(t) -> bool:
    return t.min_workers is not None and t.min_workers < t.num_workers


def _bind_to_node_address() -> None:
    """On each worker, before Ray builds the process group: its sockets on this node's Ray address, and NCCL's
    record of collectives in flight kept for a hang report."""
    rendezvous.choose_interface(ray.util.get_node_ip_address())
    watchdog.nccl_tracing()


# Ray's torch backend, with every worker's interface chosen before the process group forms (Ray offers no public
# hook that runs on the workers before it): private_api says why and checks it.
_TorchBackend = private_api.torch_backend_running_first(_bind_to_node_address)


@dataclass
class _TorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _TorchBackend


def trainer_for(cfg: Config, loop: Loop, control: str) -> TorchTrainer:
    """The TorchTrainer for a resolved cfg: one worker per GPU (use_gpu) or per cpus_per_worker CPUs; an elastic
    group of min_workers..num_workers of them when trainer.min_workers is set. control: the RunControl actor's
    name."""
    t = cfg.trainer
    elastic = _elastic(t)
    return TorchTrainer(
        partial(worker_loop, loop=loop),  # pickled by reference: workers import the loop's module themselves
        train_loop_config={"cfg": config_mod.to_dict(cfg), "control": control},
        # The process group's own timeout bounds its rendezvous; context.init then sets collective_timeout_s.
        torch_config=_TorchConfig(backend="nccl" if t.use_gpu else "gloo", timeout_s=math.ceil(t.startup_timeout_s)),
        scaling_config=ScalingConfig(num_workers=(t.min_workers, t.num_workers) if elastic else t.num_workers,
                                     use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker},
                                     elastic_resize_monitor_interval_s=t.elastic_check_s),
        run_config=RunConfig(
            name=Path(cfg.run_dir).name,
            storage_path=t.storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures,
                                         max_preemption_failures=t.max_preemption_failures,
                                         preemption_grace_s=t.preemption_grace_s),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.log.keep_checkpoints),
            callbacks=[private_api.leave_out_nodes_callback(partial(_left_out, control))],
        ),
    )


def _connect() -> bool:
    """Join RAY_ADDRESS's cluster (`ray job submit` sets it), else the one `ray start` recorded on this machine,
    else start a local instance.

    Never a cluster that Ray would guess from `ps` (its "auto" address joins any GCS process it sees: another
    user's, another Ray temp dir's, a container's). Returns True when joining a cluster, False for a local instance
    (which never gains nodes).
    """
    if ray.is_initialized():
        return True
    if not os.environ.get("RAY_ADDRESS") and not ray_files.current_cluster_file().is_file():
        _start_local()
        return False
    try:
        ray.init()  # RAY_ADDRESS, else the recorded address
        return True
    except ConnectionError:  # a record left by a cluster that is gone
        if os.environ.get("RAY_ADDRESS"):
            raise
        _start_local()
        return False


def _start_local() -> None:
    """Start a fresh single-node instance that listens and talks on loopback (127.0.0.1) only.

    It never gains nodes, so nothing needs this machine's outward address. Ray turns a node address of 127.0.0.1
    into that outward address (services.resolve_ip_for_localhost) unless multi-node clusters are off, as they are
    by default on macOS and Windows: turn them off here, for this process (Ray read the switch at import) and for
    the processes the instance starts (they read it from the environment).
    """
    private_api.init_local_on_loopback()


def _check_fits(t, can_grow: bool) -> None:
    """Say at once when the workers do not fit: a cluster may autoscale to them, a local instance never will."""
    have = ray.cluster_resources()
    least = t.num_workers if t.min_workers is None else t.min_workers  # an elastic group starts with what fits
    need = {"CPU": least * t.cpus_per_worker, "GPU": least if t.use_gpu else 0}
    short = ", ".join(f"{have.get(k, 0):g} {k} of the {n:g} needed" for k, n in need.items() if n > have.get(k, 0))
    if not short:
        return
    hint = "lower trainer.num_workers or trainer.cpus_per_worker, or set trainer.use_gpu=false"
    if not can_grow:
        raise ConfigError(f"trainer: this machine has {short}; {hint}")
    print(f"dcgan_dist.ray_launch: the cluster has {short} now; waiting for the autoscaler to add nodes "
          f"(if it has none: {hint})", file=sys.stderr, flush=True)


def _fit(trainer: TorchTrainer) -> ray.train.Result:
    """trainer.fit() in a thread of its own while this (main) thread waits, ready for signals.

    Train V2's fit() in the main thread installs a SIGINT handler of its own that aborts the run, losing what
    was trained since the last checkpoint; off the main thread it leaves SIGINT to run()'s StopRequest."""
    box: dict = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as err:  # handed to the main thread as it is
            box["error"] = err

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in box:
        raise box["error"]
    return box["result"]


def run(cfg: Config, loop: Loop) -> ray.train.Result:
    """Run loop with Ray Train as cfg.trainer says; return Ray's result (its checkpoint is the final one). After
    SIGTERM or SIGINT it raises Stopped once every rank has checkpointed and returned."""
    check_ray()
    cfg = resolved(cfg)
    # Train V2 reroutes print() in its workers to its logger and, since Ray has wrapped the workers' stdout, also
    # tees it there: every line of the loop reached `ray job logs` twice. Plain print in the workers, unless the
    # user set it (Train V2 passes this variable on from the driver to every worker).
    os.environ.setdefault(PRINT_PATCH, "0")
    _check_fits(cfg.trainer, can_grow=_connect())
    # Owned by this driver, so it goes with the job; named, so that every worker finds it; on the driver's node, as
    # Train's controller is, so that it outlives any worker node.
    name = f"dcgan-control-{uuid.uuid4().hex[:12]}"
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    t = cfg.trainer
    least = t.num_workers if t.min_workers is None else t.min_workers
    need = {"CPU": least * t.cpus_per_worker, **({"GPU": least} if t.use_gpu else {})}
    control = RunControl.options(name=name, scheduling_strategy=here).remote(need, _elastic(t))
    # SIGTERM or SIGINT to the driver (`ray job stop`, Ctrl-C): passed on to every rank through the control actor,
    # so the ranks checkpoint at the count reached and return; a second one exits at once.
    with StopRequest("every rank writes a checkpoint at its next log interval, then the run stops",
                     on_first=lambda signum: control.request.remote(signum)) as stop:
        result = _fit(trainer_for(cfg, loop, name))
    where = result.checkpoint.path if result.checkpoint is not None else "none"
    if stop.signum:
        raise Stopped(stop.signum, f"stopped by signal {stop.signum}; last checkpoint {where} (run directory "
                                   f"{cfg.run_dir}); run the same command again to resume")
    print(f"dcgan_dist.ray_launch: done; run directory {cfg.run_dir}, last checkpoint {where}", flush=True)
    return result
