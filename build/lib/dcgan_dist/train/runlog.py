"""What rank 0 tells the user: TensorBoard event files, a progress bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from .. import config as config_mod
from .. import grids


class RunLog:
    """TensorBoard writer and progress display for one run directory."""

    def __init__(self, run_dir: str | Path, cfg, total_images: int, start_images: int):
        self.run_dir = Path(run_dir)
        # A resumed run drops what a crashed one logged after its checkpoint, so no curve shows those steps twice.
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_images + 1 if start_images else None)
        self.total = total_images
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_images, initial=start_images, unit="img", unit_scale=True,
                            dynamic_ncols=True, smoothing=0.1)
        if start_images == 0:
            self.writer.add_text("config", "```\n" + config_mod.to_yaml(cfg) + "\n```", 0)
        self._last_images = start_images

    def scalars(self, images: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, images)
        self.writer.flush()
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if not k.startswith("data/"))
        if self.bar is not None:
            self.bar.update(images - self._last_images)
            self.bar.set_postfix_str(shown, refresh=True)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {images}/{self.total} images  {shown}", flush=True)
        self._last_images = images

    def grid(self, tag: str, images: torch.Tensor, step: int, png_path: Path | None = None) -> None:
        picture = grids.grid(images)
        self.writer.add_image(tag, picture, step, dataformats="HWC")
        self.writer.flush()
        if png_path is not None:
            Image.fromarray(picture).save(str(png_path))

    def alarm(self, images: int, text: str) -> None:
        """A warning on the terminal and as TensorBoard text (tag `alarm`)."""
        self.message(f"warning at {images} images: {text}")
        self.writer.add_text("alarm", text, images)
        self.writer.flush()

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
