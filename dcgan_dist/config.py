"""The configuration schema: dataclasses that validate every YAML in configs/ and every key=value override."""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .limits import MAX_IMAGE_PIXELS, MAX_SAMPLE_BYTES


def _config_dir() -> Path:
    """configs/ at the top of a source checkout; inside the package in a built wheel (pyproject maps it there)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here / "configs"):
        if (candidate / "mnist_local.yaml").is_file():
            return candidate
    return here.parent / "configs"


CONFIG_DIR = _config_dir()
DEFAULT_CONFIG = CONFIG_DIR / "mnist_local.yaml"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


@dataclass
class ModelConfig:
    resolution: int = 64          # 32, 64 or 128; the number of (de)convolutions is log2(resolution / 4)
    channels: int = 3             # image channels: 3 for RGB, 1 for greyscale sets such as MNIST
    nz: int = 100                 # size of the latent vector z
    ngf: int = 64                 # G's width at its last hidden layer; doubles towards the 4x4 input
    ndf: int = 64                 # D's width at its first layer; doubles towards the 4x4 output
    kernel: int = 4               # 4: the common PyTorch form; 5: the paper's 5x5 convolutions
    z_prior: str = "normal"       # "normal" N(0, 1) or "uniform" U(-1, 1) as in the paper


@dataclass
class DataConfig:
    shards: str = "shards/mnist5k"  # a shard directory or manifest.json, a brace pattern, or URLs joined by "::"
    builtin: Optional[str] = None   # "mnist5k": write these shards first if `shards` holds none yet
    size: Optional[int] = None      # images in the data set; read from manifest.json when that exists
    resample: bool = True           # draw shards with replacement (endless); False reads each once per pass
    shuffle_buffer: int = 2000      # samples held in each loader worker's shuffle buffer
    loader_workers: int = 2         # DataLoader worker processes per rank (was data.num_workers)
    prefetch: int = 4               # batches each worker keeps ready
    read_retries: int = 3           # retries of a failed remote shard read before the shard is skipped and counted
    retry_backoff: float = 1.0      # seconds before the first retry; doubled for each later one (with jitter)
    io_timeout: float = 30.0        # seconds a remote connect or read may stall before the attempt counts as failed
    # Shards are others' files (docs/loader.md, "Untrusted data"); a sample over a limit is skipped and counted:
    max_image_pixels: int = MAX_IMAGE_PIXELS  # an image whose header declares more (height x width) is not decoded;
                                              # 2^26 = 8192 x 8192, above any camera's photo, far below a bomb
    max_sample_bytes: int = MAX_SAMPLE_BYTES  # a sample whose tar members hold more is not read; 2^28 = 256 MiB


@dataclass
class TrainConfig:
    images: int = 60_000          # total images seen by D (all ranks together) before the run ends
    batch_size: int = 128         # per-rank batch; the global batch is batch_size x world size
    lr_d: float = 2e-4            # Adam learning rate for D (the paper: 0.0002)
    lr_g: float = 2e-4            # Adam learning rate for G
    beta1: float = 0.5            # the paper: 0.5 (0.9 oscillated)
    beta2: float = 0.999          # Adam's second-moment decay: PyTorch's default (the paper changed only beta1)
    seed: int = 0                 # weights' init, latent draws, data order, the fixed grid: same seed, same run
    device: str = "auto"          # auto, cpu, cuda
    on_nonfinite: str = "rollback"  # a NaN/Inf loss or weight: "rollback" to the newest checkpoint with new
                                    # latent draws (up to max_rollbacks times), or "stop"
    max_rollbacks: int = 3        # rollbacks in a row (without a finite checkpoint in between) before stopping
    ema_images: Optional[int] = None  # G_ema's half-life in images (train/ema.py); null: StyleGAN2-ADA's default,
                                      # global batch x 10/32 thousand; 0: no G_ema, samples come from G
    ema_rampup: Optional[float] = 0.05  # early on the half-life is at most this x images seen; null: no ramp-up
    ema_bn: str = "recompute"     # G_ema's batchnorm statistics: "recompute" standing statistics from its own
                                  # samples before every use, or "copy" G's running statistics (docs/evaluate.md)


@dataclass
class LogConfig:
    every_images: int = 5_000         # scalars to TensorBoard and the terminal
    sample_every_images: int = 20_000  # fixed-noise sample grid
    checkpoint_every_images: int = 20_000  # a checkpoint (checkpoint.py) whenever a multiple is crossed
    keep_checkpoints: int = 3         # newest K kept, older ones deleted
    keep_every_images: Optional[int] = None  # also keep forever the first checkpoint past every multiple of this
    grid_size: int = 64               # images in each sample grid


@dataclass
class TrainerConfig:
    num_workers: int = 0      # Ray Train workers; 0 runs in this process without Ray
    use_gpu: bool = False     # one GPU per worker and NCCL; false: CPU workers over gloo
    sync_bn: bool = False     # batchnorm statistics over the global batch (syncbn.py), for small per-rank batches
    cpus_per_worker: int = 1  # CPUs Ray reserves per worker: the trainer plus its data.loader_workers loaders
    max_failures: Optional[int] = None  # Ray FailureConfig: restarts of the worker group from the last checkpoint
                              # (-1: no limit); null: 3 for an elastic group (min_workers), 0 otherwise
    min_workers: Optional[int] = None  # elastic group of min_workers..num_workers ranks (docs/cluster.md); null: fixed
    elastic_check_s: float = 60.0      # how often an elastic group looks for room to grow (a regrowth restarts it)
    max_preemption_failures: int = -1  # restarts after a node preemption notice, counted apart; -1: unlimited
    preemption_grace_s: float = 60.0   # after a notice's deadline, how long Ray waits for the node to be gone
    startup_timeout_s: float = 300.0   # ranks that have not all joined by then: an error naming the missing ones
    collective_timeout_s: float = 1800.0  # a collective waiting longer than this for a rank is an error
    # A step (its read, its collectives) not done within this is a hang: every rank that can still run reports
    # where it is and exits (distributed/watchdog.py), and the launcher restarts from the newest checkpoint.
    # null: the larger of 120 s and 20 x the median step; 0: no watchdog (a debugger's breakpoint, say).
    hang_timeout_s: Optional[float] = None
    first_step_timeout_s: float = 900.0  # the first steps of each attempt: compilation, CUDA graphs, first reads
    storage_path: Optional[str] = None  # Ray checkpoint storage shared by all nodes (NFS path, s3://, gs://);
                                        # default: <run_dir>/ray, which suits one machine only


@dataclass
class PerfConfig:
    """Speed options. "auto" resolves to the fastest path that is correct for the device and the other settings
    (train/perf.py: resolve); an explicit value always wins. The resolved values go into the run's config.yaml."""
    amp: str = "auto"             # auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32, bf16, or fp16
                                  # with gradient scaling
    channels_last: str = "auto"   # NHWC memory format (faster convolutions on tensor cores); auto: on for CUDA
    compile: str = "none"         # torch.compile mode for G and D: none, default, max-autotune, reduce-overhead
    fused_adam: str = "auto"      # fused Adam kernels; auto: on CUDA, not on the CPU
    ddp_bucket_mb: int = 4        # DDP gradient bucket size: small buckets overlap the all-reduce of small models
    cuda_graph: str = "auto"      # the whole step as one CUDA graph; auto: on for CUDA unless the settings forbid it
    grad_compression: str = "none"  # DDP gradients sent as bf16 or fp16 (half the all-reduce bytes), or "none";
                                    # docs/cluster.md says when it pays (links slower than the step's compute)


