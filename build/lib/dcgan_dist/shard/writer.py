"""Writing WebDataset tar shards and their manifest: the one shard writer that every producer uses.

Shards are deterministic (fixed tar metadata, samples in the order given) so the same input gives byte-identical
files, and atomic (files.atomic_open): a file with a final name is always a whole shard.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import asdict
from pathlib import Path

from .. import __version__, files
from ..data.manifest import FORMAT_VERSION, MANIFEST, ShardInfo

_KEY_OK = re.compile(r"[^A-Za-z0-9_\-]")


def safe_key(key: str) -> str:
    """A WebDataset sample key: no dots (they separate key from field) and no path separators."""
    return _KEY_OK.sub("_", key)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def encode_sample(key: str, fields: dict[str, bytes]) -> bytes:
    """One sample as tar members (header, data, padding per field, fields in sorted order), ready to be joined.

    Encoding is separate from writing so that many processes can encode while one writes.
    """
    key = safe_key(key)
    parts = []
    for ext in sorted(fields):
        data = fields[ext]
        parts += [_tarinfo(f"{key}.{ext}", len(data)).tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"), data,
                  bytes(-len(data) % tarfile.BLOCKSIZE)]
    return b"".join(parts)


def write_encoded_shard(path: Path, samples: list[bytes]) -> ShardInfo:
    """Write one shard atomically from encode_sample() outputs, in the order given, hashing as it writes."""
    path = Path(path)
    digest, size = hashlib.sha256(), 0
    with files.atomic_open(path) as f:
        for chunk in samples:
            f.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        end = bytes(2 * tarfile.BLOCKSIZE)  # end-of-archive marker, then padding to a whole record, as tar does
        end += bytes(-(size + len(end)) % tarfile.RECORDSIZE)
        f.write(end)
        digest.update(end)
    return ShardInfo(path.name, len(samples), size + len(end), digest.hexdigest())


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> ShardInfo:
    """Write one shard atomically: samples are (key, {extension: bytes}), in the order given."""
    return write_encoded_shard(path, [encode_sample(key, fields) for key, fields in samples])


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def write_manifest(outdir: Path, shards: list[ShardInfo], source: str, options: dict, **extra) -> dict:
    """manifest.json: every shard with count, bytes and sha256, the total, the source and the options."""
    manifest = {
        "format": FORMAT_VERSION,
        "tool_version": __version__,
        "source": source,
        "options": options,
        "shards": [asdict(s) for s in shards],
        "total": sum(s.count for s in shards),
        **extra,
    }
    files.write_text(Path(outdir) / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest
