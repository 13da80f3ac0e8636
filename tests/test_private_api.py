"""The private insides of Ray and torch that the package uses (distributed/private_api.py): check() passes on the
installed versions and names each one that an upgrade moves; each adapter really does its job, without a cluster."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, IterableDataset

from dcgan_dist import distributed
from dcgan_dist.distributed import private_api
from multirank import free_port


def test_check_passes_on_the_installed_versions():
    private_api.check()
    private_api.check(with_ray=False)


def _remove(module: str, attr: str):
    """A patch that takes the attribute of a module ("module:Class": of its class) away, as an upgrade may."""
    def patch(monkeypatch, tmp_path):
        path, _, cls = module.partition(":")
        owner = importlib.import_module(path)
        monkeypatch.delattr(getattr(owner, cls) if cls else owner, attr)
    return patch


def _replace(module: str, attr: str, value):
    """A patch that gives the attribute (as in _remove) another shape."""
    def patch(monkeypatch, tmp_path):
        path, _, cls = module.partition(":")
        owner = importlib.import_module(path)
        monkeypatch.setattr(getattr(owner, cls) if cls else owner, attr, value)
    return patch


def _elsewhere(self, worker_group, backend_config):
    """An on_start that no longer forms the process group."""


def _execute_renamed(self, functions, timeout_s):
    """An execute that no longer takes one function."""


def _init_without_node_address(address=None, **kwargs):
    """A ray.init that no longer knows `_node_ip_address`."""


def _empty_ray_package(monkeypatch, tmp_path):
    (tmp_path / "_private").mkdir()
    (tmp_path / "_private" / "log_monitor.py").write_text("")
    monkeypatch.setattr(private_api, "_ray_package", lambda: tmp_path)


COORDINATOR = "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator"
LOADER_ITER = "torch.utils.data.dataloader:_MultiProcessingDataLoaderIter"
# What an upgrade could do to each private access, and what check() must then name.
MOVED = {
    "torch-backend": (_remove("ray.train.torch.config", "_TorchBackend"), "Ray",
                      "ray.train.torch.config._TorchBackend (Ray"),
    "torch-backend-forms-group-elsewhere": (_replace("ray.train.torch.config:_TorchBackend", "on_start", _elsewhere),
                                            "Ray", "no longer refers to _setup_torch_process_group"),
    "worker-group-execute": (_replace("ray.train.v2._internal.execution.worker_group.execution_group:ExecutionGroup",
                                      "execute", _execute_renamed), "Ray", "ExecutionGroup.execute (Ray"),
    "cluster-switch": (_remove("ray._private.ray_constants", "ENABLE_RAY_CLUSTER"), "Ray",
                       "ray._private.ray_constants.ENABLE_RAY_CLUSTER (Ray"),
    "node-ip-option": (_replace("ray._private.worker", "init", _init_without_node_address), "Ray",
                       "ray.init(_node_ip_address=...)"),
    "preemption-deadline": (_remove("ray.train.v2._internal.constants", "DEFAULT_PREEMPTION_DEADLINE_S"), "Ray",
                            "DEFAULT_PREEMPTION_DEADLINE_S (Ray"),
    "coordinator-tick": (_remove(f"{COORDINATOR}:_AutoscalingCoordinatorActor", "TICK_INTERVAL_S"), "Ray",
                         "_AutoscalingCoordinatorActor.TICK_INTERVAL_S (Ray"),
    "print-patch": (_remove("ray.train.v2._internal.constants", "ENABLE_PRINT_PATCH_ENV_VAR"), "Ray",
                    "ENABLE_PRINT_PATCH_ENV_VAR (Ray"),
    "print-patch-not-passed-on": (_replace("ray.train.v2._internal.constants", "ENV_VARS_TO_PROPAGATE", set()),
                                  "Ray", "is no longer passed on"),
    "ray-node-files": (_empty_ray_package, "Ray", "core/src/ray/raylet/raylet, dashboard/agent.py"),
    "loader-shutdown": (_remove(LOADER_ITER, "_shutdown_workers"), "torch",
                        "_MultiProcessingDataLoaderIter._shutdown_workers (torch"),
    "foreach-mul": (_remove("torch", "_foreach_mul_"), "torch", "torch._foreach_sub, torch._foreach_mul_"),
}


@pytest.mark.parametrize("how", MOVED, ids=list(MOVED))
def test_check_names_a_private_access_that_an_upgrade_moved(how, monkeypatch, tmp_path):
    """One per private access: moved or reshaped, check() raises with its name and the installed version."""
    patch, library, named = MOVED[how]
    import ray

    patch(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError) as err:
        private_api.check(with_ray=library == "Ray")
    installed = ray.__version__ if library == "Ray" else torch.__version__
    assert named in str(err.value) and f"{library} {installed}, checked on " in str(err.value), str(err.value)
    assert str(err.value).count("\n  ") == 1, f"only the moved access is named: {err.value}"


EVENTS: list = []  # what the backend test's worker function and Ray's recorded on_start saw, in order


def _on_every_worker() -> None:
    """The launcher's function (picks the interface); module-level, so that Ray's pickler ships it by reference."""
    EVENTS.append("fn")


def test_the_backend_runs_the_function_on_every_worker_before_ray_forms_the_group(monkeypatch):
    """on_start executes fn on the whole worker group, then Ray's own on_start (which forms the group) with the same
    arguments. Ray's is replaced by a recorder: it needs a cluster; check() pins that it still forms the group."""
    import ray
    from ray.train.torch import config

    class Group:  # the worker group as Ray's backends use it: execute(fn) runs fn on every worker
        def execute(self, fn, *args, **kwargs):
            return [fn(*args, **kwargs) for _ in range(3)]

    group, backend_config = Group(), config.TorchConfig(backend="gloo")
    monkeypatch.setattr(config._TorchBackend, "on_start",
                        lambda self, worker_group, cfg: EVENTS.append(("ray", worker_group, cfg)))
    backend = private_api.torch_backend_running_first(_on_every_worker)
    assert issubclass(backend, config._TorchBackend)
    # As made, and after a trip through Ray's pickler, whichever way Ray ships the class.
    for made in (backend, ray.cloudpickle.loads(ray.cloudpickle.dumps(backend))):
        EVENTS.clear()
        made().on_start(group, backend_config)
        assert EVENTS == ["fn", "fn", "fn", ("ray", group, backend_config)]


