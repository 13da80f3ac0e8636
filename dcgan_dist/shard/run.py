"""One run of the shard tool: a source into WebDataset tar shards (cli.py says what goes in them).

Restarts: after each shard, .progress/<shard>.json records where the input stands, what was skipped and which
duplicate keys were kept. A rerun with the same arguments keeps the recorded shards and carries on from there, so
its output equals an uninterrupted run's. The manifest is written last, and .progress goes with it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .. import files
from ..data import storage
from ..data.manifest import MANIFEST, ShardInfo
from . import dedup, sources
from . import worker as shard_worker
from .options import Options
from .output import LocalDir, open_output
from .writer import safe_key, shard_name

PROGRESS = ".progress"
_RUN = f"{PROGRESS}/run.json"
HASHER = "dedup-hasher.npy"
DUPLICATES = "duplicates.tsv"


class ShardError(Exception):
    """A run that cannot start or produced nothing: a clear message and a non-zero exit."""


def _json(data) -> bytes:
    return json.dumps(data, sort_keys=True).encode()


def _items(source: sources.Source, shuffle: int | None, start: int) -> Iterator[tuple[int, str, object]]:
    """(position, id, ref) in processing order, from position start on."""
    if shuffle is None:
        return ((pos, *ref) for pos, ref in enumerate(itertools.islice(source.refs(), start, None), start))
    if not source.random_access:
        raise ShardError(f"--shuffle needs to read the source in any order, which a compressed tar cannot do; "
                         f"decompress {getattr(source, 'path', source.name)} first")
    refs = list(source.refs())
    order = np.random.default_rng(shuffle).permutation(len(refs))
    return ((pos, *refs[order[pos]]) for pos in range(start, len(refs)))


class _Run:
    """One run's state: the committed shards with all that was recorded alongside, and the shard being filled."""

    def __init__(self, out: LocalDir, opts: Options):
        self.out, self.opts = out, opts
        radius = opts.dedup_radius if opts.dedup == "semantic" else 0
        self.index = None if opts.dedup == "none" else dedup.Index(radius)
        self.shards: list[ShardInfo] = []
        self.skipped: list[dict] = []  # {"id", "reason"}
        self.duplicates: list[list[str]] = []  # [removed id, kept id]
        self.no_face = 0
        self.written = 0  # samples in committed shards
        self.start = (0, 0)  # where this process starts: (item position, samples of that item already written)
        self.buffer: list[bytes] = []  # encoded samples of the shard being filled
        self.kept: list[list[str]] = []  # [duplicate key in hex, sample id] for the buffer's samples
        self.marks = (0, 0, 0)  # len(skipped), len(duplicates), no_face at the last commit

    def resume(self) -> None:
        """Take over the shards a killed run with the same arguments committed."""
        while True:
            name = shard_name(self.opts.prefix, len(self.shards))
            raw = self.out.read_bytes(f"{PROGRESS}/{name}.json")
            if raw is None:
                break
            record = json.loads(raw)
            info = ShardInfo(**record["shard"])
            if self.out.size(name) != info.bytes:  # the record is written after the shard: only a hand could do this
                break
            self.shards.append(info)
            self.written += info.count
            self.skipped += record["skipped"]
            self.duplicates += record["duplicates"]
            self.no_face += record["no_face"]
            for key, sample_id in record["kept"]:
                self.index.add(bytes.fromhex(key), sample_id)
            self.start = tuple(record["next"])
        self.marks = (len(self.skipped), len(self.duplicates), self.no_face)

    def add(self, result: shard_worker.Result) -> None:
        """Record one item's outcome; write a shard whenever one is full."""
        if result.skipped is not None:
            self.skipped.append({"id": result.id, "reason": result.skipped})
            return
        if not result.samples:
            self.no_face += 1
            return
        first = self.start[1] if result.pos == self.start[0] else 0
        for j in range(first, len(result.samples)):
            sample = result.samples[j]
            if self.index is not None:
                kept_id = self.index.add(sample.key, sample.id)
                if kept_id is not None:
                    self.duplicates.append([sample.id, kept_id])
                    continue
                self.kept.append([sample.key.hex(), sample.id])
            self.buffer.append(sample.tar)
            if len(self.buffer) == self.opts.shard_size:
                more = j + 1 < len(result.samples)
                self.commit((result.pos, j + 1) if more else (result.pos + 1, 0))

    def commit(self, after: tuple[int, int]) -> None:
        """Write the buffer as the next shard, then its progress record: the record is what makes it count."""
        name = shard_name(self.opts.prefix, len(self.shards))
        info = self.out.write_shard(name, self.buffer)
        skipped, duplicates, no_face = self.marks
        self.out.write_bytes(f"{PROGRESS}/{name}.json", _json({
            "shard": asdict(info), "next": list(after), "skipped": self.skipped[skipped:],
            "duplicates": self.duplicates[duplicates:], "no_face": self.no_face - no_face, "kept": self.kept}))
        self.shards.append(info)
        self.written += info.count
        self.buffer, self.kept = [], []
        self.marks = (len(self.skipped), len(self.duplicates), self.no_face)

    def why_empty(self, inputs: int) -> str:
        """The error message of a run that wrote nothing: where the inputs went."""
        reasons = Counter(s["reason"] for s in self.skipped).most_common(3)
        said = "; ".join(f"{n} x {r}" for r, n in reasons)
        return (f"no sample to write: of {inputs} inputs, {len(self.skipped)} were skipped" + (f" ({said})" if said
                else "") + f", {self.no_face} had no face and {len(self.duplicates)} were duplicates")


