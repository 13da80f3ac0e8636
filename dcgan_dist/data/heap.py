"""Keeping a loader process's freed memory for reuse instead of handing it back to the kernel after every batch.

A loader allocates the same sizes over and over: a sample's bytes (12 kB for a 64 px raw sample), its decoded
pixels, a batch (1.5 MB at 64 px x 128). glibc hands freed memory at the top of its heap back to the kernel and
puts large blocks in their own mmaps, so the next batch page-faults on every 4 kB it touches. Allocations up to
32 MiB (glibc's ceiling for this setting) therefore stay on the heap, and the heap keeps up to 512 MiB of free
memory at its top (the faults and speed it saves: docs/loader.md). A loader's working set is steady, so this costs
no memory beyond its high-water mark. Settings a user made through glibc's own MALLOC_*_ variables or tunables are
kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 512 << 20
_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
_done = False


def _user_settings() -> bool:
    return any(name in os.environ for name in _ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory() -> bool:
    """Tune this process's allocator once (glibc on Linux; elsewhere nothing happens). True when it was tuned."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or _user_settings():
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries without mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