def test_loopback_only_keeps_rays_node_address_on_loopback(monkeypatch):
    """What ray.init does to `_node_ip_address` (resolve_ip_for_localhost) keeps 127.0.0.1 once the switch is off;
    the processes the instance starts are told so by the environment."""
    import ray
    from ray._private import ray_constants, services

    if ray.is_initialized():
        pytest.skip("a connected Ray answers with its node's address")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)  # restored after
    monkeypatch.setenv(private_api.CLUSTER_SWITCH_ENV_VAR, "1")
    private_api.loopback_only()
    assert services.resolve_ip_for_localhost(private_api.LOOPBACK) == "127.0.0.1"
    assert os.environ[private_api.CLUSTER_SWITCH_ENV_VAR] == "0"


def test_rays_timing_constants_are_read_from_ray_and_used_by_the_launcher():
    """The launcher's preemption timing follows Ray's own numbers (120 s and 20 s on the checked Ray)."""
    import ray

    from dcgan_dist.distributed import ray_launch

    deadline, tick = private_api.preemption_deadline_fallback_s(), private_api.node_view_tick_s()
    if ray.__version__ == private_api.RAY_CHECKED:
        assert (deadline, tick) == (120.0, 20.0)
    assert ray_launch.UNKNOWN_DEADLINE_S == deadline
    assert ray_launch.NODE_VIEW_REFRESH_S > tick  # a restart waits for the refresh after the node's death
    assert ray_launch.PRINT_PATCH == private_api.PRINT_PATCH_ENV_VAR


def test_follow_head_knows_rays_processes_by_the_files_check_verifies():
    from dcgan_dist.distributed import follow_head

    assert follow_head.RAYLET == private_api.RAYLET_FILE
    assert follow_head.SCRIPTS == private_api.RAY_SCRIPT_FILES