def _hasher(out: LocalDir, source: sources.Source, opts: Options, workers: int, progress: bool) -> bytes:
    """The semantic hash: fitted on the first --dedup-fit images, or read back when resuming."""
    saved = out.read_bytes(HASHER)
    if saved is not None:
        return saved
    items = itertools.islice(_items(source, opts.shuffle, 0), opts.dedup_fit)
    results = shard_worker.mapped("thumbs", items, (source, opts), workers)
    thumbs = [t for r in tqdm(results, total=min(len(source), opts.dedup_fit), unit="img", desc="hash inputs",
                              disable=not progress) for t in r.thumbs]
    if not thumbs:
        raise ShardError(f"no readable image among the first {opts.dedup_fit} inputs to fit the semantic hash on")
    if progress:
        print(f"dcgan_dist.shard: fitting the semantic hash on {len(thumbs)} images", file=sys.stderr)
    params = dedup.fit(np.stack(thumbs)).to_bytes()
    out.write_bytes(HASHER, params)
    return params


def _claim(out: LocalDir, identity: dict) -> dict | None:
    """The finished manifest when OUTDIR already holds this very run; an error when it holds another one."""
    for name in (MANIFEST, _RUN):
        raw = out.read_bytes(name)
        if raw is None:
            continue
        found = json.loads(raw)
        fingerprint = found.get("source_fingerprint")
        same_source = found.get("source") == identity["source"]
        if fingerprint is not None and same_source and fingerprint != identity["fingerprint"]:
            state = "a finished run" if name == MANIFEST else "an unfinished run"
            raise ShardError(f"the source {identity['source']} changed since {state} in {out} read it (its listing "
                             f"of names and sizes differs), so input positions would shift: restore the source, "
                             f"or choose another OUTDIR")
        found = {"source": found.get("source"), "options": found.get("options")}
        if found != {k: identity[k] for k in ("source", "options")}:
            differ = [k for k in identity["options"] if found["options"] and found["options"].get(k) !=
                      identity["options"][k]]
            what = "source" if found["source"] != identity["source"] else "options " + ", ".join(differ)
            state = "a finished" if name == MANIFEST else "an unfinished"
            raise ShardError(f"{out} holds {state} run with another {what}; rerun with the same arguments or "
                             f"choose another OUTDIR")
        if name == MANIFEST:
            out.remove(PROGRESS)  # left behind if a run was killed right after its manifest
            return json.loads(raw)
    out.write_bytes(_RUN, _json({"source": identity["source"], "options": identity["options"],
                                 "source_fingerprint": identity["fingerprint"]}))
    return None


