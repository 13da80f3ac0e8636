"""The manifest of a shard set (manifest.json): every shard's name, sample count, bytes and sha256, and the total.

The shard tool writes it (shard/writer.py); the trainer reads it to find the shards and the data set's size.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import urllib.parse
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
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: a shard manifest is a JSON object, not {type(manifest).__name__}")
    for key in ("shards", "total"):
        if key not in manifest:
            raise ValueError(f"{path}: shard manifest has no {key!r} key")
    if not isinstance(manifest["shards"], list):
        raise ValueError(f"{path}: 'shards' must be a list of {{name, count, ...}} entries")
    for i, entry in enumerate(manifest["shards"]):
        problem = _entry_problem(entry)
        if problem:
            raise ValueError(f"{path}: shards[{i}] {json.dumps(entry)[:200]}: {problem}")
    return manifest


def _entry_problem(entry) -> str | None:
    """Why a manifest entry cannot be used, or None. Names must stay inside the manifest's folder or prefix:
    a manifest is data, and data must not point the trainer at other files or make it run commands (pipe:)."""
    if not isinstance(entry, dict):
        return "an entry must be an object with 'name' and 'count'"
    name, count = entry.get("name"), entry.get("count")
    if not isinstance(name, str) or not name:
        return "'name' must be a non-empty string"
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        return "'count' must be a whole number of samples, 0 or more"
    if any(form.startswith(("/", "\\")) or "\\" in form or ":" in form or posixpath.normpath(form) != form
           or form.split("/")[0] == ".." for form in _decodings(name)):
        return ("'name' must be a relative path inside the manifest's folder, as written and percent-decoded: no "
                "leading '/', no '..' or '.', no empty segment, no '\\', no ':' (URLs and pipe: commands are "
                "refused)")
    return None


def _decodings(name: str) -> list[str]:
    """name and each percent-decoding of it until one changes nothing: a web server or a store decodes %2e%2e
    into '..' once, perhaps more often."""
    forms = [name]
    while len(forms) < 8 and (decoded := urllib.parse.unquote(forms[-1])) != forms[-1]:
        forms.append(decoded)
    return forms
