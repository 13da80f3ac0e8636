"""Shared fixtures: real MNIST-5k shards written once per session, and a small fast config over them."""

from __future__ import annotations

import pytest
import torch

from dcgan_dist import config
from dcgan_dist.shard.run import builtin_shards


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory):
    """The real MNIST-5k digits as tar shards + manifest (10 shards of 500), written by the project's writer."""
    return builtin_shards("mnist5k", tmp_path_factory.mktemp("mnist5k"))


@pytest.fixture
def tiny_cfg(mnist_shards, tmp_path):
    """A config that trains a narrow 32x32 greyscale DCGAN on the MNIST shards in a second or two."""
    return config.load(None, [
        f"data.shards={mnist_shards}", "data.builtin=null", "data.num_workers=0", "data.shuffle_buffer=200",
        "model.ngf=8", "model.ndf=8", "train.batch_size=16", "train.images=320", "train.device=cpu",
        "log.every_images=64", "log.sample_every_images=160", "log.checkpoint_every_images=160",
        "log.grid_size=16", f"run_dir={tmp_path / 'run'}",
    ])


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
