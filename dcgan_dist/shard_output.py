"""Where the shard tool writes. It writes only through a destination's methods, so that another kind of
destination (object storage) can stand in for the local directory by providing the same ones."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import tarshards


class LocalDir:
    """A local output directory; every file appears atomically under its final name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return str(self.path)

    def write_shard(self, name: str, samples: list[bytes]) -> tarshards.ShardInfo:
        """One tar shard of tarshards.encode_sample() outputs, through the project's one shard writer."""
        return tarshards.write_encoded_shard(self.path / name, samples)

    def write_manifest(self, shards: list[tarshards.ShardInfo], source: str, options: dict, **extra) -> dict:
        """manifest.json, through the project's one manifest writer."""
        return tarshards.write_manifest(self.path, shards, source, options, **extra)

    def write_bytes(self, name: str, data: bytes) -> None:
        """A small file (name may hold '/'), written under a temporary name and renamed."""
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

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
        """Drop the leftovers of writes a killed run never finished."""
        for tmp in self.path.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
