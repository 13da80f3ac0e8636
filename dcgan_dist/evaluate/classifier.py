"""A small CNN classifier of real labelled images, the judge of generated samples (mode coverage, quality).

Trained on the real labels (e.g. the MNIST-5k shards' `cls` field); it then classifies generated samples, and
the spread of its predictions over classes and its confidence say whether G covers every mode.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    """Three conv-ReLU-pool blocks and a linear head; any input size (pooled to 4x4 at the end)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(True), nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def fit(images: torch.Tensor, labels: torch.Tensor, epochs: int = 8, batch_size: int = 128, seed: int = 0,
        device: str | torch.device = "cpu") -> SmallCNN:
    """Train SmallCNN on images in [-1, 1] with integer labels; small random shifts keep it from overfitting."""
    torch.manual_seed(seed)
    num_classes = int(labels.max()) + 1
    model = SmallCNN(images.shape[1], num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), batch_size):
            idx = order[i:i + batch_size]
            x = images[idx].to(device)
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def fit_with_holdout(images: torch.Tensor, labels: torch.Tensor, holdout_every: int = 10, **fit_args,
                     ) -> tuple[SmallCNN, dict]:
    """fit() on all but every `holdout_every`-th image, and the judge's accuracy on those held out."""
    held = torch.arange(len(images)) % holdout_every == 0
    model = fit(images[~held], labels[~held], **fit_args)
    accuracy = float((predict_proba(model, images[held]).argmax(1) == labels[held]).float().mean())
    return model, {"heldout_accuracy": accuracy, "n_train": int((~held).sum()), "n_heldout": int(held.sum())}


@torch.no_grad()
def predict_proba(model: SmallCNN, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat([F.softmax(model(images[i:i + batch_size].to(device)), dim=1).cpu()
                      for i in range(0, len(images), batch_size)])


def coverage(probs: torch.Tensor) -> dict:
    """Per-class shares of the predicted labels, their entropy (nats; uniform = log K) and mean confidence."""
    k = probs.shape[1]
    shares = torch.bincount(probs.argmax(1), minlength=k).double() / len(probs)
    nonzero = shares[shares > 0]
    entropy = float((nonzero * nonzero.reciprocal().log()).sum())
    confidence = float(probs.max(1).values.mean())
    return {
        "n": len(probs),
        "shares": [round(float(s), 4) for s in shares],
        "entropy": entropy,
        "max_entropy": math.log(k),
        "mean_confidence": confidence,
        # One number to rank checkpoints by, in [0, 1]: 1 when every class is equally drawn and confidently so.
        "score": entropy / math.log(k) * confidence,
    }