@dataclass
class EvalConfig:
    """Sample quality measured during training (evaluate/during_training.py); docs/evaluate.md has the commands."""
    metric: Optional[str] = None  # null: off; "fid" (needs inception_weights) or "coverage" (needs `cls` labels)
    every_images: int = 20_000    # evaluate whenever this many more images have been seen, and at the end
    samples: int = 2_000          # generated samples per evaluation (the same latent draws every time)
    shards: Optional[str] = None  # real images to compare with (coverage: labelled); default: data.shards
    real_samples: int = 10_000    # real images read once: FID reference statistics, or the coverage judge's data
    inception_weights: Optional[str] = None  # Inception-v3 FID weights file on disk; nothing is downloaded
    inception_dims: int = 2048    # Inception pool features: 2048 (the standard FID), 768, 192 or 64
    keep_best: bool = True        # write checkpoints/best.pt whenever the score improves
    generator: str = "ema"        # the G scored and kept in best.pt: "ema" (G_ema, if train.ema_images > 0), "raw"
    reference_cache: str = "auto"  # the real set's FID features, cached: auto (~/.cache/dcgan_dist/fid_reference),
                                   # off, or a folder (evaluate/reference.py keys it by the whole protocol)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = "runs/default"  # checkpoints, TensorBoard, samples, config.yaml; the same run_dir resumes


SWITCH = ("auto", "true", "false", "True", "False")  # YAML's true/false reach a str key as "True"/"False"

