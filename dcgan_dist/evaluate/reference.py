"""The protocol behind an Inception score (FID, KID, precision/recall) and the cached features of the real side.

Scores are comparable only under the same protocol: the clean-fid study measured about 21 FID points between
JPEG q75 and PNG references of FFHQ, and a point between box and Lanczos downscaling. So every report states it:
which shards (their fingerprint, format, JPEG quality, stored size and the shard tool's resize), how the real
images were decoded (data/images.decode_image: as training decodes them), how many, the Inception weights
(sha256) and feature layer, and that generated images are quantised to uint8 exactly as the reals are before
Inception resizes both to 299 with the same filter. The real features are cached under a key made of exactly
these facts, so an unchanged reference is never recomputed and a changed one is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .. import files
from ..checkpoint import load_weights
from ..data import load, shardset, storage
from ..data.manifest import file_sha256, read_manifest
from ..distributed import context
from . import fid, sharded

INCEPTION_INPUT = ("uint8 RGB (greyscale repeated), resized to 299x299 by the TF1-compatible bilinear filter "
                   "without antialiasing (torch-fidelity's, as published FIDs)")
QUANTISATION = "quantised to uint8 (rounded from [-1, 1]) exactly as the reals are stored (pixels.to_uint8)"
DECODE = ("decoded as training decodes them (data/images.decode_image): centre square, Lanczos only if stored "
          "at another size")
BATCH = 50  # real images decoded and embedded at a time (fid.inception_features' own batch): the memory bound


def default_cache() -> Path:
    """$XDG_CACHE_HOME/dcgan_dist/fid_reference, or ~/.cache/dcgan_dist/fid_reference."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dcgan_dist" / "fid_reference"


def cache_dir(setting: str | None) -> Path | None:
    """A cache setting ("auto", "off", or a folder) as a folder, or None for no cache."""
    if setting in (None, "", "auto"):
        return default_cache()
    return None if setting == "off" else Path(setting)


def real_protocol(spec: str, resolution: int, channels: int, limit: int | None) -> dict:
    """What the real side of a score is: shards, their format and quality, their fingerprint, how many images."""
    found = shardset.manifest_of(spec.strip())
    if found is not None:
        manifest = read_manifest(found)
        options = manifest.get("options", {})
        fingerprint = hashlib.sha256("".join(s.get("sha256", s["name"]) for s in manifest["shards"])
                                     .encode()).hexdigest()[:16]
        fmt, quality = options.get("format", "unknown"), options.get("quality")
        stored = "own sizes (keep_size)" if options.get("keep_size") else options.get("resolution", "unknown")
        shard_resize = "none (kept whole)" if options.get("keep_size") else "centre crop, Lanczos (dcgan_dist.shard)"
        total = manifest["total"]
    else:  # shards written by another tool: their urls (and local sizes) identify them
        shards = shardset.resolve(spec)
        sizes = [os.path.getsize(u) if not storage.is_remote(u) else 0 for u in shards.urls]
        fingerprint = hashlib.sha256(json.dumps([shards.urls, sizes]).encode()).hexdigest()[:16]
        fmt, quality, stored, shard_resize, total = "unknown (no manifest)", None, "unknown", "unknown", shards.size
    if total is None:
        images = limit  # None: all of them, counted when read
    else:
        images = total if limit is None else min(limit, total)
    return {"shards": spec, "fingerprint": fingerprint, "images": images, "format": fmt,
            "quality": quality if fmt in ("jpg", "webp") else None, "stored_resolution": stored,
            "shard_resize": shard_resize, "decode": DECODE, "resolution": resolution, "channels": channels}


def inception_protocol(weights: str | Path, dims: int) -> dict:
    return {"weights": str(weights), "sha256": file_sha256(weights)[:16], "dims": dims, "input": INCEPTION_INPUT}


def key(real: dict, inception: dict) -> str:
    """The cache key: every fact of the protocol that changes the real features (not where the files are)."""
    facts = {k: v for k, v in real.items() if k != "shards"}
    facts["inception"] = {k: v for k, v in inception.items() if k != "weights"}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]


def real_features(net: torch.nn.Module, real: dict, inception: dict, cache: Path | None, rank: int = 0,
                  world_size: int = 1, device: torch.device | None = None) -> tuple[torch.Tensor, bool]:
    """Inception features (N, dims) of the real side, from the cache or computed (each rank its share); and
    whether they came from the cache. Every rank returns the whole set."""
    path = cache / f"real-{key(real, inception)}.pt" if cache is not None else None
    hit = context.broadcast_object(path is not None and path.is_file())  # rank 0's disk decides for every rank
    if hit:
        saved = context.broadcast_object(load_weights(path) if rank == 0 else None)
        real["images"] = saved["images"]
        return saved["features"].double(), True
    # One process reads up to the limit and counts what it got; ranks need the total first, for their shares.
    n = None if world_size == 1 else load.count(real["shards"], real["images"])
    part = slice(0, real["images"]) if n is None else sharded.share(n, rank, world_size)
    features = _embed(net, real, inception["dims"], part)
    if n is None:
        n = len(features)
    elif len(features) != part.stop - part.start:
        raise ValueError(f"shard set {real['shards']!r}: images {part.start} to {part.stop - 1} of {n} were to be "
                         f"read, but only {len(features)} were there (does the manifest match the shards?)")
    if n == 0:
        raise ValueError(f"shard set {real['shards']!r} holds no images")
    real["images"] = n
    features = sharded.gather(features, n, rank, world_size, device or torch.device("cpu"))
    if path is not None and rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The network computes in float32: storing float32 loses nothing and halves the file.
        with files.atomic_open(path) as f:
            torch.save({"features": features.float(), "images": n, "protocol": real, "inception": inception}, f)
    return features, False


def _embed(net: torch.nn.Module, real: dict, dims: int, part: slice) -> torch.Tensor:
    """Features of the real images in part, read and embedded BATCH at a time: only features accumulate."""
    batches = load.image_batches(real["shards"], real["resolution"], real["channels"], BATCH, part.start,
                                 part.stop)
    return torch.cat([torch.empty((0, dims), dtype=torch.float64)]
                     + [fid.inception_features(net, x) for x in batches])


def describe(protocol: dict) -> str:
    """The protocol as the lines every report prints."""
    r, i, g = protocol["real"], protocol["inception"], protocol["generated"]
    quality = f" q{r['quality']}" if r.get("quality") else ""
    return "\n".join([
        f"  protocol: real: {r['images']} images of {r['shards']} (fingerprint {r['fingerprint']}; {r['format']}"
        f"{quality}, stored at {r['stored_resolution']}, shard resize: {r['shard_resize']}), {r['decode']}"
        + (" [cached reference]" if protocol.get("cached") else ""),
        f"            generated: {g['images']} from {g['generator']}, seed {g['seed']}; {QUANTISATION}",
        f"            Inception-v3 {i['weights']} (sha256 {i['sha256']}), pool features {i['dims']}; {i['input']}",
    ])
