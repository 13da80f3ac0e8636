"""Launch the training loop on a Ray cluster: Ray Train's TorchTrainer runs it on every worker as DDP.

`python -m dcgan_dist.train ... trainer.num_workers=N` lands here, with the loop (train/loop.py's train) handed in,
so that this module knows Ray and ranks but nothing of the GAN. The driver connects to the cluster that Ray
finds (RAY_ADDRESS under `ray job submit`, else a running local cluster, else a fresh local instance), and each
Ray worker calls the same loop as a local run; Ray has already joined the process group (NCCL on GPUs, gloo on
the CPU) and set RANK/WORLD_SIZE/LOCAL_RANK, which context.init picks up.

Checkpoints: the loop has rank 0 write its checkpoint file, then calls the hook below on every rank, so every rank
calls ray.train.report equally often and only rank 0 attaches a checkpoint. After a worker dies, Ray restarts the
whole group (up to trainer.max_failures times) and ray.train.get_checkpoint() hands the loop the last one; rerunning
the same command with the same run_dir and storage resumes the same way.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Callable

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from .. import checkpoint
from .. import config as config_mod
from ..config import Config, ConfigError
from ..data import storage

# The training loop: loop(cfg, resume_from=None, on_checkpoint=None), called on every worker.
Loop = Callable[..., dict]


def _report(path: Path | None, metrics: dict) -> None:
    """The loop's checkpoint hook: every rank reports; rank 0 (the one given a path) attaches its file."""
    if path is None:
        ray.train.report(metrics)
        return
    # Stage the one new file in a directory of its own: Ray uploads whole directories, and the run's checkpoint
    # folder also holds the older checkpoints it keeps.
    with tempfile.TemporaryDirectory() as staging:
        checkpoint.directory(staging).mkdir()
        shutil.copy2(path, checkpoint.directory(staging) / path.name)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(staging), checkpoint_dir_name=path.stem)


def worker_loop(loop_config: dict, loop: Loop) -> None:
    """Ray Train's per-worker function: the local training loop, resumed from Ray's latest checkpoint if any."""
    cfg = config_mod.from_dict(loop_config["cfg"])
    restored = ray.train.get_checkpoint()
    if restored is None:
        loop(cfg, on_checkpoint=_report)
        return
    with restored.as_directory() as local:  # a download for bucket storage, the directory itself on a file system
        loop(cfg, resume_from=checkpoint.latest(local), on_checkpoint=_report)


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
    return out


def trainer_for(cfg: Config, loop: Loop) -> TorchTrainer:
    """The TorchTrainer for a resolved cfg: one worker per GPU (use_gpu) or per cpus_per_worker CPUs."""
    t = cfg.trainer
    return TorchTrainer(
        partial(worker_loop, loop=loop),  # pickled by reference: workers import the loop's module themselves
        train_loop_config={"cfg": config_mod.to_dict(cfg)},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo", timeout_s=int(t.collective_timeout_s)),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(
            name=Path(cfg.run_dir).name,
            storage_path=t.storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.log.keep_checkpoints),
        ),
    )


def _connect() -> bool:
    """Join the cluster Ray finds (RAY_ADDRESS, or one started on this machine) or start a local instance.

    Returns True when joining a cluster, False for a local instance (which never gains nodes).
    """
    if ray.is_initialized():
        return True
    try:
        ray.init(address="auto")
        return True
    except ConnectionError:
        _start_local()
        return False


def _start_local() -> None:
    """Start a fresh single-node instance that listens and talks on loopback (127.0.0.1) only.

    It never gains nodes, so nothing needs this machine's outward address. Ray turns a node address of 127.0.0.1
    into that outward address (services.resolve_ip_for_localhost) unless multi-node clusters are off, as they are
    by default on macOS and Windows: turn them off here, for this process (Ray read the switch at import) and for
    the processes the instance starts (they read it from the environment).
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", _node_ip_address="127.0.0.1")


def _check_fits(t, can_grow: bool) -> None:
    """Say at once when the workers do not fit: a cluster may autoscale to them, a local instance never will."""
    have = ray.cluster_resources()
    need = {"CPU": t.num_workers * t.cpus_per_worker, "GPU": t.num_workers if t.use_gpu else 0}
    short = ", ".join(f"{have.get(k, 0):g} {k} of the {n:g} needed" for k, n in need.items() if n > have.get(k, 0))
    if not short:
        return
    hint = "lower trainer.num_workers or trainer.cpus_per_worker, or set trainer.use_gpu=false"
    if not can_grow:
        raise ConfigError(f"trainer: this machine has {short}; {hint}")
    print(f"dcgan_dist.ray_launch: the cluster has {short} now; waiting for the autoscaler to add nodes "
          f"(if it has none: {hint})", file=sys.stderr, flush=True)


def run(cfg: Config, loop: Loop) -> ray.train.Result:
    """Run loop with Ray Train as cfg.trainer says; return Ray's result (its checkpoint is the final one)."""
    cfg = resolved(cfg)
    trainer = trainer_for(cfg, loop)
    _check_fits(cfg.trainer, can_grow=_connect())
    result = trainer.fit()
    print(f"dcgan_dist.ray_launch: done; run directory {cfg.run_dir}, last checkpoint {result.checkpoint.path}",
          flush=True)
    return result