def test_ray_train_v2_is_told_by_public_api():
    """The public replacement for ray.train.v2._internal.constants.is_v2_enabled: ray.train exports
    get_preemption_info only with Train V2 on (RAY_TRAIN_V2_ENABLED, the documented switch)."""
    import ray.train

    assert hasattr(ray.train, "get_preemption_info")
    env = {**os.environ, "RAY_TRAIN_V2_ENABLED": "0"}
    off = subprocess.run([sys.executable, "-c", "import ray.train; print(hasattr(ray.train, 'get_preemption_info'))"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert off.returncode == 0 and off.stdout.strip() == "False", off.stderr[-2000:]


@pytest.fixture
def one_rank_group(monkeypatch):
    """A real 1-process gloo group on loopback, with its creation timeout of 300 s; destroyed after."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                  timeout=timedelta(seconds=300))
    try:
        yield
    finally:
        torch_dist.destroy_process_group()


def _group_timeout() -> timedelta:
    return torch_dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout


def test_public_set_timeout_replaces_set_pg_timeout(one_rank_group, recwarn):
    """torch.distributed.set_timeout (public in torch 2.14; _set_pg_timeout is its deprecated alias) changes the
    timeout of the group's backend, with no warning."""
    assert _group_timeout() == timedelta(seconds=300)
    torch_dist.set_timeout(timedelta(seconds=7))
    assert _group_timeout() == timedelta(seconds=7)
    assert not [w for w in recwarn if "set_timeout" in str(w.message) or "_set_pg_timeout" in str(w.message)]


def test_context_init_gives_a_group_made_by_ray_the_collective_timeout(one_rank_group):
    """The call site: a group made by the launcher (Ray Train) gets trainer.collective_timeout_s from context.init."""
    from dcgan_dist.distributed import context

    ctx = context.init("cpu", timeout_s=9)
    assert ctx.distributed and not ctx.owns_group
    assert _group_timeout() == timedelta(seconds=9)


class _Pids(IterableDataset):
    """Endless: the process that produced each item."""

    def __iter__(self):
        while True:
            yield os.getpid()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_shut_down_loader_workers_ends_the_worker_process():
    """Even while a reference lives on (a traceback's, in the loop), the worker process is ended and reaped."""
    batches = iter(DataLoader(_Pids(), batch_size=None, num_workers=1))
    worker = next(batches)
    assert worker != os.getpid() and _running(worker)
    private_api.shut_down_loader_workers(batches)
    assert not _running(worker)
    private_api.shut_down_loader_workers(batches)  # twice is harmless


def test_shut_down_loader_workers_leaves_other_iterators_alone():
    single = iter(DataLoader(_Pids(), batch_size=None, num_workers=0))
    assert next(single) == os.getpid()
    private_api.shut_down_loader_workers(single)
    assert next(single) == os.getpid()
    private_api.shut_down_loader_workers(iter([1, 2]))


def test_the_torch_parts_load_and_check_without_ray(monkeypatch):
    """A local run never imports Ray: the module loads and checks torch with Ray absent, and says so if asked
    about Ray."""
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as where it is not installed
    monkeypatch.delitem(sys.modules, "dcgan_dist.distributed.private_api")
    monkeypatch.setattr(distributed, "private_api", private_api)  # the package's attribute, restored after
    fresh = importlib.import_module("dcgan_dist.distributed.private_api")
    fresh.check(with_ray=False)
    with pytest.raises(RuntimeError, match=r"_TorchBackend \(Ray not installed, checked on 2\.60\.0\)"):
        fresh.check()


def test_base_module_unwraps_torch_compile():
    """models.base_module reads torch.compile's wrapper's private `_orig_mod` (models.py sits below distributed/,
    so it cannot use the adapter): the module saved is the plain one, with unprefixed state_dict keys."""
    from torch import nn

    from dcgan_dist import models

    plain = nn.Linear(2, 2)
    compiled = torch.compile(plain)
    assert models.base_module(compiled) is plain
    assert list(models.base_module(compiled).state_dict()) == ["weight", "bias"]


def test_the_leave_out_callback_gives_the_controller_a_node_id_selector_and_survives_pickling():
    """Ray Train's controller asks it before each worker group (ControllerCallback, DeveloperAPI): the nodes
    named then are excluded through the node-ID label; none named, no selector. It crosses to the controller's
    process by cloudpickle."""
    import functools

    import ray.cloudpickle
    from ray.train.v2._internal.execution.callback import ControllerCallback

    callback = private_api.leave_out_nodes_callback(functools.partial(sorted, ["b" * 56, "a" * 56]))
    callback = ray.cloudpickle.loads(ray.cloudpickle.dumps(callback))
    assert isinstance(callback, ControllerCallback)
    assert callback.on_controller_start_worker_group(scaling_config=None, num_workers=2) == {
        "ray.io/node-id": f"!in({'a' * 56}, {'b' * 56})"}
    none = private_api.leave_out_nodes_callback(list)
    assert none.on_controller_start_worker_group(scaling_config=None, num_workers=2) is None
