"""Streaming tar shards into uint8 image batches: deterministic, resumable, split across ranks and loader workers.

The stream is endless and cut into passes of a fixed number of steps, identical on every rank, so no rank ever
waits in a collective for another. Batch i of a pass always holds the same images whatever the number of restarts:
pass p is made of `data.loader_workers` virtual streams, each seeded by (seed, p, rank, stream), and batch i comes from
stream i % loader_workers. A resumed run maps its loader workers onto those streams and fast-forwards, so a killed
and resumed run sees exactly the batches an uninterrupted one would have.

Batches are uint8 (N, H, W, C), as decoders produce them; the transposition and the conversion to floats in
[-1, 1] happen on the training device (pixels.from_uint8), which keeps loader-to-trainer traffic four times smaller
and spares the loader workers a copy. NHWC is channels_last: on a GPU that path needs no transposing copy at all.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import Config
from . import heap, storage
from .images import decode_image, image_field, raw_prefix
from .shardset import ShardSet

_MAX_REPORTED = 20  # corrupt samples named on stderr per worker; the rest are only counted
_MAX_UNDECODED = 2000  # samples in a row that fail to decode, before any ever did, that stop the run


class DataError(RuntimeError):
    """Shards that cannot feed training at all (nothing decodes); the message names shards and reasons."""


@dataclass
class _Tally:
    """What one iterator over the stream has met besides images, handed explicitly to the steps that count it."""
    give_up_after: int  # corrupt samples, before any sample decoded, that stop the run
    corrupt: int = 0  # samples that failed to decode, in all
    decoded: bool = False  # whether any sample has decoded yet
    reasons: list[str] = field(default_factory=list)  # the first decode errors, for DataError's message
    bad_shards: int = 0  # shard reads that failed while the current batch was filled
    failed_reads: int = 0  # shard reads in a row, in this pass, that gave no sample


class ShardStream(IterableDataset):
    """Endless batches for one rank: (uint8 images, corrupt samples skipped, shards skipped since the last)."""

    def __init__(self, shards: ShardSet, cfg: Config, rank: int, world_size: int,
                 start: "StreamPosition | None" = None):
        self.shards = shards
        self.rank, self.world_size = rank, world_size
        self.batch_size = cfg.train.batch_size
        self.resolution, self.channels = cfg.model.resolution, cfg.model.channels
        self.buffer_size = cfg.data.shuffle_buffer
        self.resample = cfg.data.resample
        self.seed = cfg.train.seed
        self.read_options = {"retries": cfg.data.read_retries, "backoff": cfg.data.retry_backoff,
                             "timeout": cfg.data.io_timeout, "max_bytes": cfg.data.max_sample_bytes}
        self.max_pixels = cfg.data.max_image_pixels
        self.streams = max(1, cfg.data.loader_workers)
        self.steps_per_pass = steps_per_pass(shards, cfg, world_size)
        start = start or StreamPosition(self.steps_per_pass, self.streams, self.batch_size)
        self.start_step = start.data_step
        # Raw samples each virtual stream has taken in the start pass: resume without decoding them.
        self.start_consumed = start.consumed

    # -- which samples a virtual stream reads in one pass ---------------------------------------------------
    def _rounds(self, pass_idx: int, stream: int, rng: random.Random
                ) -> Iterator[Iterator[tuple[str, int, int | None]]]:
        """Rounds of (url, first, stop) to read: samples first <= j < stop of the url (stop None: to its end).

        Resampling is one endless round of shards drawn with replacement. Without it, a slot (rank, stream) owns
        a disjoint share of the pass's shard order (or, with fewer shards than slots, a contiguous range of the
        pass's samples counted across shard boundaries, so slots differ by at most one sample and each reads only
        the one or two shards its range touches), and reads it again in a new round only if corrupt samples left
        it short.
        """
        urls = self.shards.urls
        if self.resample:
            yield ((rng.choice(urls), 0, None) for _ in itertools.count())
            return
        nslots = self.world_size * self.streams
        slot = self.rank * self.streams + stream
        order = list(range(len(urls)))
        random.Random(f"order-{self.seed}-{pass_idx}").shuffle(order)  # the same on every rank
        if len(urls) >= nslots:
            mine = [(urls[i], 0, None) for i in order[slot::nslots]]
        else:
            total = sum(self.shards.counts)
            lo, hi = slot * total // nslots, (slot + 1) * total // nslots
            starts = list(itertools.accumulate((self.shards.counts[i] for i in order), initial=0))
            mine = [(urls[i], max(lo - a, 0), min(hi, b) - a) for i, a, b in zip(order, starts, starts[1:])
                    if a < hi and b > lo]
        while True:
            yield iter(mine)

    def _read(self, sources: Iterator[tuple[str, int, int | None]], tally: _Tally) -> Iterator[dict]:
        for url, first, stop in sources:
            got = False
            try:
                samples = itertools.islice(storage.tar_samples(url, **self.read_options), first, stop)
                sample = next(samples, None)
                if sample is not None:
                    got = True
                    yield sample
                    yield from samples  # delegated in C: no Python loop of ours per sample
            except Exception as err:  # missing, unreadable, truncated or still failing after retries: counted
                tally.bad_shards += 1
                print(f"dcgan_dist.data: skipping shard {url}: {type(err).__name__}: {err}", file=sys.stderr)
            tally.failed_reads = 0 if got else tally.failed_reads + 1
            if tally.failed_reads > 2 * len(self.shards.urls) + 8:
                raise RuntimeError(f"no readable sample in {tally.failed_reads} shard reads in a row; shards: "
                                   f"{self.shards.urls[0]} ... ({len(self.shards.urls)} in all)")

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < self.buffer_size:
                buffer.append(sample)
                continue
            k = rng.randrange(len(buffer))
            buffer[k], sample = sample, buffer[k]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _skip(self, sample: dict, err: Exception, tally: _Tally) -> None:
        """Count a sample that failed to decode, name it (the first few), and stop if nothing ever decodes."""
        tally.corrupt += 1
        if len(tally.reasons) < 3:
            tally.reasons.append(f"{sample.get('__url__')} {sample.get('__key__')!r}: {err}")
        if not tally.decoded and tally.corrupt >= tally.give_up_after:
            raise DataError(f"none of the first {tally.corrupt} samples decoded (shards {self.shards.urls[0]} ... "
                            f"{len(self.shards.urls)} in all); first reasons: " + "; ".join(tally.reasons))
        if tally.corrupt <= _MAX_REPORTED:
            print(f"dcgan_dist.data: skipping sample {sample.get('__key__')!r} in {sample.get('__url__')}: "
                  f"{type(err).__name__}: {err}", file=sys.stderr)

    def _samples(self, pass_idx: int, stream: int, rng: random.Random, tally: _Tally) -> Iterator[dict]:
        tally.failed_reads = 0  # a new pass
        for sources in self._rounds(pass_idx, stream, rng):
            yield from self._shuffled(self._read(sources, tally), rng)

    def _pass_batches(self, pass_idx: int, stream: int, tally: _Tally, done: int = 0, raw_done: int | None = None,
                      ) -> Iterator[tuple[torch.Tensor, int, int]]:
        """The stream's batches of a pass from its batch `done` on. raw_done, when known, is how many raw samples
        batches 0 .. done-1 took (their images plus corrupt ones): those are passed over without decoding."""
        rng = random.Random(f"stream-{self.seed}-{pass_idx}-{self.rank}-{stream}")
        samples = self._samples(pass_idx, stream, rng, tally)
        batches = self.steps_per_pass // self.streams
        if raw_done is None:  # decode and drop the first `done` batches
            yield from itertools.islice(self._batches(samples, batches, tally), done, None)
            return
        for _ in range(raw_done):
            next(samples)
        yield from self._batches(samples, batches - done, tally)

    def _batches(self, samples: Iterator[dict], count: int, tally: _Tally,
                 ) -> Iterator[tuple[torch.Tensor, int, int]]:
        """count batches of the samples' images, each with the corrupt samples it skipped and the shards that
        failed while it was filled. Raw samples already at the batch's shape go in as bytes, without decoding."""
        prefix = raw_prefix(self.resolution, self.channels)
        size = self.resolution ** 2 * self.channels
        start, raw_size = len(prefix), len(prefix) + size
        shape = (self.batch_size, self.resolution, self.resolution, self.channels)
        for _ in range(count):
            # Each image is copied once, into its batch (no np.stack of per-image arrays); raw pixels through a
            # flat view of the batch.
            batch, filled, skipped = np.empty(shape, np.uint8), 0, 0
            flat = memoryview(batch).cast("B")
            tally.bad_shards = 0
            while filled < self.batch_size:
                sample = next(samples)
                try:
                    data = image_field(sample)
                    if len(data) == raw_size and data.startswith(prefix):
                        flat[filled * size:(filled + 1) * size] = memoryview(data)[start:]
                    else:
                        batch[filled] = decode_image(data, self.resolution, self.channels, self.max_pixels)
                except Exception as err:
                    self._skip(sample, err, tally)
                    skipped += 1
                    continue
                tally.decoded = True
                filled += 1
            yield torch.from_numpy(batch), skipped, tally.bad_shards  # NHWC: no transposing copy

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.streams:
            raise RuntimeError(f"ShardStream was built for {self.streams} loader workers, runs with {workers}")
        heap.keep_freed_memory()  # in the loader worker (or the trainer, without workers): see data/heap.py
        # Twice the data set (every sample seen at least once, whatever the draws) or _MAX_UNDECODED, if fewer.
        size = self.shards.size
        tally = _Tally(give_up_after=min(_MAX_UNDECODED, 2 * size) if size else _MAX_UNDECODED)
        first_pass, offset = divmod(self.start_step, self.steps_per_pass)
        stream, done = serving(offset, worker, self.streams)
        raw_done = self.start_consumed[stream] if self.start_consumed is not None else None
        yield from self._pass_batches(first_pass, stream, tally, done, raw_done)
        for pass_idx in range(first_pass + 1, sys.maxsize):
            yield from self._pass_batches(pass_idx, stream, tally)


