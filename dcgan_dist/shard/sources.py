"""Inputs of the shard tool: LSUN LMDB, image folders, zip and tar archives, the built-in sets.

A source lists (id, ref) pairs in a stable order, cheaply, in the main process; worker processes turn a ref into
the raw image with load(). Handles (LMDB environment, archive) are opened lazily in each process, so a source
pickles as little more than its path.

Sources are others' files: load() reads no more than max_bytes of an item, and only a regular file; a folder is
walked without following links into folders or out of it (FolderSource). What is refused is an item skipped with
its reason, as an undecodable image is.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..data.images import IMAGE_EXTS, BadImage
from ..limits import MAX_SAMPLE_BYTES
from . import builtin

BUILTIN = "builtin:"


class SourceError(Exception):
    """A source that cannot be read at all: a clear error and a non-zero exit, not a skipped item."""


def _check_ext(name: str) -> None:
    """Files named as non-images are skipped unread: a scrape's HTML or a stray video costs nothing."""
    ext = os.path.splitext(name)[1].lower()
    if ext[1:] not in IMAGE_EXTS:
        raise BadImage(f"not an image file name (extension {ext or 'none'!r})")


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise BadImage(f"{size:,} bytes, over the limit of {max_bytes:,} (--max-file-bytes): not read")


class Source:
    """Base: subclasses set name (the default shard prefix) and implement __len__, refs and load."""

    name = "shard"
    random_access = True  # refs can be listed up front and loaded in any order (needed by --shuffle)
    max_bytes = MAX_SAMPLE_BYTES  # an item larger than this is skipped unread

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

    def __init__(self, path: Path, max_bytes: int = MAX_SAMPLE_BYTES):
        self.path, self.name, self.max_bytes = str(path), path.name, max_bytes
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
        with self._env().begin(buffers=True) as txn:  # a view of the memory map: sized before it is copied
            value = txn.get(ref)
            if value is None:
                raise KeyError(f"key {ref!r} vanished from the LMDB")
            _check_size(len(value), self.max_bytes)
            return bytes(value), {}


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _not_regular(mode: int) -> str:
    return "not a regular file: " + next((name for test, name in _KINDS if test(mode)), "of an unknown kind")


def _read_regular(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes, at most max_bytes. Opened without blocking, so a FIFO put there after the listing
    cannot hang the read; its type and size come from the open file itself."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb", closefd=True) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadImage(_not_regular(st.st_mode))
        _check_size(st.st_size, max_bytes)
        data = f.read(max_bytes + 1)
    _check_size(len(data), max_bytes)  # it grew since
    return data


class FolderSource(Source):
    """Every file under a directory, recursively, in sorted path order; ids are paths relative to it.

    Links are followed only to regular files inside the folder. A link to a folder is never followed: every
    folder inside this one is read under its own name, so following could only repeat it or loop (`a -> .`).
    Such links, links out of the folder and what is not a regular file (a FIFO would block the read for ever, a
    device never ends) are listed unread and skipped with the reason.
    """

    def __init__(self, path: Path, max_bytes: int = MAX_SAMPLE_BYTES):
        self.path, self.name, self.max_bytes = path, path.name, max_bytes
        self.refused: dict[str, str] = {}  # id -> why it is skipped unread
        self.files = sorted(self._walk())

    def _walk(self) -> Iterator[str]:
        """Every entry under the folder but its subfolders, which are walked in turn (no link among them)."""
        root = os.path.realpath(self.path)
        pending = [""]
        while pending:
            folder = pending.pop()
            try:
                with os.scandir(os.path.join(self.path, folder)) as entries:
                    found = [(os.path.join(folder, e.name), e) for e in entries]
            except OSError as err:
                if not folder:
                    raise SourceError(f"cannot list source folder {self.path}: {err.strerror}") from None
                self.refused[folder] = f"cannot list this folder: {err.strerror}"
                yield folder
                continue
            for rel, entry in found:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(rel)
                    continue
                why = None if entry.is_file(follow_symlinks=False) else self._refusal(entry, root)
                if why is not None:
                    self.refused[rel] = why
                yield rel

    @staticmethod
    def _refusal(entry: os.DirEntry, root: str) -> str | None:
        """Why an entry that is not a plain regular file is not read; None for a link to one inside the folder."""
        if not entry.is_symlink():
            return _not_regular(entry.stat(follow_symlinks=False).st_mode)
        target = os.path.realpath(entry.path)
        if os.path.commonpath([root, target]) != root:
            return f"a link to {target}, outside the source folder: not followed"
        try:
            mode = os.stat(target).st_mode
        except OSError as err:
            return f"a link that does not resolve ({err.strerror}): not followed"
        if stat.S_ISDIR(mode):
            if os.path.commonpath([target, os.path.realpath(os.path.dirname(entry.path))]) == target:
                return "a link to a folder that holds it, a loop: not followed"
            return "a link to a folder, which is read under its own name: not followed"
        return None if stat.S_ISREG(mode) else _not_regular(mode)

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
        if ref in self.refused:
            raise BadImage(self.refused[ref])
        _check_ext(ref)
        return _read_regular(self.path / ref, self.max_bytes), {}


