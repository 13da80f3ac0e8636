"""Writing WebDataset tar shards and their manifest: the one shard writer that every producer uses.

Shards are deterministic (fixed tar metadata, samples in the order given) so the same input gives byte-identical
files, and atomic: a shard is written under a temporary name and renamed when complete, so a file with a final
name is always a whole shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from . import storage

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_KEY_OK = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str


def safe_key(key: str) -> str:
    """A WebDataset sample key: no dots (they separate key from field) and no path separators."""
    return _KEY_OK.sub("_", key)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> ShardInfo:
    """Write one shard atomically: samples are (key, {extension: bytes}), in the order given."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for key, fields in samples:
                key = safe_key(key)
                for ext in sorted(fields):
                    data = fields[ext]
                    tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    return ShardInfo(path.name, len(samples), path.stat().st_size, file_sha256(path))


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_manifest(outdir: Path, shards: list[ShardInfo], source: str, options: dict, **extra) -> dict:
    """manifest.json: every shard with count, bytes and sha256, the total, the source and the options."""
    from . import __version__

    manifest = {
        "format": FORMAT_VERSION,
        "tool_version": __version__,
        "source": source,
        "options": options,
        "shards": [asdict(s) for s in shards],
        "total": sum(s.count for s in shards),
        **extra,
    }
    write_json_atomic(Path(outdir) / MANIFEST, manifest)
    return manifest


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
