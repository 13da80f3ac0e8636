"""Every use of Ray's and torch's private insides, in one place: what it is, why no public API does, and check().

Each access below says why it is needed, which public API was looked for and why that does not do, and the
versions it was read on. check() verifies that each private name still exists with the shape used here and raises a
RuntimeError naming the attribute and the installed version if not, so that an upgrade fails at start-up, not
silently in the middle of a run. ray_launch.check_ray() calls check(); a local run calls check(with_ray=False).

Neither Ray nor torch is imported at load: a local run never imports Ray, and follow_head (on a worker node) needs
neither (seconds each). Each function imports what it touches.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

# The versions every access below was read on.
RAY_CHECKED, TORCH_CHECKED = "2.60.0", "2.14.1"


# --- Ray: a hook that runs on every worker before the process group forms ----------------------------------------
# Why: each rank sets what gloo and NCCL read as the group forms (its interface: rendezvous.choose_interface; NCCL's
# tracing: watchdog), and Ray forms the group inside its torch backend's on_start, on every worker at once.
# Public API looked for: TorchConfig (PublicAPI) has only backend, init_method and timeout_s; ray.train.UserCallback
# has only after_report and after_exception. The runtime env's worker_process_setup_hook (Experimental) runs only
# when it is a job's (Ray 2.60 sets it up in ray.init alone): in RunConfig(worker_runtime_env=...) nothing runs it,
# and a job-wide one must be a module name under `ray job submit` and would run in every worker of the job.
# worker_runtime_env's env_vars are the same on every node, but interface names differ between nodes. Subclassing
# the DeveloperAPI ray.train.backend.Backend instead would copy Ray's on_start (master address, TPU slices, env
# vars): more private detail, not less. Checked on Ray 2.60.0.
def torch_backend_running_first(fn: Callable[[], None]) -> type:
    """Ray's torch backend, as a subclass whose on_start runs fn on every worker before Ray forms the group."""
    from ray.train.torch import config

    class TorchBackendRunningFirst(config._TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            worker_group.execute(fn)
            super().on_start(worker_group, backend_config)

    return TorchBackendRunningFirst


# --- Ray: a local instance on loopback only ---------------------------------------------------------------------
# Why: a fresh single-node instance never gains nodes, so it should listen and talk on 127.0.0.1 only; but
# ray.init turns a node address of 127.0.0.1 into this machine's outward one (services.resolve_ip_for_localhost)
# unless multi-node clusters are off, a switch (ray_constants.ENABLE_RAY_CLUSTER) read once, at `import ray`.
# Processes the instance starts read it from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER.
# Public API looked for: ray.init has no public node-address argument, only the hidden `_node_ip_address` ("may
# change without notice"). Setting RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before `import ray` would do for this
# process too, but the launcher imports Ray before it knows whether it joins a cluster or starts an instance, and a
# driver that joins a cluster with the switch off calls itself 127.0.0.1. Checked on Ray 2.60.0.
LOOPBACK = "127.0.0.1"
CLUSTER_SWITCH_ENV_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only() -> None:
    """Turn Ray's multi-node clusters off, for this process and those it starts: 127.0.0.1 stays 127.0.0.1."""
    from ray._private import ray_constants

    os.environ[CLUSTER_SWITCH_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def init_local_on_loopback() -> None:
    """Start a fresh single-node Ray instance that listens and talks on 127.0.0.1 only."""
    import ray

    loopback_only()
    ray.init(address="local", _node_ip_address=LOOPBACK)


# --- Ray Train's own numbers that the launcher's preemption handling is timed by -----------------------------------
# Why: a notice without a deadline is treated by Ray Train as due DEFAULT_PREEMPTION_DEADLINE_S after it was seen,
# and a group restarted before Train's node view refreshes (AutoscalingCoordinator's tick) still counts a dead
# node's CPUs and GPUs; the launcher waits for both (ray_launch._preemption, _hold). Read from Ray, not copied, so
# that a new value is followed; check() fails if either moves.
# Public API looked for: PreemptionInfo.deadline_ms is documented as None "if no deadline was reported", with no
# public fallback; ScalingConfig.elastic_resize_monitor_interval_s is how often Train looks for room to grow, not
# how often its view of the nodes refreshes. Checked on Ray 2.60.0 (120 s and 20 s).
def preemption_deadline_fallback_s() -> float:
    """Seconds after a deadline-less preemption notice at which Ray Train treats the node as reclaimed."""
    from ray.train.v2._internal import constants

    return float(constants.DEFAULT_PREEMPTION_DEADLINE_S)


def node_view_tick_s() -> float:
    """How often Ray Train's view of the cluster's nodes (its AutoscalingCoordinator's) is refreshed, in seconds."""
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator

    return float(coordinator._AutoscalingCoordinatorActor.TICK_INTERVAL_S)


# --- Ray Train V2's print patch ----------------------------------------------------------------------------------
# Why: Train V2 reroutes print() in its workers to its logger and also tees it to the wrapped stdout, so every line
# of the loop reached `ray job logs` twice; this internal switch turns the patch off, and V2 passes it on from the
# driver to every worker (constants.ENV_VARS_TO_PROPAGATE).
# Public API looked for: LoggingConfig(log_level) only sets Train's own logger's level; nothing else. Checked on
# Ray 2.60.0.
PRINT_PATCH_ENV_VAR = "RAY_TRAIN_ENABLE_PRINT_PATCH"


# --- Ray's files on a worker node --------------------------------------------------------------------------------
# Why: follow_head stops what Ray left on a node once the head is gone, and knows Ray's processes by their programs
# in the ray package: the raylet binary, and the Python scripts it starts (log monitor, agents, workers).
# Public API looked for: the state API (ray.util.state) and `ray status` ask the head's GCS, which is exactly what
# is gone then, and need `import ray` (seconds) on a node that only follows. Checked on Ray 2.60.0.
RAYLET_FILE = "core/src/ray/raylet/raylet"
RAY_SCRIPT_FILES = ("_private/log_monitor.py", "dashboard/agent.py", "_private/runtime_env/agent/main.py",
                    "_private/workers/setup_worker.py", "_private/workers/default_worker.py")


# --- torch: a DataLoader iterator's workers, ended now -----------------------------------------------------------
# Why: when the loop ends by an exception, the traceback keeps the iterator alive until interpreter exit, where
# multiprocessing SIGTERMs workers that ignore it (interruptions.ignore_in_loader_workers) and waits forever; the
# loop ends them itself, gracefully.
# Public API looked for: torch 2.14's DataLoader iterators have no close() or shutdown(); `del` runs the same
# _shutdown_workers (__del__) only when the last reference goes, which the traceback holds; persistent_workers=False
# ends them only when the iterator is exhausted. Checked on torch 2.14.1.
def shut_down_loader_workers(batches: Iterable) -> None:
    """End a DataLoader iterator's worker processes now, gracefully; nothing for any other iterator."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # only the multi-process iterator has workers
    if shutdown is not None:
        shutdown()


# --- Ray Train V2: leaving nodes out of the next worker group ---------------------------------------------------
# Why: a node whose rank hung twice in a row (watchdog.py) should get no rank in the next group, and get ranks
# again once replaced (a new node has a new ID). Public API looked for: ScalingConfig(label_selector=...) is public
# but fixed for the whole run; Ray has no call that changes a live node's labels or resources, and holding a node's
# resources with a placeholder actor races with the group's own placement group. Train V2's ControllerCallback
# (DeveloperAPI, in an _internal module; RunConfig(callbacks=...) hands it to the controller) is asked for a label
# selector before every worker group starts: the one hook that can change where the next group goes. Checked on
# Ray 2.60.0.
NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node: its ID


def leave_out_nodes_callback(left_out: Callable[[], list]) -> object:
    """A callback for RunConfig(callbacks=[...]): before each worker group starts, the nodes left_out() names (Ray
    node IDs, asked then) get none of its workers. left_out must pickle (the controller is another process)."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class LeaveOutNodes(ControllerCallback):
        def __init__(self, left_out):
            self.left_out = left_out

        def on_controller_start_worker_group(self, *, scaling_config, num_workers):
            nodes = self.left_out()
            return {NODE_ID_LABEL: f"!in({', '.join(nodes)})"} if nodes else None

    return LeaveOutNodes(left_out)


def _controller_callback() -> Optional[str]:
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.util.placement_group import NODE_ID_LABEL_KEY

    if NODE_ID_LABEL_KEY != NODE_ID_LABEL:
        return f"the node-ID label is {NODE_ID_LABEL_KEY!r}, not {NODE_ID_LABEL!r}"
    return _params(ControllerCallback.on_controller_start_worker_group, ["self", "scaling_config", "num_workers"])


# --- torch: NCCL's flight recorder, dumped when the hang watchdog fires -------------------------------------------
# Why: a hang report should say which collective each rank is in. torch records the recent NCCL collectives when
# TORCH_NCCL_TRACE_BUFFER_SIZE is set before the group forms (watchdog.nccl_tracing) and dumps them on its own
# collective timeout (TORCH_NCCL_DUMP_ON_TIMEOUT), which comes only after trainer.collective_timeout_s.
# Public API looked for: torch.distributed has no call that dumps the record on demand; the documented tool
# (torch.distributed.flight_recorder, `torchfrtrace`) reads dumps, it does not make them. Checked on torch 2.14.1
# (CPU build: the name exists; the dump itself needs an NCCL group, on a GPU).
def nccl_flight_record() -> bytes:
    """The NCCL flight recorder's pickle of this process's recent collectives."""
    import torch

    return torch._C._distributed_c10d._dump_nccl_trace()


def _nccl_trace() -> Optional[str]:
    import torch

    fn = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    return None if callable(fn) else "torch._C._distributed_c10d._dump_nccl_trace is gone"


# --- torch: foreach ops (train/ema.py) ---------------------------------------------------------------------------
# Why: the EMA update is one multi-tensor kernel per op, with the weight read on the device (no host sync, so a CUDA
# graph replays it). These are documented as torch's beta "Foreach operations"; the public per-tensor lerp_ loop
# launches one kernel per parameter. ema.py calls them directly; check() only makes sure they still take a tensor
# weight. Checked on torch 2.14.1.
FOREACH_OPS = ("_foreach_sub", "_foreach_mul_", "_foreach_add_", "_foreach_copy_")


# --- check() -----------------------------------------------------------------------------------------------------
def _params(fn: Callable, expected: list[str]) -> Optional[str]:
    got = list(inspect.signature(fn).parameters)
    return None if got == expected else f"takes {got}, expected {expected}"


def _names(fn: Callable, *needed: str) -> Optional[str]:
    """Whether fn's source still names what this module relies on it doing."""
    source = inspect.getsource(fn)
    missing = [n for n in needed if n not in source]
    return f"no longer refers to {', '.join(missing)}" if missing else None


def _number(value) -> Optional[str]:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return None if ok else f"is {value!r}, expected a positive number of seconds"


def _torch_backend() -> Optional[str]:
    from ray.train.backend import Backend
    from ray.train.torch import config

    cls = config._TorchBackend
    if not (inspect.isclass(cls) and issubclass(cls, Backend)):
        return f"is {cls!r}, expected a subclass of ray.train.backend.Backend"
    return _params(cls.on_start, ["self", "worker_group", "backend_config"]) or \
        _names(cls.on_start, "_setup_torch_process_group")  # still where the group forms


def _execute() -> Optional[str]:
    from ray.train.v2._internal.execution.worker_group.execution_group import ExecutionGroup

    try:
        inspect.signature(ExecutionGroup.execute).bind(None, print)
    except TypeError as err:
        return f"cannot be called as execute(fn): {err}"
    return None


def _cluster_switch() -> Optional[str]:
    from ray._private import ray_constants, services

    if not isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool):
        return f"is {ray_constants.ENABLE_RAY_CLUSTER!r}, expected a bool"
    if ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR != CLUSTER_SWITCH_ENV_VAR:
        return f"is read from {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR}, expected {CLUSTER_SWITCH_ENV_VAR}"
    return _names(services.get_node_ip_address, "ENABLE_RAY_CLUSTER")


def _node_ip_option() -> Optional[str]:
    from ray._private import worker

    return _names(worker.init, '"_node_ip_address"')


def _print_patch() -> Optional[str]:
    from ray.train.v2._internal import constants

    if constants.ENABLE_PRINT_PATCH_ENV_VAR != PRINT_PATCH_ENV_VAR:
        return f"is {constants.ENABLE_PRINT_PATCH_ENV_VAR!r}, expected {PRINT_PATCH_ENV_VAR!r}"
    if PRINT_PATCH_ENV_VAR not in constants.ENV_VARS_TO_PROPAGATE:
        return "is no longer passed on from the driver to the workers (ENV_VARS_TO_PROPAGATE)"
    return None


def _ray_package() -> Path:
    """The ray package's folder, found without importing it."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("Ray is not installed")
    return Path(spec.submodule_search_locations[0])


def _ray_files() -> Optional[str]:
    package = _ray_package()
    missing = [f for f in (RAYLET_FILE, *RAY_SCRIPT_FILES) if not (package / f).is_file()]
    return f"{', '.join(missing)} not in {package}" if missing else None


def _deadline() -> Optional[str]:
    from ray.train.v2._internal import constants

    return _number(constants.DEFAULT_PREEMPTION_DEADLINE_S)


def _tick() -> Optional[str]:
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator

    return _number(coordinator._AutoscalingCoordinatorActor.TICK_INTERVAL_S)


RAY_PROBES = (
    ("ray.train.v2._internal.execution.callback.ControllerCallback.on_controller_start_worker_group",
     _controller_callback),
    ("ray.train.torch.config._TorchBackend", _torch_backend),
    ("ray.train.v2._internal.execution.worker_group.execution_group.ExecutionGroup.execute", _execute),
    ("ray._private.ray_constants.ENABLE_RAY_CLUSTER", _cluster_switch),
    ("ray.init(_node_ip_address=...) in ray._private.worker.init", _node_ip_option),
    ("ray.train.v2._internal.constants.DEFAULT_PREEMPTION_DEADLINE_S", _deadline),
    ("ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator._AutoscalingCoordinatorActor"
     ".TICK_INTERVAL_S", _tick),
    ("ray.train.v2._internal.constants.ENABLE_PRINT_PATCH_ENV_VAR", _print_patch),
    ("the ray package's raylet and scripts", _ray_files),
)


def _shutdown_workers() -> Optional[str]:
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    return _params(_MultiProcessingDataLoaderIter._shutdown_workers, ["self"])


def _foreach() -> Optional[str]:
    import torch

    ema, params, weight = [torch.zeros(2)], [torch.ones(2)], torch.tensor(0.25)
    delta = torch._foreach_sub(params, ema)
    torch._foreach_mul_(delta, weight)  # the Tensor-weight overload, read on the device
    torch._foreach_add_(ema, delta)
    copy = [torch.zeros(2)]
    torch._foreach_copy_(copy, ema)
    return None if copy[0].tolist() == [0.25, 0.25] else f"computed {copy[0].tolist()}, expected [0.25, 0.25]"


TORCH_PROBES = (
    ("torch._C._distributed_c10d._dump_nccl_trace", _nccl_trace),
    ("torch.utils.data.dataloader._MultiProcessingDataLoaderIter._shutdown_workers", _shutdown_workers),
    (f"torch.{', torch.'.join(FOREACH_OPS)}", _foreach),
)


def _version(package: str) -> str:
    try:
        return __import__(package).__version__
    except ImportError:
        return "not installed"


def _problems(probes, library: str, checked: str) -> list[str]:
    found = []
    for name, probe in probes:
        try:
            wrong = probe()
        except Exception as err:  # a name gone (AttributeError, ImportError) or changed beyond recognition
            wrong = f"{type(err).__name__}: {err}"
        if wrong:
            found.append(f"  {name} ({library} {_version(library.lower())}, checked on {checked}): {wrong}")
    return found


def check(with_ray: bool = True) -> None:
    """RuntimeError naming every private name above that the installed torch (and Ray) no longer has as used."""
    found = _problems(TORCH_PROBES, "torch", TORCH_CHECKED)
    if with_ray:
        found += _problems(RAY_PROBES, "Ray", RAY_CHECKED)
    if found:
        raise RuntimeError("dcgan_dist relies on private parts of Ray and torch that the installed versions no "
                           "longer have as it uses them:\n" + "\n".join(found) + "\nInstall the versions "
                           "pyproject.toml pins, or update dcgan_dist/distributed/private_api.py for these.")
