"""Evaluate a checkpoint: `python -m dcgan_dist.evaluate COMMAND CHECKPOINT [options]` (docs/evaluate.md).

Commands: interpolate, arithmetic, features, nearest, coverage, fid, kid, pr. Each writes PNG grids and
COMMAND.json into --out (default RUN_DIR/eval/CHECKPOINT_NAME/) and, with --tensorboard, logs its headline numbers
and grids to the run's TensorBoard under eval/COMMAND/ at the checkpoint's image count. Samples come from G_ema
(the moving average of G) when the checkpoint holds one; --generator raw picks G. Under torchrun
(`torchrun --nproc_per_node N -m dcgan_dist.evaluate fid ...`) each rank generates and embeds its share of the
samples for fid, kid and pr, and rank 0 reports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..checkpoint import GENERATORS, load_networks
from ..distributed import context
from . import features, fid
from .commands import (Report, cmd_arithmetic, cmd_coverage, cmd_features, cmd_fid, cmd_interpolate, cmd_kid,
                       cmd_nearest, cmd_pr)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("checkpoint", help="a ckpt-*.pt or best.pt file, or a run directory (its newest checkpoint)")
    common.add_argument("--out", default=None, help="output directory (default RUN_DIR/eval/CHECKPOINT_NAME)")
    common.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--batch-size", type=int, default=250, help="images per forward pass")
    common.add_argument("--tensorboard", action="store_true", help="also log to RUN_DIR/tb under eval/COMMAND/")
    common.add_argument("--generator", choices=GENERATORS, default="ema",
                        help="ema: G_ema, the moving average of G (default; G if the checkpoint has none); raw: G")

    parser = argparse.ArgumentParser(prog="python -m dcgan_dist.evaluate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _paper_commands(sub, common)
    _metric_commands(sub, common)
    return parser


def _shards(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--shards", default=None, help=f"{what} (default: the checkpoint's data.shards, if a local path)")


def _paper_commands(sub, common: argparse.ArgumentParser) -> None:
    """The paper's experiments: interpolate, arithmetic, features, nearest, coverage."""

    p = sub.add_parser("interpolate", parents=[common], help=cmd_interpolate.__doc__)
    p.add_argument("--rows", type=int, default=8, help="walks, one per row")
    p.add_argument("--frames", type=int, default=10, help="images per walk")
    p.add_argument("--points", type=int, default=2, help="random latent points each walk passes through")
    p.add_argument("--slerp", action="store_true", help="spherical instead of linear interpolation")

    p = sub.add_parser("arithmetic", parents=[common], help=cmd_arithmetic.__doc__)
    p.add_argument("--sheet", type=int, default=64, help="samples on the numbered sheet")
    p.add_argument("--expr", default=None, help="sheet indices, e.g. '3,17,22 - 5,9,11 + 1,2,40'")
    p.add_argument("--variations", type=int, default=8, help="noisy variations of the result")
    p.add_argument("--noise", type=float, default=0.25, help="half-width of the uniform noise added to the result")

    p = sub.add_parser("features", parents=[common], help=cmd_features.__doc__)
    _shards(p, "labelled shards (a `cls` field) to train the SVM on")
    p.add_argument("--test-shards", default=None, help="labelled held-out shards (default: split --shards)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share when there are no test shards")
    p.add_argument("--train-size", type=int, default=None, help="class-balanced training subset (SVHN: 1000)")
    p.add_argument("--limit", type=int, default=None, help="read at most this many training images")
    p.add_argument("--test-limit", type=int, default=None, help="read at most this many test images")
    p.add_argument("--cs", default=",".join(f"{c:g}" for c in features.DEFAULT_CS), help="SVM C values to try")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds that choose C")

    p = sub.add_parser("nearest", parents=[common], help=cmd_nearest.__doc__)
    _shards(p, "training shards")
    p.add_argument("--n", type=int, default=500, help="generated samples (and held-out real images) measured")
    p.add_argument("--show", type=int, default=8, help="samples shown in the grid")
    p.add_argument("--k", type=int, default=4, help="neighbours per sample in each space")
    p.add_argument("--limit", type=int, default=None, help="read at most this many training images")

    p = sub.add_parser("coverage", parents=[common], help=cmd_coverage.__doc__)
    _shards(p, "labelled shards (a `cls` field) to train the classifier on")
    p.add_argument("--n", type=int, default=1000, help="generated samples classified")
    p.add_argument("--epochs", type=int, default=8, help="classifier training epochs")
    p.add_argument("--limit", type=int, default=None, help="read at most this many labelled images")


def _metric_commands(sub, common: argparse.ArgumentParser) -> None:
    """The sample-quality metrics against real images: fid, kid, pr."""
    for name, fn in (("fid", cmd_fid), ("kid", cmd_kid), ("pr", cmd_pr)):
        p = sub.add_parser(name, parents=[common], help=fn.__doc__)
        _shards(p, "real images to compare with")
        p.add_argument("--inception-weights", default=None,
                       help="pt_inception-2015-12-05 / weights-inception-2015-12-05 file (see docs/evaluate.md)")
        # --num-samples: torchrun's own parser takes a bare --n for an abbreviation of its options and fails.
        p.add_argument("--n", "--num-samples", dest="n", type=int, default=10000, help="generated samples")
        p.add_argument("--real-limit", type=int, default=None, help="read at most this many real images")
        p.add_argument("--dims", type=int, default=2048, choices=fid.DIMS, help="Inception pool features")
        p.add_argument("--reference-cache", default="auto",
                       help="where the real set's features are cached, keyed by the whole protocol: auto "
                            "(~/.cache/dcgan_dist/fid_reference), off, or a folder")
        if name == "kid":
            p.add_argument("--subsets", type=int, default=100, help="random subsets averaged")
            p.add_argument("--subset-size", type=int, default=1000, help="samples per subset")
        if name == "pr":
            p.add_argument("--k", type=int, default=3, help="nearest neighbours that set each point's radius")


COMMANDS = {"interpolate": cmd_interpolate, "arithmetic": cmd_arithmetic, "features": cmd_features,
            "nearest": cmd_nearest, "coverage": cmd_coverage, "fid": cmd_fid, "kid": cmd_kid, "pr": cmd_pr}
SHARDED = ("fid", "kid", "pr")  # the commands that split their samples over torchrun's ranks


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    ctx = None
    if args.command in SHARDED and context.launched():  # torchrun: each rank on its own device
        ctx = context.init("cuda" if args.device.startswith("cuda") else "cpu")
    try:
        networks = load_networks(args.checkpoint, ctx.device if ctx else args.device, args.generator)
        if networks.note and (ctx is None or ctx.is_main):
            print(f"note: {networks.note}", file=sys.stderr)
        out = Path(args.out) if args.out else networks.run_dir / "eval" / networks.path.stem
        report = Report(args.command, networks, out, args.tensorboard, main=ctx is None or ctx.is_main)
        return COMMANDS[args.command](args, networks, report)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if ctx is not None:
            context.shutdown(ctx)