def run(source_spec: str, outdir: str | Path, opts: Options = Options(), workers: int = 1,
        progress: bool = True) -> dict:
    """Shard a source into outdir and return the manifest; a killed run restarted the same way resumes."""
    source = sources.open_source(source_spec, opts.max_file_bytes)
    if len(source) == 0:
        raise ShardError(f"source {source_spec} holds no file")
    opts = replace(opts, prefix=opts.prefix or safe_key(source.name))
    if not storage.is_remote(str(outdir)) and Path(outdir).exists() and not Path(outdir).is_dir():
        raise ShardError(f"OUTDIR {outdir} is a file, not a directory: name a new or existing folder")
    try:
        out = open_output(outdir)
    except (OSError, ValueError) as err:
        raise ShardError(f"cannot write to OUTDIR {outdir}: {err}") from None
    identity = {"source": source_spec, "options": asdict(opts), "fingerprint": source.fingerprint()}
    try:
        with out.lock():
            return _shard(source, source_spec, out, opts, identity, workers, progress)
    except files.Busy as err:
        raise ShardError(str(err)) from None


def _shard(source: sources.Source, source_spec: str, out: LocalDir, opts: Options, identity: dict, workers: int,
           progress: bool) -> dict:
    finished = _claim(out, identity)
    if finished is not None:
        return finished
    out.remove_temporaries()
    hasher = _hasher(out, source, opts, workers, progress) if opts.dedup == "semantic" else None
    state = _Run(out, opts)
    state.resume()
    items = _items(source, opts.shuffle, state.start[0])
    with tqdm(total=len(source), initial=state.start[0], unit="img", desc=f"shard {source.name}",
              disable=not progress, smoothing=0.05) as bar:
        for result in shard_worker.mapped("samples", items, (source, opts, hasher), workers):
            state.add(result)
            bar.update()
    if state.buffer:
        state.commit((len(source), 0))
    if not state.shards:
        for name in (PROGRESS, HASHER):
            out.remove(name)
        raise ShardError(state.why_empty(len(source)))
    extra = {"source_fingerprint": identity["fingerprint"]}
    if opts.dedup != "none":
        out.write_bytes(DUPLICATES, "".join(f"{a}\t{b}\n" for a, b in [["removed", "kept"], *state.duplicates])
                        .encode())
        extra["duplicates_file"] = DUPLICATES
    if hasher is not None:
        extra["dedup_hasher"] = {"file": HASHER, "sha256": hashlib.sha256(hasher).hexdigest()}
    manifest = out.write_manifest(
        state.shards, source_spec, asdict(opts), tool="dcgan_dist.shard",
        counts={"inputs": len(source), "skipped": len(state.skipped), "duplicates": len(state.duplicates),
                "no_face": state.no_face, "samples": state.written},
        skipped=state.skipped, **extra)
    out.remove(PROGRESS)
    return manifest


# How a built-in set (builtin.py) is written, by the trainer (data.builtin) and by `python -m dcgan_dist.shard
# builtin:NAME OUTDIR` alike: images at their own size as lossless PNG, labels as `cls`, 500 a shard, in an order
# shuffled with seed 0 so every shard is mixed. One set of options, so either may write shards/mnist5k first.
BUILTIN_OPTIONS = {"keep_size": True, "format": "png", "shard_size": 500, "shuffle": 0}


def builtin_shards(name: str, outdir: str | Path) -> Path:
    """Write a built-in set as shards + manifest under outdir (BUILTIN_OPTIONS) unless a manifest is there."""
    outdir = Path(outdir)
    if not (outdir / MANIFEST).exists():
        run(f"{sources.BUILTIN}{name}", outdir, Options(**BUILTIN_OPTIONS), workers=1, progress=False)
    return outdir
