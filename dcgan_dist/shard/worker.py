"""The per-image work of the shard tool and the process pool that runs it.

A worker turns one input item into zero or more samples (one per face with --faces): load, decode, crop and
resize, encode, and a duplicate key. Results come back in input order whatever the number of workers, which is
what makes the output independent of --workers.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import pickle
import signal
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from ..data import images as imageops
from . import dedup
from .options import Options
from .sources import Source
from .writer import encode_sample

CHUNK = 32  # items per task: enough to amortise inter-process traffic, small enough to keep workers even
_IN_FLIGHT = 4  # tasks queued per worker: bounds memory on a 3-million-image source


@dataclass
class Sample:
    """One output sample, ready for a shard."""

    id: str  # the source id, with "#face<k>" for the k-th face of an image
    tar: bytes  # the sample's tar members, encoded here so that the writing process only joins bytes
    key: bytes | None  # duplicate key (pixel hash or semantic code), None without --dedup


@dataclass
class Result:
    """What became of one input item."""

    pos: int  # position of the item in the processing order
    id: str
    samples: list[Sample] = field(default_factory=list)
    skipped: str | None = None  # why the item was dropped
    thumbs: list[np.ndarray] = field(default_factory=list)  # only for fitting the semantic hash


class Worker:
    """Everything one process needs to turn items into samples."""

    def __init__(self, source: Source, opts: Options, hasher: bytes | None = None):
        self.source, self.opts = source, opts
        self.hasher = dedup.Hasher.from_bytes(hasher) if hasher is not None else None
        self.faces = None
        if opts.faces:
            from .faces import FaceCropper

            self.faces = FaceCropper(opts.min_face, opts.face_margin)

    def _decoded(self, ref: object) -> tuple[np.ndarray, tuple[int, int], dict[str, bytes]]:
        raw, extra = self.source.load(ref)
        if isinstance(raw, np.ndarray):
            arr = imageops.from_array(raw)
            return arr, arr.shape[:2], extra
        # Whole-image resizes may decode a JPEG scaled down, but never below twice the output size: the final
        # Lanczos step then still does the antialiasing.
        whole = self.opts.faces or self.opts.keep_size
        arr, orig = imageops.decode(raw, 0 if whole else 2 * self.opts.resolution, self.opts.max_image_pixels)
        return arr, orig, extra

    def _crops(self, item_id: str, ref: object) -> tuple[list[tuple[str, np.ndarray, dict]], dict[str, bytes]]:
        """(sample id, pixels, JSON metadata) for each sample of an item, and the item's extra fields."""
        arr, orig, extra = self._decoded(ref)
        meta = {"source_id": item_id, "orig_size": list(orig)}
        size = None if self.opts.keep_size else self.opts.resolution
        if self.faces is None:
            pixels = arr if size is None else imageops.centre_square(arr, size)
            return [(item_id, pixels, meta)], extra
        crops = []
        for k, face in enumerate(self.faces.detect(arr)):
            box = self.faces.crop_box(face, *arr.shape[:2])
            pixels = imageops.resize_box(arr, box, size or box[2])
            crops.append((f"{item_id}#face{k}", pixels, {**meta, "face": k, "box": list(face), "crop": list(box)}))
        return crops, extra

    def _key(self, pixels: np.ndarray) -> bytes | None:
        if self.opts.dedup == "exact":
            return dedup.exact_key(pixels)
        if self.opts.dedup == "semantic":
            return self.hasher.codes(dedup.thumb(pixels)[None])[0]
        return None

    def samples(self, pos: int, item_id: str, ref: object) -> Result:
        """The item's samples, or why it was skipped."""
        try:
            crops, extra = self._crops(item_id, ref)
            samples = []
            for k, (sample_id, pixels, meta) in enumerate(crops):
                fields = {self.opts.format: imageops.encode(pixels, self.opts.format, self.opts.quality),
                          "json": json.dumps(meta, sort_keys=True).encode(), **extra}
                # keys follow the input position, so they are known here and unique even with gaps from skips
                tar_key = f"{pos:09d}" if self.faces is None else f"{pos:09d}_{k}"
                samples.append(Sample(sample_id, encode_sample(tar_key, fields), self._key(pixels)))
        except Exception as err:  # decoders raise many types for bad files; each is recorded, never fatal
            return Result(pos, item_id, skipped=imageops.reason(err))
        return Result(pos, item_id, samples)

    def thumbs(self, pos: int, item_id: str, ref: object) -> Result:
        """The item's 32x32 autoencoder inputs, one per sample it would give."""
        try:
            return Result(pos, item_id, thumbs=[dedup.thumb(p) for _, p, _ in self._crops(item_id, ref)[0]])
        except Exception as err:
            return Result(pos, item_id, skipped=imageops.reason(err))


