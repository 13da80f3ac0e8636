"""The one conversion between stored pixels (uint8, 0..255) and the networks' images (float, [-1, 1])."""

from __future__ import annotations

import torch


def from_uint8(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1] on device (a channels_last view of NHWC memory)."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] (any layout) -> uint8 0..255, rounded and clamped, same shape."""
    return images.detach().float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
