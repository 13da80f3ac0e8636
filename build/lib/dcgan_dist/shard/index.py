"""Manifests for shards made elsewhere, and a check of shards against their manifest.

`python -m dcgan_dist.shard index DIR_OR_PREFIX` reads every `*.tar` in a folder or bucket prefix (webdataset's
ShardWriter, img2dataset, a copy of ours) and writes our manifest.json: per shard the sample count, bytes and
sha256, so the trainer knows the data set's size without counting and remote sets need no data.size.
`python -m dcgan_dist.shard verify DIR_OR_PREFIX` reads every shard its manifest lists and reports each problem
with the shard's name: a missing file, another sha256, size or sample count, a sample whose image does not decode.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..data import storage, tarread
from ..data.images import decode, image_field
from ..data.manifest import MANIFEST, ShardInfo, read_manifest
from .output import open_output


class _Hashing:
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, stream):
        self.stream, self.digest, self.size = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass
class Scan:
    info: ShardInfo
    problems: list[str] = field(default_factory=list)


def _prefix(target: str) -> str:
    return target if storage.is_remote(target) else target.rstrip("/")


def _url(target: str, name: str) -> str:
    return f"{target.rstrip('/')}/{name}"


def list_shards(target: str) -> list[str]:
    """Names of the *.tar files directly in a folder or under a bucket prefix, sorted."""
    fs, root = storage.filesystem(_prefix(target))
    try:
        paths = fs.glob(f"{root.rstrip('/')}/*.tar")
    except FileNotFoundError:
        paths = []
    return sorted(p.rsplit("/", 1)[-1] for p in paths)


def scan(url: str, check_images: bool) -> Scan:
    """Count, size and sha256 of one shard, read once; with check_images, every sample's image decoded."""
    name, problems, count = url.rsplit("/", 1)[-1], [], 0
    with storage.open_read(url) as raw:
        stream = _Hashing(raw)
        try:
            for sample in tarread.samples(stream, url):
                count += 1
                if check_images:
                    try:
                        decode(image_field(sample))
                    except Exception as err:
                        problems.append(f"{name}: sample {sample['__key__']!r}: {err}")
            stream.drain()  # the end-of-archive padding belongs to the file's bytes and hash
        except tarread.TarError as err:
            problems.append(f"{name}: damaged after {count} samples: {err}")
    return Scan(ShardInfo(name, count, stream.size, stream.digest.hexdigest()), problems)


def index(target: str) -> dict:
    """Write manifest.json for the shards in target; return it. Raises ValueError when there are none."""
    names = list_shards(target)
    if not names:
        raise ValueError(f"{target} holds no *.tar shard")
    scans = [scan(_url(target, n), check_images=False) for n in names]
    damaged = [p for s in scans for p in s.problems]
    if damaged:
        raise ValueError("cannot index damaged shards: " + "; ".join(damaged))
    out = open_output(target)
    return out.write_manifest([s.info for s in scans], source=f"indexed: {target}", options={},
                              tool="dcgan_dist.shard index")


def verify(target: str) -> tuple[int, list[str]]:
    """(shards checked, problems) for every shard target's manifest lists."""
    manifest = read_manifest(_url(target, MANIFEST))
    problems = []
    for entry in manifest["shards"]:
        url = _url(target, entry["name"])
        try:
            found = scan(url, check_images=True)
        except (FileNotFoundError, OSError) as err:
            problems.append(f"{entry['name']}: cannot read: {err}")
            continue
        problems += found.problems
        for key in ("count", "bytes", "sha256"):
            if key in entry and entry[key] != getattr(found.info, key):
                problems.append(f"{entry['name']}: {key} {getattr(found.info, key)} on disk, {entry[key]} in the "
                                f"manifest")
    listed = {e["name"] for e in manifest["shards"]}
    total = sum(e["count"] for e in manifest["shards"])
    if manifest.get("total") != total:
        problems.append(f"{MANIFEST}: total {manifest.get('total')} but the shards' counts add up to {total}")
    unlisted = [n for n in list_shards(target) if n not in listed]
    if unlisted:
        problems.append(f"{len(unlisted)} shards are not in the manifest (the trainer ignores them), first "
                        f"{unlisted[0]}")
    return len(manifest["shards"]), problems