_worker: Worker | None = None
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _end_with(parent: int) -> None:
    """Make this worker process die with the run that started it, so that a killed run leaves no orphans."""
    if sys.platform.startswith("linux"):  # the kernel sends SIGKILL when the parent exits
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect (elsewhere, only this start-up check)
        os._exit(1)


def _start(parent: int, worker_args: bytes) -> None:
    global _worker
    _end_with(parent)
    _worker = Worker(*pickle.loads(worker_args))


def _ready() -> bool:
    return True


def _run(method: str, chunk: list[tuple[int, str, object]]) -> list[Result]:
    return [getattr(_worker, method)(*item) for item in chunk]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


CRASHED = "decoder crashed (its worker process died)"


def _solo(parent: int, method: str, worker_args: tuple, item: tuple, conn) -> None:
    _end_with(parent)
    conn.send(getattr(Worker(*worker_args), method)(*item))
    conn.close()


def _isolated(ctx, method: str, worker_args: tuple, item: tuple) -> Result:
    """One item in a fresh process of its own: its result, or a skip when the process dies on it."""
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_solo, args=(os.getpid(), method, worker_args, item, send), daemon=True)
    proc.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:  # the process died before it could answer
        result = Result(item[0], item[1], skipped=CRASHED)
    proc.join()
    return result


def mapped(method: str, items: Iterable[tuple[int, str, object]], worker_args: tuple,
           workers: int) -> Iterator[Result]:
    """Worker.<method> over (pos, id, ref) items, in order; in this process for one worker, else in a pool.

    In a pool, an input that kills its worker process (a decoder crashing in C) breaks the pool: the chunks in
    flight are then retried item by item, each alone in a fresh process, the killer is skipped with the reason
    CRASHED, and a new pool carries on. Every rerun skips the same input, so the output stays deterministic.
    """
    if workers <= 1:
        worker = Worker(*worker_args)
        yield from (getattr(worker, method)(*item) for item in items)
        return
    # Forked workers start at once; spawned ones would re-import the main module and all it imports first.
    # Workers never call into torch, so its threads here are no hazard: the same reasoning as PyTorch's own
    # DataLoader. The arguments go pickled so each worker opens its own handles.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")

    def new_pool() -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(workers, ctx, initializer=_start,
                                   initargs=(os.getpid(), pickle.dumps(worker_args)))
        for ready in [pool.submit(_ready) for _ in range(workers)]:  # all forked before the next item is drawn
            ready.result()
        return pool

    pool = new_pool()
    pending: deque = deque()  # (chunk, future), in input order

    def next_results() -> list[Result]:
        nonlocal pool
        chunk, future = pending.popleft()
        try:
            return future.result()
        except BrokenProcessPool:
            backlog = [chunk] + [c for c, _ in pending]
            done = [f.result() if f.done() and f.exception() is None else None for _, f in pending]
            pending.clear()
            pool.shutdown(wait=True, cancel_futures=True)
            results = [_isolated(ctx, method, worker_args, item) for item in chunk]
            for c, ok in zip(backlog[1:], done):
                results += ok if ok is not None else [_isolated(ctx, method, worker_args, item) for item in c]
            pool = new_pool()
            return results

    try:
        for chunk in _chunks(items, CHUNK):
            pending.append((chunk, pool.submit(_run, method, chunk)))
            if len(pending) >= _IN_FLIGHT * workers:
                yield from next_results()
        while pending:
            yield from next_results()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
