"""Checkpoints: everything needed for a true resume, written atomically, newest K kept.

A checkpoint holds G, D, both optimizers, images seen, the step, RNG states and the config, as plain tensors and
containers so that torch.load(weights_only=True) reads it without executing pickled code.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import files, models
from .config import CHOICES, Config, from_dict

_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")


def directory(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def path_for(run_dir: str | Path, images: int) -> Path:
    return directory(run_dir) / f"ckpt-{images:012d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in a run directory, oldest first (temporary files never match)."""
    d = directory(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def latest(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def images_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def save(state: dict, path: str | Path, keep: int | None = None, keep_every: int | None = None) -> Path:
    """Write state to path via a temporary file and an atomic rename; then keep only the newest `keep`, and
    forever the first checkpoint at or after every multiple of keep_every images (milestones)."""
    path = Path(path)
    with files.atomic_open(path) as f:
        torch.save(state, f)
    if keep is not None:
        found = list_checkpoints(path.parent.parent)
        milestones = set()
        if keep_every:
            previous = 0
            for p in found:
                if images_of(p) // keep_every > previous // keep_every:
                    milestones.add(p)
                previous = images_of(p)
        for old in found[:-keep]:
            if old not in milestones:
                old.unlink(missing_ok=True)
    return path


def newest_readable(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, with its state; a damaged one (a full disk, a copy cut short) is passed
    over with a warning naming it, so the run goes on from the one before."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load(path)
        except RuntimeError as err:
            print(f"dcgan_dist: warning: {err}; trying the checkpoint before it", file=sys.stderr, flush=True)
    return None


def load(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint safely (weights_only); a damaged file is an error that names it."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise RuntimeError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    for key in ("G", "D", "config", "images"):
        if key not in state:
            raise RuntimeError(f"checkpoint {path} has no {key!r} entry")
    return state


def rng_state() -> dict:
    """torch's global RNG states (the latent draws are seeded per step and need none)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


GENERATORS = CHOICES["eval.generator"]  # what --generator picks: G_ema (the default wherever users sample) or G


@dataclass
class Networks:
    """A checkpoint's generator (G_ema or G, as asked) and D, built from the config it was trained with, in eval
    mode on device."""
    path: Path
    cfg: Config
    images: int
    G: models.Generator
    D: models.Discriminator
    generator: str = "G"      # which one G holds: "G_ema" or "G"
    note: str | None = None   # why it is not the one asked for

    @property
    def device(self) -> torch.device:
        return next(self.G.parameters()).device

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent if self.path.parent.name == "checkpoints" else self.path.parent


def load_networks(path: str | Path, device: str | torch.device = "cpu", generator: str = "ema") -> Networks:
    """A checkpoint file, or a run directory's newest checkpoint, as G and D in eval mode (running statistics).

    generator "ema" gives G_ema (with the batchnorm statistics its run chose, train.ema_bn) when the checkpoint
    holds one, else G with a note saying so; "raw" gives G."""
    if generator not in GENERATORS:
        raise ValueError(f"generator {generator!r} is not one of {', '.join(GENERATORS)}")
    path = Path(path)
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise FileNotFoundError(f"{path} holds no checkpoints/ckpt-*.pt")
        path = found
    state = load(path)
    cfg = from_dict(state["config"])
    G, D = models.Generator(cfg.model), models.Discriminator(cfg.model)
    used, note = "G", None
    if generator == "ema" and "G_ema" in state:
        G.load_state_dict(state["G_ema"])
        used = "G_ema"
    else:
        G.load_state_dict(state["G"])
        if generator == "ema":
            note = (f"{path} holds no G_ema (trained with train.ema_images=0, or before G_ema existed): "
                    f"sampling from G")
    D.load_state_dict(state["D"])
    return Networks(path, cfg, int(state["images"]), G.to(device).eval(), D.to(device).eval(), used, note)
