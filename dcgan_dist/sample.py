"""Draw samples from a checkpoint: `python -m dcgan_dist.sample CHECKPOINT --n 64 --out grid.png [--npz F] [--seed S]`.

Samples come from G_ema, the moving average of G's weights, when the checkpoint holds one; --generator raw picks G.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from . import grids, models
from .checkpoint import GENERATORS, load_networks
from .pixels import to_uint8


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dcgan_dist.sample", description=__doc__.splitlines()[0],
                                     epilog=__doc__.strip().splitlines()[-1])
    parser.add_argument("checkpoint", help="a ckpt-*.pt file written by dcgan_dist.train, or a run directory")
    parser.add_argument("--n", type=int, default=64, help="number of samples")
    parser.add_argument("--out", default="grid.png", help="PNG grid to write")
    parser.add_argument("--npz", default=None, help="also save the samples as uint8 NHWC in this .npz (key 'x')")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent draws")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--generator", choices=GENERATORS, default="ema",
                        help="ema: G_ema, the moving average of G (default; G if the checkpoint has none); raw: G")
    args = parser.parse_args(argv)
    if args.n <= 0:
        parser.error(f"--n must be positive, got {args.n}")
    try:
        nets = load_networks(args.checkpoint, args.device, args.generator)
    except (RuntimeError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    if nets.note:
        print(f"note: {nets.note}", file=sys.stderr)
    x = models.generate(nets.G, nets.cfg.model, args.n, args.seed)
    grids.save_grid(x, args.out)
    if args.npz:
        np.savez_compressed(args.npz, x=to_uint8(x).permute(0, 2, 3, 1).numpy())
    print(f"wrote {args.n} samples of {nets.generator} to {args.out}" + (f" and {args.npz}" if args.npz else ""))


if __name__ == "__main__":
    main()
