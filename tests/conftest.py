"""Shared fixtures: real MNIST-5k shards written once per session, and a small fast config over them."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from dcgan_dist import config
from dcgan_dist.shard.run import builtin_shards


# The modules that start Ray clusters, in two units that pytest-xdist runs first, each whole on one worker (one
# module after another), while the other workers run the rest. They spend much of their time waiting for Ray
# (health checks, restarts, a drain deadline). test_ray.py's clusters live on this machine's loopback; the test
# hosts' (tests/hosts.py) in namespaces with ports of their own, so the two units may run side by side: nothing
# joins a cluster it sees only in `ps` (ray_launch._connect), and each unit uses free or its own ports.
RAY_UNITS = {"ray": ("test_ray.py",), "hosts": ("test_hosts.py", "test_ray_up.py")}


def _ray_unit(nodeid: str) -> str | None:
    module = nodeid.split("::", 1)[0]
    return next((unit for unit, modules in RAY_UNITS.items() if module.endswith(modules)), None)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile (pyproject's addopts), with each Ray unit as one: each module runs whole on one worker (its
    module fixtures are made once), in collection order."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class RayUnitsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _ray_unit(nodeid) or nodeid.split("::", 1)[0]

    config.option.loadscopereorder = False  # keep the order below: the Ray units first, the longest
    return RayUnitsTogether(config, log)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: _ray_unit(item.nodeid) is None)  # stable: the Ray units first, else as collected


# One torch thread per core and worker: two pytest-xdist workers each running two OpenMP threads on two cores spin
# against each other (a 45 s training took 220 s). Processes the tests start inherit OMP_NUM_THREADS.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(_threads)


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory):
    """The real MNIST-5k digits as tar shards + manifest (10 shards of 500), written by the project's writer."""
    return builtin_shards("mnist5k", tmp_path_factory.mktemp("mnist5k"))


@pytest.fixture
def hosts_share(mnist_shards):
    """What a cluster's shared file system gives every test host (tests/hosts.py: their /tmp is their own): a
    folder under /var/tmp, which they all see, holding the MNIST shards; removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="dcgan-shared-", dir="/var/tmp"))
    shutil.copytree(mnist_shards, root / "shards")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tiny_cfg(mnist_shards, tmp_path):
    """A config that trains a narrow 32x32 greyscale DCGAN on the MNIST shards in a second or two."""
    return config.load(None, [
        f"data.shards={mnist_shards}", "data.builtin=null", "data.loader_workers=0", "data.shuffle_buffer=200",
        "model.ngf=8", "model.ndf=8", "train.batch_size=16", "train.images=320", "train.device=cpu",
        "log.every_images=64", "log.sample_every_images=160", "log.checkpoint_every_images=160",
        "log.grid_size=16", f"run_dir={tmp_path / 'run'}",
    ])


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