def dataset_size(shards: ShardSet, cfg: Config) -> int | None:
    """Images in the data set: data.size when set, else the shards' counts (manifest or tar headers)."""
    return cfg.data.size or shards.size


def steps_per_pass(shards: ShardSet, cfg: Config, world_size: int) -> int:
    """Steps each rank takes per pass: about one epoch of the data set, a multiple of the loader workers."""
    streams = max(1, cfg.data.loader_workers)
    batch = cfg.train.batch_size
    if not cfg.data.resample:
        if shards.counts is None:
            raise ValueError("data.resample=false needs per-shard counts: remote shards need a manifest.json")
        nslots = world_size * streams
        if len(shards.urls) >= nslots:
            # Any pass's order may give a slot the smallest shards: size the pass for that worst case.
            per_slot = sum(sorted(shards.counts)[:len(shards.urls) // nslots])
        else:
            per_slot = sum(shards.counts) // nslots
        per_stream_batches = per_slot // batch
        if per_stream_batches == 0:
            raise ValueError(f"data.resample=false: a loader slot holds only {per_slot} samples, fewer than "
                             f"train.batch_size={batch}; use fewer ranks/workers or a smaller batch")
        return per_stream_batches * streams
    size = dataset_size(shards, cfg)
    if size == 0:
        raise ValueError(f"data.shards: the {len(shards.urls)} shards hold no sample that can be read")
    if not size:
        raise ValueError("data.shards names remote shards without a manifest.json, so the data set's size is "
                         "unknown: write one with `python -m dcgan_dist.shard index PREFIX`, or set data.size")
    steps = max(1, math.ceil(size / (batch * world_size)))
    return math.ceil(steps / streams) * streams


def make_loader(shards: ShardSet, cfg: Config, rank: int, world_size: int, pin_memory: bool,
                start: "StreamPosition | None" = None, worker_init_fn=None) -> DataLoader:
    """The DataLoader over a rank's ShardStream from `start` (None: the beginning); batching happens inside the
    workers."""
    stream = ShardStream(shards, cfg, rank, world_size, start)
    workers = cfg.data.loader_workers
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=cfg.data.prefetch if workers else None,
                      persistent_workers=False, worker_init_fn=worker_init_fn if workers else None)


def serving(offset: int, worker: int, streams: int) -> tuple[int, int]:
    """(virtual stream, batches of it already taken) that loader worker `worker` serves after a start at in-pass
    offset `offset`: stream (offset + worker) % streams from its ((offset + worker) // streams)-th batch on. Pass
    lengths are multiples of `streams`, so a worker keeps its stream from pass to pass."""
    return (offset + worker) % streams, (offset + worker) // streams


class StreamPosition:
    """Where a rank's data stream stands: the one record of it that the stream starts from (ShardStream), the loop
    advances (took) and the checkpoint keeps (record, from_record).

    data_step: batches this rank has taken since the run began, in steps of the current geometry (pass
    data_step // spp, in-pass offset data_step % spp). consumed: per virtual stream, the raw samples (images and
    corrupt ones) its batches took in the current pass, so that a resume passes over them undecoded; None when
    unknown (a checkpoint from before, or a resumed geometry change: the pass's prefix is then decoded and
    dropped). On disk unknown is [], and record()/from_record() are the one conversion.

    Which stream a batch came from: after a start at offset o, loader worker w serves stream (o + w) % streams
    (serving), and the DataLoader hands out its workers' batches in turn, batch j from worker j % workers
    (tests/test_data.py fails if torch changes that), so batch data_step came from stream data_step % streams.
    """

    def __init__(self, spp: int, streams: int, batch: int, data_step: int = 0, consumed: list[int] | None = None):
        self.spp, self.streams, self.batch, self.data_step = spp, streams, batch, data_step
        known = consumed is not None and len(consumed) == streams
        self.consumed = list(consumed) if known else None
        if data_step % spp == 0:  # at a pass's start nothing of it was taken
            self.consumed = [0] * streams

    @classmethod
    def at(cls, shards: ShardSet, cfg: Config, world_size: int, data_step: int = 0,
           consumed: list[int] | None = None) -> "StreamPosition":
        return cls(steps_per_pass(shards, cfg, world_size), max(1, cfg.data.loader_workers), cfg.train.batch_size,
                   data_step, consumed)

    def took(self, corrupt: int) -> None:
        """The next batch arrived, with `corrupt` samples passed over in it."""
        offset = self.data_step % self.spp
        if offset == 0:
            self.consumed = [0] * self.streams
        if self.consumed is not None:
            self.consumed[offset % self.streams] += self.batch + corrupt
        self.data_step += 1

    def record(self) -> list[int]:
        """`consumed` as a checkpoint keeps it: [] when unknown."""
        return list(self.consumed or [])

    @staticmethod
    def from_record(saved: list) -> list[int] | None:
        return list(saved) or None
