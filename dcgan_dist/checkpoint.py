"""Checkpoints: the one owner of their format. Written atomically, the newest K kept, read back as a typed record.

Two kinds of file hold the same record (Checkpoint):
- checkpoints/ckpt-<images>.pt, written by the training loop: the networks plus a Resume, everything a true
  resume needs (both optimizers, the step and data-stream position, rollbacks, the stream's geometry, per-rank
  skip counts and consumed samples, the RNG states);
- checkpoints/best.pt, written by the evaluation during training: the networks at the best score so far, with a
  Best (metric, score, generator; saved under `eval`) and no Resume: it is for sampling, not for resuming.

On disk a record is one flat dict of plain tensors and containers, so torch.load(weights_only=True) reads it without
executing pickled code; `format` numbers the layout. A file without `format` is format 1, the layout written
before the number was (same fields). Anything else, a missing or mistyped field, is an error naming the file and
the field.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from . import files, models
from .config import CHOICES, Config, ConfigError, from_dict

FORMAT = 1
BEST = "best.pt"
_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not hold the record; the message names the file and field."""


@dataclass
class Resume:
    """What a resumed run needs beyond the networks."""
    opt_G: dict               # Adam's state_dict (moments, step counts); hyperparameters come from the config
    opt_D: dict
    step: int                 # steps taken: seeds the latent draws
    data_step: int            # the data stream's position, in steps of `geometry`
    rollbacks: int            # non-finite rollbacks so far: shift the latent draws away from the diverged ones
    geometry: dict            # what the stream's layout depends on: world_size, batch_size, loader_workers
    skipped: list             # per rank: [corrupt samples, unreadable shards]
    consumed: list            # per rank: raw samples per virtual stream in the current pass ([] when unknown)
    rng: dict                 # torch's global RNG states ("torch", and "cuda" where there is one)


@dataclass
class Best:
    """The score that made best.pt."""
    metric: str               # eval.metric: fid or coverage
    score: float
    generator: str            # the network scored: G_ema or G


@dataclass
class Checkpoint:
    """One checkpoint file as a typed record: the networks, the config they were trained with, and a Resume
    (ckpt-*.pt) or a Best (best.pt)."""
    config: dict              # the resolved config (config.to_dict) the networks were trained with
    images: int               # images seen by D across all ranks
    G: dict                   # state_dicts, with nn.BatchNorm2d's names whatever batchnorm class trained them
    D: dict
    G_ema: dict | None = None  # None: trained with train.ema_images=0
    resume: Resume | None = None
    best: Best | None = None
    format: int = FORMAT

    def to_file_dict(self) -> dict:
        """The flat dict that is saved: plain containers and tensors."""
        out = {"format": self.format, "config": self.config, "images": self.images, "G": self.G, "D": self.D}
        if self.G_ema is not None:
            out["G_ema"] = self.G_ema
        if self.resume is not None:
            out.update({f.name: getattr(self.resume, f.name) for f in fields(Resume)})
        if self.best is not None:
            out["eval"] = {**{f.name: getattr(self.best, f.name) for f in fields(Best)}, "images": self.images}
        return out


# Field -> the type it must have on disk (bool is no int here: int fields are counts).
_TYPES = {"config": dict, "images": int, "G": dict, "D": dict, "G_ema": dict, "opt_G": dict, "opt_D": dict,
          "step": int, "data_step": int, "rollbacks": int, "geometry": dict, "skipped": list, "consumed": list,
          "rng": dict, "metric": str, "score": (float, int), "generator": str}


def _field(state: dict, name: str, path: Path, required: bool = True, within: str = ""):
    """state[name], checked against _TYPES; None if absent and not required."""
    if name not in state:
        if required:
            raise CheckpointError(f"checkpoint {path}: the field {within + name!r} is missing")
        return None
    value = state[name]
    wanted = _TYPES[name]
    if isinstance(value, bool) or not isinstance(value, wanted):
        names = " or ".join(t.__name__ for t in (wanted if isinstance(wanted, tuple) else (wanted,)))
        raise CheckpointError(f"checkpoint {path}: the field {within + name!r} is a {type(value).__name__}, "
                              f"not a {names}")
    return value


def _record(state, path: Path) -> Checkpoint:
    """The record in a loaded file's dict, every field checked."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(state).__name__}, not a checkpoint's dict")
    version = state.get("format", 1)
    if not isinstance(version, int) or not 1 <= version <= FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {version!r}; this dcgan-dist reads format 1 to {FORMAT} "
                              f"(a newer version wrote it?)")
    record = Checkpoint(*(_field(state, n, path) for n in ("config", "images", "G", "D")),
                        G_ema=_field(state, "G_ema", path, required=False), format=version)
    if "opt_G" in state:
        record.resume = Resume(*(_field(state, f.name, path) for f in fields(Resume)))
        for key in ("world_size", "batch_size", "loader_workers"):
            if not isinstance(record.resume.geometry.get(key), int):
                raise CheckpointError(f"checkpoint {path}: the field 'geometry' has no {key!r}")
        ranks = record.resume.geometry["world_size"]
        for name in ("skipped", "consumed"):
            if len(getattr(record.resume, name)) != ranks:
                raise CheckpointError(f"checkpoint {path}: the field {name!r} has {len(getattr(record.resume, name))} "
                                      f"entries for a world size of {ranks}")
        if "torch" not in record.resume.rng:
            raise CheckpointError(f"checkpoint {path}: the field 'rng' has no 'torch' state")
    if "eval" in state:
        scored = state["eval"]
        if not isinstance(scored, dict):
            raise CheckpointError(f"checkpoint {path}: the field 'eval' is a {type(scored).__name__}, not a dict")
        record.best = Best(*(_field(scored, f.name, path, within="eval.") for f in fields(Best)))
    return record


def directory(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def path_for(run_dir: str | Path, images: int) -> Path:
    return directory(run_dir) / f"ckpt-{images:012d}.pt"


def best_path(run_dir: str | Path) -> Path:
    return directory(run_dir) / BEST


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


def save(record: Checkpoint, path: str | Path, keep: int | None = None, keep_every: int | None = None) -> Path:
    """Write the record to path via a temporary file and an atomic rename; then keep only the newest `keep`, and
    forever the first checkpoint at or after every multiple of keep_every images (milestones)."""
    path = Path(path)
    with files.atomic_open(path) as f:
        torch.save(record.to_file_dict(), f)
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


def copy_into(path: Path, run_dir: str | Path) -> Path:
    """A copy of one checkpoint file where it would lie in run_dir (for handing a run's newest checkpoint on)."""
    target = directory(run_dir) / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, target)
    return target