# Every numeric key's allowed range: (lowest, highest); "<" before a bound excludes it. Every key has both bounds:
# a config also comes out of checkpoints that others made (from_dict), and a size there must not cost unbounded
# memory or time (SECURITY.md). The highs sit far above any real run: 512 channels is 4x the paper's widest
# model, 10^12 - 1 images is what a checkpoint's 12-digit name holds; a learning rate is no size, only finite
# (a huge one is how tests force divergence). tests/test_config.py checks that every int
# or float field of the schema is listed here with an upper bound.
_IMAGES = 999_999_999_999
_DAY = 86_400.0
RANGES: dict[str, tuple] = {
    "model.nz": (1, 1024), "model.ngf": (1, 512), "model.ndf": (1, 512),
    "data.size": (1, _IMAGES), "data.shuffle_buffer": (1, 1_000_000), "data.loader_workers": (0, 64),
    "data.prefetch": (1, 64), "data.read_retries": (0, 10), "data.retry_backoff": (0, 60.0),
    "data.io_timeout": ("<", 0, 3600.0), "data.max_image_pixels": (1, 1 << 36), "data.max_sample_bytes": (1, 1 << 40),
    "train.images": (1, _IMAGES), "train.batch_size": (1, 65_536), "train.lr_d": ("<", 0, "<", math.inf),
    "train.lr_g": ("<", 0, "<", math.inf), "train.beta1": (0, "<", 1), "train.beta2": (0, "<", 1),
    "train.seed": (0, 2**63 - 1), "train.max_rollbacks": (0, 100), "train.ema_images": (0, _IMAGES),
    "train.ema_rampup": ("<", 0, 1.0),
    "log.keep_every_images": (1, _IMAGES),
    "log.every_images": (1, _IMAGES), "log.sample_every_images": (1, _IMAGES),
    "log.checkpoint_every_images": (1, _IMAGES), "log.keep_checkpoints": (1, 1000), "log.grid_size": (1, 1024),
    "trainer.num_workers": (0, 4096), "trainer.cpus_per_worker": (1, 1024), "trainer.max_failures": (-1, 1000),
    "trainer.min_workers": (1, 4096), "trainer.elastic_check_s": (0, _DAY),
    "trainer.max_preemption_failures": (-1, 1000), "trainer.preemption_grace_s": (0, _DAY),
    "trainer.startup_timeout_s": ("<", 0, _DAY), "trainer.collective_timeout_s": ("<", 0, _DAY),
    "trainer.hang_timeout_s": (0, _DAY), "trainer.first_step_timeout_s": ("<", 0, _DAY),
    "perf.ddp_bucket_mb": (1, 1024),
    "eval.every_images": (1, _IMAGES), "eval.samples": (2, 1_000_000), "eval.real_samples": (2, 10_000_000),
}
CHOICES: dict[str, tuple] = {
    "model.resolution": (32, 64, 128), "model.channels": (1, 3), "model.kernel": (4, 5),
    "model.z_prior": ("normal", "uniform"), "train.device": ("auto", "cpu", "cuda"),
    "train.on_nonfinite": ("rollback", "stop"), "train.ema_bn": ("recompute", "copy"),
    "eval.generator": ("ema", "raw"),
    "perf.amp": ("auto", "fp32", "bf16", "fp16"),
    "perf.compile": ("none", "default", "max-autotune", "reduce-overhead", "max-autotune-no-cudagraphs"),
    "perf.grad_compression": ("none", "bf16", "fp16"),
    "eval.metric": (None, "fid", "coverage"),
    "perf.channels_last": SWITCH, "perf.fused_adam": SWITCH, "perf.cuda_graph": SWITCH,
    "eval.inception_dims": (64, 192, 768, 2048),  # fid.DIMS, not imported: config stays free of torch
}


def _range_error(key: str, value, bounds: tuple) -> str | None:
    """Why value is outside bounds, or None when it is inside (None values are 'not set' and always fine)."""
    if value is None:
        return None
    low_open = bounds[0] == "<"
    rest = bounds[1:] if low_open else bounds
    low, high = rest[0], rest[-1]
    high_open = len(rest) == 3
    if low is not None and (value <= low if low_open else value < low):
        return f"{key}: must be {'greater than' if low_open else 'at least'} {low}, got {value}"
    if high is not None and (value >= high if high_open else value > high):
        return f"{key}: must be {'less than' if high_open else 'at most'} {high}, got {value}"
    return None


