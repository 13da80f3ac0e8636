"""Every picture of many images: plain sample grids (TensorBoard, PNGs, `sample`) and grids with a text label
under every tile (numbered sample sheets, neighbours with their distances)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .pixels import to_uint8

Tile = tuple[torch.Tensor | None, str]  # an image in [-1, 1] (C, H, W), or None for an empty cell; its label
_BAND = 14  # pixels of label text under each tile
_GAP = 2


def grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W) -> one uint8 RGB picture (H', W', 3), `nrow` to a row (default: square),
    black `padding` pixels around every tile (torchvision's make_grid layout, without importing torchvision,
    whose import costs every training process two seconds)."""
    u8 = to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    if u8.shape[-1] == 1:
        u8 = np.repeat(u8, 3, axis=-1)
    n, h, w, _ = u8.shape
    cols = min(nrow or max(1, int(n ** 0.5)), n)
    rows = -(-n // cols)
    out = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), np.uint8)
    for i, tile in enumerate(u8):
        y, x = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        out[y:y + h, x:x + w] = tile
    return out


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """grid() written as a PNG."""
    Image.fromarray(grid(images, nrow)).save(str(path))


def render(rows: list[list[Tile]], tile: int = 64) -> Image.Image:
    """One RGB image: each row of (image, label) cells left to right, images scaled to `tile` pixels."""
    ncol = max(len(r) for r in rows)
    width, height = ncol * (tile + _GAP) + _GAP, len(rows) * (tile + _BAND + _GAP) + _GAP
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    for r, row in enumerate(rows):
        for c, (image, label) in enumerate(row):
            x, y = _GAP + c * (tile + _GAP), _GAP + r * (tile + _BAND + _GAP)
            if image is not None:
                canvas.paste(_to_pil(image, tile), (x, y))
            draw.text((x + 1, y + tile), label, fill="black", font=font)
    return canvas


def numbered_rows(images: torch.Tensor, ncol: int, first: int = 0) -> list[list[Tile]]:
    """Images laid out `ncol` to a row, each labelled with its index (a sheet to pick exemplars from)."""
    cells = [(img, f"#{first + i}") for i, img in enumerate(images)]
    return [cells[i:i + ncol] for i in range(0, len(cells), ncol)]


def _to_pil(image: torch.Tensor, tile: int) -> Image.Image:
    # Nearest-neighbour upscaling keeps small samples' pixels honest while making room for legible labels.
    u8 = to_uint8(F.interpolate(image[None].float().cpu(), size=(tile, tile), mode="nearest")[0])
    if u8.shape[0] == 1:
        u8 = u8.expand(3, -1, -1)
    return Image.fromarray(u8.permute(1, 2, 0).numpy())
