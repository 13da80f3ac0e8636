"""Where the shard tool writes. It writes only through a destination's methods, so that another kind of
destination (object storage) can stand in for the local directory by providing the same ones."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import ContextManager, Iterator

import fsspec

from .. import files
from ..data import storage
from ..data.manifest import MANIFEST, ShardInfo, file_sha256
from . import writer


class LocalDir:
    """A local output directory; every file appears atomically under its final name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def lock(self) -> ContextManager[None]:
        """Hold OUTDIR for this run (files.one_writer): a second run at the same time is told who holds it."""
        return files.one_writer(self.path, "OUTDIR")

    def __str__(self) -> str:
        return str(self.path)

    def write_shard(self, name: str, samples: list[bytes]) -> ShardInfo:
        """One tar shard of writer.encode_sample() outputs, through the project's one shard writer."""
        return writer.write_encoded_shard(self.path / name, samples)

    def write_manifest(self, shards: list[ShardInfo], source: str, options: dict, **extra) -> dict:
        """manifest.json, through the project's one manifest writer."""
        return writer.write_manifest(self.path, shards, source, options, **extra)

    def write_bytes(self, name: str, data: bytes) -> None:
        """A small file (name may hold '/'), written under a temporary name and renamed."""
        files.write_bytes(self.path / name, data)

    def read_bytes(self, name: str) -> bytes | None:
        """A file's bytes, or None if it does not exist."""
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None

    def size(self, name: str) -> int | None:
        """A file's size in bytes, or None if it does not exist."""
        try:
            return (self.path / name).stat().st_size
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        """Remove a file or a folder of files, if there."""
        path = self.path / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def remove_temporaries(self) -> None:
        """Drop the leftovers of writes a killed run never finished (our temporaries only)."""
        files.remove_temporaries(self.path)


class BucketDir:
    """An object-store prefix (s3://, gs://, ...). Shards and the manifest are written by the same writers into a
    local temporary folder, then uploaded; a store shows an object only once its upload is complete."""

    def __init__(self, url: str):
        if fsspec.utils.get_protocol(url) in ("http", "https") or url.startswith("pipe:"):
            raise ValueError(f"cannot write shards to {url}: name a bucket (s3://, gs://) or a local directory")
        self.url = url.rstrip("/")
        self.fs, self.root = storage.filesystem(self.url)

    def __str__(self) -> str:
        return self.url

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def write_shard(self, name: str, samples: list[bytes]) -> ShardInfo:
        """One tar shard, uploaded unless the bucket already holds these very bytes (a rerun after a kill that
        fell between an upload and its progress record)."""
        with tempfile.TemporaryDirectory(prefix="dcgan-shard-") as tmp:
            info = writer.write_encoded_shard(Path(tmp) / name, samples)
            if not self._holds(name, info, Path(tmp) / "uploaded"):
                self.fs.put_file(str(Path(tmp) / name), self._key(name))
        return info

    def _holds(self, name: str, info: ShardInfo, scratch: Path) -> bool:
        if self.size(name) != info.bytes:
            return False
        self.fs.get_file(self._key(name), str(scratch))
        return file_sha256(scratch) == info.sha256

    def write_manifest(self, shards: list[ShardInfo], source: str, options: dict, **extra) -> dict:
        """manifest.json, through the project's one manifest writer, then uploaded."""
        with tempfile.TemporaryDirectory(prefix="dcgan-shard-") as tmp:
            manifest = writer.write_manifest(Path(tmp), shards, source, options, **extra)
            self.fs.put_file(str(Path(tmp) / MANIFEST), self._key(MANIFEST))
        return manifest

    def write_bytes(self, name: str, data: bytes) -> None:
        """A small object (name may hold '/')."""
        self.fs.pipe_file(self._key(name), data)

    def read_bytes(self, name: str) -> bytes | None:
        """An object's bytes, or None if it does not exist."""
        try:
            return self.fs.cat_file(self._key(name))
        except FileNotFoundError:
            return None

    def size(self, name: str) -> int | None:
        """An object's size in bytes, or None if it does not exist."""
        try:
            return self.fs.info(self._key(name))["size"]
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        """Remove an object or every object under a prefix, if there."""
        try:
            self.fs.rm(self._key(name), recursive=True)
        except FileNotFoundError:
            pass

    def remove_temporaries(self) -> None:
        """Nothing to do: an interrupted upload leaves no object behind."""

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Object stores have no locks: two runs into one prefix are the user's to avoid (docs say so)."""
        yield


def open_output(dest: str | Path) -> LocalDir | BucketDir:
    """The shard tool's destination: a bucket prefix for a URL, else a local directory."""
    return BucketDir(str(dest)) if storage.is_remote(str(dest)) else LocalDir(dest)
