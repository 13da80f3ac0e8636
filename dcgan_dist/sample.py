"""Draw samples from a checkpoint: `python -m dcgan_dist.sample CHECKPOINT --n 64 --out grid.png [--npz F] [--seed S]`."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, models
from .config import Config, from_dict
from .runlog import save_grid


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[models.Generator, Config]:
    """G from a checkpoint, in eval mode (running batchnorm statistics), with the config it was trained with."""
    state = checkpoint.load(path, map_location=device)
    cfg = from_dict(state["config"])
    g = models.Generator(cfg.model).to(device)
    g.load_state_dict(state["G"])
    return g.eval(), cfg


@torch.no_grad()
def decode(g: models.Generator, z: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """G(z) on the CPU for latent vectors z, in batches."""
    device = next(g.parameters()).device
    return torch.cat([g(z[i:i + batch_size].to(device)).cpu() for i in range(0, len(z), batch_size)])


def generate(g: models.Generator, cfg: Config, n: int, seed: int = 0, batch_size: int = 500) -> torch.Tensor:
    """n samples in [-1, 1] on the CPU, from latent draws fixed by seed."""
    return decode(g, models.sample_z(n, cfg.model, generator=torch.Generator().manual_seed(seed)), batch_size)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dcgan_dist.sample", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a ckpt-*.pt file written by dcgan_dist.train")
    parser.add_argument("--n", type=int, default=64, help="number of samples")
    parser.add_argument("--out", default="grid.png", help="PNG grid to write")
    parser.add_argument("--npz", default=None, help="also save the samples as uint8 NHWC in this .npz (key 'x')")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent draws")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.n <= 0:
        parser.error(f"--n must be positive, got {args.n}")
    try:
        g, cfg = load_generator(args.checkpoint, args.device)
    except (RuntimeError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    x = generate(g, cfg, args.n, args.seed)
    save_grid(x, args.out)
    if args.npz:
        u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        np.savez_compressed(args.npz, x=u8)
    print(f"wrote {args.n} samples to {args.out}" + (f" and {args.npz}" if args.npz else ""))


if __name__ == "__main__":
    main()
