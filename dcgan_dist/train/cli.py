"""Train DCGAN: `python -m dcgan_dist.train [--config FILE] [--run-dir DIR] [key=value ...]`.

Writes the configured built-in data set as shards if needed, then trains in this process
(trainer.num_workers=0) or on a Ray cluster with trainer.num_workers workers (distributed/ray_launch.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import config as config_mod
from .. import files
from ..config import Config
from ..data import storage

# The training modules (torch, torchvision, TensorBoard: seconds to import) are imported in main(), after the
# config is read: a mistyped key or a bad value exits at once, with torch never loaded.


def prepare_data(cfg: Config) -> None:
    """Write the configured built-in set as shards if data.shards does not exist yet."""
    from ..shard.run import builtin_shards

    if cfg.data.builtin and not storage.is_remote(cfg.data.shards) and not Path(cfg.data.shards).exists():
        print(f"writing built-in data set {cfg.data.builtin!r} as shards under {cfg.data.shards}", flush=True)
        builtin_shards(cfg.data.builtin, cfg.data.shards)


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m dcgan_dist.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help=f"YAML config (default: {config_mod.DEFAULT_CONFIG.name})")
    parser.add_argument("--run-dir", default=None, help="run directory (default: the config's run_dir)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.images=100000")
    args = parser.parse_args(argv)
    cfg = config_mod.load_or_exit(args.config, args.overrides)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    return cfg, args


def main(argv=None) -> None:
    cfg, _ = parse_args(argv)
    from ..data.shardset import resolve
    from ..data.stream import DataError, steps_per_pass
    from ..distributed.rendezvous import RendezvousError
    from .health import NonFinite
    from .loop import train
    from .resume import ResumeError
    from ..distributed.interruptions import Stopped, exit_status
    from ..evaluate import during_training

    if cfg.trainer.num_workers > 0:
        from ..distributed import ray_launch  # imported only here: a local run never loads Ray

        try:
            ray_launch.check_ray()  # before any data is written
            # Rank 0 on a Ray worker holds run_dir (train/loop.py); asked here first, so that a run_dir in use is
            # refused at once, not by the failure of a worker group.
            with files.one_writer(cfg.run_dir, "run_dir"):
                pass
        except ray_launch.RayUnsupported as err:
            raise SystemExit(f"error: {err}")
        except files.Busy as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2)
    prepare_data(cfg)
    try:
        steps_per_pass(resolve(cfg.data.shards), cfg, world_size=1)  # every data error before any process starts
        during_training.check(cfg, max(cfg.trainer.num_workers, 1))  # and every evaluation set-up error
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    try:
        if cfg.trainer.num_workers > 0:
            ray_launch.run(cfg, train)
        else:
            train(cfg)
    except DataError as err:  # raised in a loader worker, re-raised here with its traceback as text
        raise SystemExit(f"error: {str(err).strip().splitlines()[-1].split('DataError: ')[-1]}")
    except (ResumeError, files.Busy) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    except (NonFinite, RendezvousError, during_training.EvalSetupError) as err:  # the last: torchrun's world size
        raise SystemExit(f"error: {err}")
    except Stopped as err:
        print(f"dcgan_dist: {err}", file=sys.stderr)
        raise SystemExit(exit_status(err))