class ZipSource(Source):
    """Files in a zip archive, in sorted name order."""

    def __init__(self, path: Path, max_bytes: int = MAX_SAMPLE_BYTES):
        self.path, self.name, self.max_bytes = path, path.stem, max_bytes
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
        info = self._zip.getinfo(ref)
        _check_size(info.file_size, self.max_bytes)  # zipfile stops at this declared size, whatever the data holds
        return self._zip.read(info), {}


class TarSource(Source):
    """Files in a tar archive, in archive order. A plain tar is read in place by offset; a compressed one can only
    be streamed, so its refs carry the bytes and --shuffle is refused."""

    def __init__(self, path: Path, max_bytes: int = MAX_SAMPLE_BYTES):
        self.path, self.name, self.max_bytes = path, path.name.split(".")[0], max_bytes
        try:
            try:
                tf = tarfile.open(path, "r:")
            except tarfile.ReadError:  # compressed
                tf, self.random_access = tarfile.open(path, "r:*"), False
            with tf:
                self.members = [(m.name, m.offset_data, m.size) for m in self._files(tf)]
        except (tarfile.TarError, OSError, EOFError) as err:
            raise SourceError(f"cannot read tar archive {path}: {err}") from None

    def _files(self, tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        """The archive's regular files, each checked as it comes: tarfile has already moved to the next header
        by the member's size, and a negative one (GNU base-256) would bring it back to this one, for ever."""
        end = os.path.getsize(self.path) if self.random_access else None
        for m in tf:
            if m.size < 0 or end is not None and m.offset_data + m.size > end:
                raise SourceError(f"tar archive {self.path}: member {m.name!r} declares {m.size:,} bytes, "
                                  f"which no tar of {os.path.getsize(self.path):,} bytes can hold")
            if m.isfile():
                yield m

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
            for m in self._files(tf):  # an oversized member's bytes stay in the archive
                data = tf.extractfile(m).read() if m.size <= self.max_bytes else None
                yield m.name, (m.name, data, m.size)

    def load(self, ref):
        name, where, size = ref
        _check_ext(name)
        _check_size(size, self.max_bytes)
        if not self.random_access:
            return where, {}
        with open(self.path, "rb") as f:
            f.seek(where)
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


def open_source(spec: str, max_bytes: int = MAX_SAMPLE_BYTES) -> Source:
    """The source a SOURCE argument names: builtin:NAME, an LMDB directory, a folder, a .zip or a tar archive;
    items larger than max_bytes are skipped unread."""
    if spec.startswith(BUILTIN):
        return BuiltinSource(spec[len(BUILTIN):])
    path = Path(spec)
    if not path.exists():
        raise SourceError(f"source {spec} does not exist")
    if path.is_dir():
        if (path / "data.mdb").exists() or path.name.endswith(("_lmdb", ".lmdb")):
            return LmdbSource(path, max_bytes)
        return FolderSource(path, max_bytes)
    if zipfile.is_zipfile(path):
        return ZipSource(path, max_bytes)
    if tarfile.is_tarfile(path):
        return TarSource(path, max_bytes)
    raise SourceError(f"source {spec} is neither a directory, an LMDB, a zip nor a tar archive")
