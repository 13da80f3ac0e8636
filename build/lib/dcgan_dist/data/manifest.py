"""The manifest of a shard set (manifest.json): every shard's name, sample count, bytes and sha256, and the total.

The shard tool writes it (shard/writer.py); the trainer reads it to find the shards and the data set's size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from . import storage

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: str | Path) -> dict:
    """Read and sanity-check a manifest (a local path or a URL such as s3://...); errors name the file."""
    try:
        manifest = json.loads(storage.read_bytes(str(path)))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read shard manifest: {err}") from None
    for key in ("shards", "total"):
        if key not in manifest:
            raise ValueError(f"{path}: shard manifest has no {key!r} key")
    return manifest
