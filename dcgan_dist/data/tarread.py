"""Reading tar shards into WebDataset-style samples, several times faster than the tarfile module (docs/loader.md).

The trainer's loader workers spend most of their time here, so this parses the 512-byte headers directly:
regular files, GNU long names ('L') and pax path records ('x'); other member types are passed over. Header
checksums are verified, so a damaged shard is an error rather than garbage. Samples group consecutive members
by key, as WebDataset does: the key is the path up to the first dot of the file name, the field the rest.

A shard is someone else's file: a size no tar can hold (negative, or past the end of the file) is an error naming
the member, and a sample larger than max_bytes is passed over unread and given with only SKIPPED, saying why, so
the loader counts it as it counts a sample that fails to decode.
"""

from __future__ import annotations

import zlib
from typing import BinaryIO, Iterator

from ..limits import MAX_SAMPLE_BYTES

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_KEPT = (*_REGULAR, b"L", b"x")  # members whose bytes are read; others (folders, links, ...) are passed over
_CHUNK = 1 << 20  # bytes read at a time while passing over a member
SKIPPED = "__skipped__"  # the field of a sample passed over unread: why


class TarError(ValueError):
    """A truncated or damaged tar stream."""


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for values that do not fit in octal
        return int.from_bytes(field[1:], "big", signed=field[:1] == b"\xff")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _checksum_ok(header: bytes) -> bool:
    """The header's byte sum, with its checksum field counted as eight spaces, equals the recorded checksum.

    zlib's adler32 sums the bytes in C, far faster than Python's sum() (docs/loader.md). Its low half is
    (1 + sum) mod 65521, and a header's sum lies in 0 .. 130,560, so a wrong sum can only pass when it is off by
    exactly 65,521: at least 257 bytes changed, each by 255.
    """
    field = header[148:156]
    expected = _octal(field) + sum(field) - 256
    return (zlib.adler32(header) & 0xFFFF) == (1 + expected) % 65521


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").split("\n"):
        _, _, kv = record.partition(" ")
        key, _, value = kv.partition("=")
        if key == "path":
            return value
    return None


def _name(header: bytes, long_name: str | None) -> str:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX ustar's name prefix
        name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
    return long_name or name


def _pass_over(stream: BinaryIO, size: int, name: str) -> None:
    """Read and drop a member's bytes a chunk at a time: memory stays bounded whatever size its header declares,
    and time is bounded by the bytes really there."""
    left = size + -size % BLOCK
    while left:
        got = len(stream.read(min(left, _CHUNK)))
        if not got:
            raise TarError(f"tar member {name!r} declares {size:,} bytes, but the shard ends before them")
        left -= got


def members(stream: BinaryIO, skip_data: bool = False, max_size: int = MAX_SAMPLE_BYTES,
            ) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) of every regular file in a tar stream, in order; (name, None) for one larger than max_size,
    passed over unread. With skip_data, (name, b"") from a seekable file, seeking over the contents (what
    counting needs)."""
    long_name = None
    if skip_data:  # where the file ends: no member may claim bytes beyond it
        start = stream.tell()
        end = stream.seek(0, 2)
        stream.seek(start)
    while True:
        header = stream.read(BLOCK)
        if header == _ZERO_BLOCK:
            return  # the end-of-archive marker
        if len(header) < BLOCK:
            raise TarError(f"truncated tar header ({len(header)} bytes)")
        if not _checksum_ok(header):
            raise TarError("tar header checksum mismatch (damaged shard)")
        size = _octal(header[124:136])
        kind = header[156:157]
        if size < 0:  # GNU base-256 can say so: seeking back by it would read this header again, for ever
            raise TarError(f"tar member {_name(header, long_name)!r} declares a negative size ({size:,} bytes)")
        if skip_data and kind in _REGULAR:
            data = b""
            if stream.tell() + size > end:
                raise TarError(f"tar member {_name(header, long_name)!r} declares {size:,} bytes, more than the "
                               f"{end - stream.tell():,} left in the file")
            stream.seek(size + -size % BLOCK, 1)
        elif size > max_size or kind not in _KEPT:
            data = None
            _pass_over(stream, size, _name(header, long_name))
        else:
            # The contents, then the padding apart: cutting the padding off one read would copy the contents
            # again, which for a raw sample costs more than the second read call.
            data = stream.read(size)
            if len(data) < size:
                raise TarError(f"truncated tar member {_name(header, long_name)!r}: {len(data)} of {size} bytes")
            pad = -size % BLOCK
            if pad and len(stream.read(pad)) < pad:
                raise TarError(f"truncated tar member {_name(header, long_name)!r}: its padding")
        if kind in _REGULAR:
            yield _name(header, long_name), data
            long_name = None
        elif data is None:
            long_name = None
        elif kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
        else:  # b"x"
            long_name = _pax_path(data) or long_name


def _key_and_field(name: str) -> tuple[str, str] | None:
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return None if dot < 0 else (name[:dot], name[dot + 1:].lower())


def count_samples(path: str) -> int:
    """Samples in a local tar shard, from its headers alone (no member is read); TarError names the file."""
    count, last = 0, None
    with open(path, "rb") as f:
        try:
            for name, _ in members(f, skip_data=True):
                split = _key_and_field(name)
                if split is not None and split[0] != last:
                    count, last = count + 1, split[0]
        except ValueError as err:  # TarError, or a mangled number field
            raise TarError(f"{path}: {err}") from None
    return count


def samples(stream: BinaryIO, url: str, max_bytes: int = MAX_SAMPLE_BYTES) -> Iterator[dict]:
    """Samples {'__key__', '__url__', field: bytes} grouped from consecutive members with the same key; a sample
    whose members hold more than max_bytes comes as {'__key__', '__url__', SKIPPED: why}, its bytes dropped."""
    current: dict | None = None
    held = 0  # bytes of the current sample's members
    for name, data in members(stream, max_size=max_bytes):
        split = _key_and_field(name)
        if split is None:
            continue  # a member without a field extension belongs to no sample
        key, field = split
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current, held = {"__key__": key, "__url__": url}, 0
        if data is not None and (held := held + len(data)) <= max_bytes:
            current[field] = data
        elif SKIPPED not in current:  # its bytes dropped; what follows of it is passed over too
            held = max_bytes + 1
            current = {"__key__": key, "__url__": url, SKIPPED: f"sample larger than the limit of {max_bytes:,} "
                       f"bytes (data.max_sample_bytes) at member {name!r}: not read"}
    if current is not None:
        yield current