SAFE_TORCH = (2, 10)  # CVE-2025-32434 (below 2.6) and CVE-2026-24747 (below 2.10) run code from weights_only loads


def load_weights(path: str | Path, map_location="cpu"):
    """torch.load of a file someone else may have made: weights_only, and only on a torch whose weights_only
    loader has no known way to run code (pyproject.toml asks for it; this catches a torch installed by hand)."""
    release = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    if release < SAFE_TORCH:
        raise CheckpointError(f"torch {torch.__version__} can run code hidden in a crafted file even with "
                              f"weights_only (CVE-2025-32434, CVE-2026-24747): install torch>=2.10 to read {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def load(path: str | Path, map_location="cpu", resumable: bool = False) -> Checkpoint:
    """Read a checkpoint safely (load_weights) as a record; a damaged file or a missing field is a CheckpointError
    that names it. resumable: it must hold a Resume (best.pt does not)."""
    path = Path(path)
    try:
        state = load_weights(path, map_location)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    record = _record(state, path)
    if resumable and record.resume is None:
        raise CheckpointError(f"checkpoint {path} holds no training state to resume from (a best.pt holds only "
                              f"the networks): resume from a ckpt-*.pt")
    return record


def newest_readable(run_dir: str | Path, after: int = -1) -> tuple[Path, Checkpoint] | None:
    """The newest checkpoint past `after` images that loads, with its record; a damaged one (a full disk, a copy
    cut short) is passed over with a warning naming it, so the run goes on from the one before."""
    for path in reversed([p for p in list_checkpoints(run_dir) if images_of(p) > after]):
        try:
            return path, load(path, resumable=True)
        except CheckpointError as err:
            print(f"dcgan_dist: warning: {err}; trying the checkpoint before it", file=sys.stderr, flush=True)
    return None


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


def _check_shapes(cfg: Config, states: dict[str, dict], path: Path) -> None:
    """The networks cfg.model describes, built without memory (the meta device), must have exactly the tensors
    the checkpoint holds: a config that claims huge widths beside small tensors is an error before anything is
    allocated, and what is allocated afterwards is bounded by the file's own size."""
    with torch.device("meta"):
        expected = {"D": models.Discriminator(cfg.model).state_dict()}
        expected["G"] = expected["G_ema"] = models.Generator(cfg.model).state_dict()
    for name, state in states.items():
        want = {k: tuple(v.shape) for k, v in expected[name].items()}
        have = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        if set(have) != set(want) or len(have) != len(state):
            odd = sorted(set(have) ^ set(want) | {k for k in state if k not in have})[:3]
            raise CheckpointError(f"checkpoint {path}: {name} does not hold the tensors its config's model "
                                  f"({_describe(cfg)}) has (first differing: {', '.join(odd)})")
        for key, shape in want.items():
            if have[key] != shape:
                raise CheckpointError(f"checkpoint {path}: {name}.{key} has shape {list(have[key])}, but its "
                                      f"config's model ({_describe(cfg)}) needs {list(shape)}")


def _describe(cfg: Config) -> str:
    m = cfg.model
    return f"resolution {m.resolution}, channels {m.channels}, nz {m.nz}, ngf {m.ngf}, ndf {m.ndf}, kernel {m.kernel}"


def load_networks(path: str | Path, device: str | torch.device = "cpu", generator: str = "ema") -> Networks:
    """A checkpoint file (ckpt-*.pt or best.pt), or a run directory's newest checkpoint, as G and D in eval mode
    (running statistics).

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
    record = load(path)
    try:
        cfg = from_dict(record.config)
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {path}: its config: {err}") from None
    used = "G_ema" if generator == "ema" and record.G_ema is not None else "G"
    g_state = record.G_ema if used == "G_ema" else record.G
    _check_shapes(cfg, {used: g_state, "D": record.D}, path)
    G, D = models.Generator(cfg.model), models.Discriminator(cfg.model)
    G.load_state_dict(g_state)
    D.load_state_dict(record.D)
    note = None
    if generator == "ema" and used == "G":
        note = f"{path} holds no G_ema (trained with train.ema_images=0): sampling from G"
    return Networks(path, cfg, record.images, G.to(device).eval(), D.to(device).eval(), used, note)
