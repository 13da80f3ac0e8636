"""The options of the shard tool that decide its output, validated; shared by the command and its workers."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..data.images import FORMATS
from ..limits import MAX_IMAGE_PIXELS, MAX_SAMPLE_BYTES

DEDUP_MODES = ("none", "exact", "semantic")


@dataclass(frozen=True)
class Options:
    """Everything that decides the output bytes, recorded in the manifest (--workers changes no byte)."""
    resolution: int = 64  # output side in pixels: centre crop, then Lanczos resize
    keep_size: bool = False  # keep each image whole, at its own size
    format: str = "jpg"  # jpg, png, webp or raw (uint8 pixels with their shape)
    quality: int = 95  # JPEG and WebP quality
    shard_size: int = 1000  # samples per shard: LSUN's 3 M images give 3,000 shards, far more than ranks x workers
    prefix: str = ""  # shard file prefix; empty: the source's name
    shuffle: int | None = None  # seed of a permutation of the whole input; None keeps the source's order
    faces: bool = False  # one sample per detected face instead of one per image
    min_face: int = 64  # smallest face kept, in source pixels
    face_margin: float = 0.25  # crop margin on each side of a face, as a fraction of its box
    dedup: str = "none"  # none, exact (same pixels) or semantic (the paper's autoencoder hash)
    dedup_fit: int = 20000  # images the semantic hash is fitted on: the first ones in processing order
    dedup_radius: int = 2  # semantic codes at most this many bits apart count as duplicates
    # Inputs are others' files: one over a limit is skipped with the reason, unread (docs/loader.md).
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images (height x width, from the header) are not decoded
    max_file_bytes: int = MAX_SAMPLE_BYTES  # larger files, archive members and LMDB values are not read

    def __post_init__(self):
        checks = [
            (self.resolution >= 1, "--resolution must be at least 1"),
            (1 <= self.quality <= 100, "--quality must be between 1 and 100"),
            (self.shard_size >= 1, "--shard-size must be at least 1"),
            (re.fullmatch(r"[A-Za-z0-9_-]*", self.prefix), "--prefix may hold only letters, digits, '_' and '-'"),
            (self.format in FORMATS, f"--format must be one of {', '.join(FORMATS)}"),
            (self.min_face >= 1, "--min-face must be at least 1"),
            (self.face_margin >= 0, "--face-margin must not be negative"),
            (self.dedup in DEDUP_MODES, f"--dedup must be one of {', '.join(DEDUP_MODES)}"),
            (self.dedup_fit >= 1, "--dedup-fit must be at least 1"),
            (0 <= self.dedup_radius <= 16, "--dedup-radius must be between 0 and 16"),
            (self.max_image_pixels >= 1, "--max-image-pixels must be at least 1"),
            (self.max_file_bytes >= 1, "--max-file-bytes must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
