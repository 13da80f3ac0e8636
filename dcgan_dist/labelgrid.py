"""Image grids with a text label under every tile: numbered sample sheets, neighbours with their distances."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

Tile = tuple[torch.Tensor | None, str]  # an image in [-1, 1] (C, H, W), or None for an empty cell; its label
_BAND = 14  # pixels of label text under each tile
_GAP = 2


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


def save(rows: list[list[Tile]], path: str | Path, tile: int = 64) -> Image.Image:
    image = render(rows, tile)
    image.save(str(path))
    return image


def numbered_rows(images: torch.Tensor, ncol: int, first: int = 0) -> list[list[Tile]]:
    """Images laid out `ncol` to a row, each labelled with its index (a sheet to pick exemplars from)."""
    cells = [(img, f"#{first + i}") for i, img in enumerate(images)]
    return [cells[i:i + ncol] for i in range(0, len(cells), ncol)]


def _to_pil(image: torch.Tensor, tile: int) -> Image.Image:
    # Nearest-neighbour upscaling keeps small samples' pixels honest while making room for legible labels.
    x = F.interpolate(image[None].float().cpu(), size=(tile, tile), mode="nearest")[0]
    u8 = x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    if u8.shape[0] == 1:
        u8 = u8.expand(3, -1, -1)
    return Image.fromarray(u8.permute(1, 2, 0).numpy())
