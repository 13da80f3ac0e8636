"""Fréchet and kernel Inception distances (FID, KID) on Inception-v3 pool features from a weights file on disk.

The network is torchmetrics' port of torch-fidelity's Inception-v3 (the TensorFlow 2015-12-05 graph that published
FIDs use), with the TensorFlow-compatible bilinear resize. Nothing is downloaded: the user supplies the weights.
The distance math is done here, on the features, so one Inception pass serves both FID and KID and the real
set's statistics can be kept between evaluations during training.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_weights
from ..pixels import to_uint8

WEIGHTS_URLS = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
)
DIMS = (64, 192, 768, 2048)  # the pool layers torch-fidelity exposes; 2048 is the standard FID
_PROBE_KEY = "Mixed_7c.branch_pool.conv.weight"  # present in both files above, absent from other checkpoints


def _missing_message(path) -> str:
    urls = "\n  ".join(WEIGHTS_URLS)
    return (f"Inception-v3 FID weights file {path!r} does not exist. Nothing is downloaded at run time: fetch "
            f"either of these (the same weights) on a machine with internet access and copy it here:\n  {urls}\n"
            f"then pass it with --inception-weights PATH (or eval.inception_weights in a training config).")


def check_weights(path: str | Path | None) -> None:
    """Raise FileNotFoundError, saying where to get the file, unless the weights file exists."""
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(_missing_message(path))


def load_inception(path: str | Path | None, dims: int = 2048, device: str | torch.device = "cpu") -> nn.Module:
    """The FID Inception-v3 from a weights file, returning `dims` pool features per uint8 RGB image."""
    if dims not in DIMS:
        raise ValueError(f"Inception feature dims {dims} is not one of {DIMS}")
    check_weights(path)
    # The file is read once, here, with weights_only: torch-fidelity's own loader unpickles whatever it is given
    # with weights_only=False, so it gets a copy of the checked state dict that this process wrote itself.
    try:
        state = load_weights(path)
    except CheckpointError:
        raise
    except Exception as err:
        raise RuntimeError(f"cannot read Inception weights {path}: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or _PROBE_KEY not in state:
        raise RuntimeError(f"{path} is not an Inception-v3 FID state dict (no {_PROBE_KEY!r}); "
                           f"expected one of:\n  " + "\n  ".join(WEIGHTS_URLS))
    from torchmetrics.image.fid import NoTrainInceptionV3

    # antialias=False: torch-fidelity's TensorFlow-1 bilinear resize, so scores compare with published ones.
    checked = io.BytesIO()
    torch.save({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, checked)
    checked.seek(0)
    net = NoTrainInceptionV3("inception-v3-compat", [str(dims)], checked, antialias=False)
    return net.to(device)


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, 1 or 3, H, W) -> uint8 RGB, the input the Inception port expects."""
    u8 = to_uint8(images)
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8


@torch.no_grad()
def inception_features(net: nn.Module, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """Pool features (N, dims) in float64 on the CPU for images in [-1, 1]."""
    device = next(net.parameters()).device
    return torch.cat([net(to_uint8_rgb(images[i:i + batch_size]).to(device)).double().cpu()
                      for i in range(0, len(images), batch_size)])


def statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of features (N, D), in float64."""
    f = features.double()
    if len(f) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {len(f)}")
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians."""
    # Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2): a symmetric form, so eigh (stable, and several times
    # faster than the general eigensolver) applies; negative eigenvalues are rounding noise of singular matrices.
    w, v = torch.linalg.eigh(sigma1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    inner = root1 @ sigma2 @ root1
    cross = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross)


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float, int]:
    """KID: unbiased MMD^2 with the cubic polynomial kernel, over random subsets; (mean, std, subset size)."""
    from torchmetrics.image.kid import poly_mmd

    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(real)} real and {len(fake)} generated")
    gen = torch.Generator().manual_seed(seed)

    def draw(f: torch.Tensor) -> torch.Tensor:
        return f[torch.randperm(len(f), generator=gen)[:m]]

    scores = torch.stack([poly_mmd(draw(real), draw(fake)) for _ in range(subsets)])
    return float(scores.mean()), float(scores.std(unbiased=False)), m