def _checked(cfg) -> Config:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(cfg[section], name)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    for key, bounds in RANGES.items():
        section, name = key.split(".")
        problem = _range_error(key, getattr(cfg[section], name), bounds)
        if problem:
            raise ConfigError(problem)
    t = cfg.trainer
    if t.min_workers is not None and t.min_workers > t.num_workers:
        raise ConfigError(f"trainer.min_workers: {t.min_workers} is more than trainer.num_workers={t.num_workers} "
                          f"(an elastic group runs min_workers..num_workers ranks)")
    if "://" in cfg.run_dir or cfg.run_dir.startswith("pipe:"):
        raise ConfigError(f"run_dir: {cfg.run_dir!r} is a URL; the run directory is written through the local file "
                          f"system (TensorBoard appends, checkpoints are replaced in place): give a local or NFS path "
                          f"and put Ray's checkpoints in a bucket with trainer.storage_path (docs/object_storage.md)")
    e = cfg.eval
    if e.metric == "fid" and not e.inception_weights:
        raise ConfigError("eval.inception_weights: eval.metric=fid needs an Inception-v3 weights file "
                          "(docs/evaluate.md says where to get it)")
    return cfg


def find(name: str | Path | None) -> Path:
    """A config file: a path, or the name of a shipped config (`lsun_bedroom_64` or `lsun_bedroom_64.yaml`)."""
    if name is None:
        return DEFAULT_CONFIG
    path = Path(name)
    if path.exists():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if path.parent == Path(".") and candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {name} does not exist (shipped configs: {shipped})")


# Keys renamed, old -> new: the old name keeps working, with one line saying so (a checkpoint or config.yaml that
# an older version wrote is read silently).
RENAMED = {"data.num_workers": "data.loader_workers"}  # beside trainer.num_workers (ranks) it read as the same


def _renamed(data: DictConfig | dict, where: str | None) -> None:
    """Move RENAMED keys of a mapping of sections to their new names, in place; say so when `where` is given."""
    for old, new in RENAMED.items():
        section, name = old.split(".")
        part = data.get(section) if hasattr(data, "get") else None
        if part is None or name not in part:
            continue
        value = part.pop(name)
        if new.split(".")[1] not in part:
            part[new.split(".")[1]] = value
        if where is not None:
            print(f"dcgan_dist: {where}: {old} is now {new} (the old name still works)", file=sys.stderr, flush=True)


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults, then the YAML file, then key=value overrides; raise ConfigError naming any bad key."""
    path = find(path)
    schema = OmegaConf.structured(Config)
    try:
        try:
            from_file = OmegaConf.load(path)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where} is not valid YAML: {getattr(err, 'problem', None) or err}") from None
        except (IsADirectoryError, UnicodeDecodeError, PermissionError) as err:
            raise ConfigError(f"{path}: cannot read the config file: {err}") from None
        if not isinstance(from_file, DictConfig):
            raise ConfigError(f"{path}: a config file holds a mapping of sections (model:, train:, ...), "
                              f"not a {type(from_file).__name__}")
        _renamed(from_file, str(path))
        layers = [schema, from_file]
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        given = OmegaConf.from_dotlist(list(overrides or []))
        _renamed(given, "override")
        layers.append(given)
        cfg = OmegaConf.merge(*layers)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        message = str(err.msg if hasattr(err, "msg") else err).splitlines()[0]  # not OmegaConf's type dump
        raise ConfigError(f"{path}: key {key}: {message}") from None
    return _checked(cfg)


def _no_interpolation(data, key: str = "") -> None:
    """Raise ConfigError at the first string holding an OmegaConf interpolation (`${...}`)."""
    if isinstance(data, dict):
        for name, value in data.items():
            _no_interpolation(value, f"{key}.{name}" if key else str(name))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            _no_interpolation(value, f"{key}[{i}]")
    elif isinstance(data, str) and "${" in data:
        raise ConfigError(f"key {key}: {data!r} is an interpolation; a config read from a file (a checkpoint, a "
                          f"run's config.yaml) is data, and nothing in it is resolved")


def from_dict(data: dict) -> Config:
    """A config saved beside a run or in a checkpoint, validated against today's schema.

    Such a file may come from someone else (SECURITY.md): it is taken as data. The training loop writes configs
    resolved, so an interpolation in one (`${oc.env:AWS_SECRET_ACCESS_KEY}` in a URL, which OmegaConf would
    resolve on access) is refused, and every size is checked against RANGES before anything is built from it."""
    _no_interpolation(data)
    data = copy.deepcopy(data)
    _renamed(data, None)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise ConfigError(f"key {getattr(err, 'full_key', '?')}: {err}") from None
    return _checked(cfg)


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(cfg)


def load_or_exit(path, overrides) -> Config:
    """load() for command-line entry points: a bad config prints one line and exits with status 2."""
    try:
        return load(path, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2)
