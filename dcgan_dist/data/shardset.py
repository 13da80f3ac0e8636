"""What data.shards names: a shard directory, a manifest (local or on a bucket), brace patterns or URLs."""

from __future__ import annotations

import functools
import glob
import os
import sys
import time
from dataclasses import dataclass

from braceexpand import braceexpand

from . import storage, tarread
from .manifest import MANIFEST, read_manifest


@dataclass
class ShardSet:
    """Where the shards are and, when a manifest says so, how many samples each holds."""
    urls: list[str]
    counts: list[int] | None = None

    @property
    def size(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


def manifest_of(spec: str) -> str | None:
    """The manifest a data.shards spec names, or None when it names shards directly."""
    if storage.is_remote(spec) and spec.endswith("/"):
        return spec + MANIFEST  # a bucket prefix: its manifest names the shards, no listing
    if os.path.isdir(spec):
        path = os.path.join(spec, MANIFEST)
        return path if os.path.exists(path) else None  # without a manifest: glob the directory's tar files
    return spec if spec.endswith(".json") else None


def resolve(spec: str) -> ShardSet:
    """Turn data.shards (a directory, a manifest, brace patterns or URLs joined by '::') into a ShardSet."""
    spec = spec.strip()
    if not spec:
        raise ValueError("data.shards is empty: name a shard directory, a manifest.json or a shard pattern")
    manifest_path = manifest_of(spec)
    if manifest_path is not None:
        if not storage.is_remote(manifest_path) and not os.path.exists(manifest_path):
            raise FileNotFoundError(f"data.shards: manifest {manifest_path} does not exist")
        manifest = read_manifest(manifest_path)
        base = os.path.dirname(manifest_path)
        urls = [os.path.join(base, s["name"]) for s in manifest["shards"]]
        if not urls:
            raise ValueError(f"data.shards: manifest {manifest_path} lists no shards")
        return ShardSet(urls, [s["count"] for s in manifest["shards"]])
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
    else:
        urls = [u for part in spec.split("::") for u in braceexpand(part)]
    missing = [u for u in urls if not storage.is_remote(u) and not os.path.exists(u)]
    if not urls or len(missing) == len(urls):
        raise FileNotFoundError(f"data.shards {spec!r} matches no shard")
    if missing:
        raise FileNotFoundError(f"data.shards {spec!r}: {len(missing)} shards do not exist, first {missing[0]}")
    remote = [u for u in urls if storage.is_remote(u)]
    if remote:
        try:  # one request: an unreachable store or a wrong prefix fails here, not as a skip of every shard
            storage.check_readable(remote[0])
        except OSError as err:
            raise ValueError(f"data.shards {spec!r}: {err}") from err
    return counted(ShardSet(urls))


@functools.lru_cache(maxsize=None)
def _count(path: str, size: int, mtime_ns: int) -> int:
    del size, mtime_ns  # part of the cache key: a rewritten shard is counted again
    return tarread.count_samples(path)


def counted(shards: ShardSet) -> ShardSet:
    """Shards without a manifest (webdataset's ShardWriter, img2dataset, ...) with their sample counts, read
    from the tar headers of local files; remote ones are left uncounted (that would download every shard)."""
    if shards.counts is not None or any(storage.is_remote(u) for u in shards.urls):
        return shards
    start = time.perf_counter()
    counts = []
    for url in shards.urls:
        st = os.stat(url)
        try:
            counts.append(_count(url, st.st_size, st.st_mtime_ns))
        except (ValueError, OSError) as err:  # damaged: the stream skips and counts it when it gets there
            print(f"dcgan_dist.data: cannot count the samples of {url} ({type(err).__name__}: {err}); "
                  f"it is taken as empty", file=sys.stderr)
            counts.append(0)
    seconds = time.perf_counter() - start
    if seconds > 0.05:
        print(f"dcgan_dist.data: no manifest.json: counted {sum(counts)} samples in {len(counts)} shards from "
              f"their tar headers in {seconds:.1f} s", file=sys.stderr)
    return ShardSet(shards.urls, counts)
