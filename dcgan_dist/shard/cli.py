"""`python -m dcgan_dist.shard SOURCE OUTDIR`: LSUN, face sets and image folders into WebDataset tar shards.

Output: OUTDIR/{prefix}-000000.tar ... of --shard-size samples each (an image field, a `json` field with the source
id, the original size and any face box, and `cls` where the source has labels); manifest.json with every shard's
count, bytes and sha256, the total, the source, the options, the tool version and every skipped input with its
reason; with --dedup, duplicates.tsv (removed id, id of the kept copy). The same input and options give the same
bytes whatever --workers is. A killed run restarted with the same arguments resumes (shard/run.py).

Also: `python -m dcgan_dist.shard index DIR_OR_PREFIX` writes manifest.json for shards made by other tools, and
`python -m dcgan_dist.shard verify DIR_OR_PREFIX` checks every shard against its manifest (shard/index.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from ..data.images import FORMATS
from . import index, sources
from .options import DEDUP_MODES, Options
from .run import BUILTIN_OPTIONS, ShardError, run


def _parser() -> argparse.ArgumentParser:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m dcgan_dist.shard", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="an LSUN LMDB directory (e.g. bedroom_train_lmdb), an image folder (searched "
                   "recursively for jpg, jpeg, png, webp, bmp), a zip or tar archive, or builtin:mnist5k / "
                   "builtin:lfw-faces")
    p.add_argument("outdir", help="where shards, manifest.json and progress records go: a local directory or a "
                   "bucket prefix such as s3://bucket/prefix (credentials from the environment or ~/.aws)")
    # resolution, keep-size, format, shard-size and shuffle are absent unless given (SUPPRESS): _options fills in
    # what the command line leaves out, for a builtin: source from BUILTIN_OPTIONS.
    builtin = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in BUILTIN_OPTIONS.items())
    p.add_argument("--resolution", type=int, default=argparse.SUPPRESS,
                   help=f"output side: centre crop, then antialiased (Lanczos) resize (default: {d.resolution}; a "
                        f"builtin: source keeps its images' own size)")
    p.add_argument("--keep-size", action="store_true", default=argparse.SUPPRESS,
                   help="keep each image whole at its own size instead")
    p.add_argument("--format", default=argparse.SUPPRESS, choices=FORMATS,
                   help=f"image encoding in the shards: raw stores uint8 pixels (nothing to decode: the fastest for "
                        f"the loader; lossless: right for FID) (default: {d.format}; builtin: sources are written as "
                        f"the trainer writes them: {builtin})")
    p.add_argument("--quality", type=int, default=d.quality, help="JPEG / WebP quality, 1-100")
    p.add_argument("--shard-size", type=int, default=argparse.SUPPRESS,
                   help=f"samples per shard (default: {d.shard_size})")
    p.add_argument("--prefix", default=d.prefix, help="shard file prefix (default: the source's name)")
    p.add_argument("--shuffle", type=int, default=argparse.SUPPRESS, metavar="SEED",
                   help="spread images across shards by a permutation with this seed (default: source order)")
    p.add_argument("--faces", action="store_true", help="the paper's face pipeline: one square crop per face "
                   "found by OpenCV's Haar cascade, the box recorded in the sample's json")
    p.add_argument("--min-face", type=int, default=d.min_face, help="smallest face kept, in source pixels")
    p.add_argument("--face-margin", type=float, default=d.face_margin,
                   help="crop margin on each side of a face box, as a fraction of the box")
    p.add_argument("--dedup", default=d.dedup, choices=DEDUP_MODES, help="drop exact duplicates (same pixels) "
                   "or near-duplicates (the paper's semantic autoencoder hash); removed ids go to duplicates.tsv")
    p.add_argument("--dedup-fit", type=int, default=d.dedup_fit,
                   help="semantic: fit the autoencoder on this many images, the first in processing order")
    p.add_argument("--dedup-radius", type=int, default=d.dedup_radius,
                   help="semantic: codes at most this many bits apart (of 128) are duplicates; 0 = equal codes")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="an input whose header "
                   "declares more pixels (height x width) is skipped undecoded, with the reason in the manifest: "
                   "inputs are others' files, and a few KiB can declare a 2.7 GB image")
    p.add_argument("--max-file-bytes", type=int, default=d.max_file_bytes, help="a larger file, archive member "
                   "or LMDB value is skipped unread, with the reason in the manifest")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes decoding and encoding; the output does not depend on it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _options(args: argparse.Namespace) -> Options:
    """The options the command line gives; what it leaves out is Options' default, or for a builtin: source the
    trainer's (BUILTIN_OPTIONS), so `shard builtin:mnist5k shards/mnist5k` writes what the default run would."""
    given = {f.name: getattr(args, f.name) for f in fields(Options) if hasattr(args, f.name)}
    base = dict(BUILTIN_OPTIONS) if args.source.startswith(sources.BUILTIN) else {}
    if "resolution" in given:  # a size asked for: resize to it
        base.pop("keep_size", None)
    return Options(**{**base, **given})


def _index_or_verify(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"python -m dcgan_dist.shard {command}",
                                description=index.__doc__.split("\n\n")[1])
    p.add_argument("target", help="a shard folder or a bucket prefix such as s3://bucket/prefix/")
    args = p.parse_args(argv)
    try:
        if command == "index":
            manifest = index.index(args.target)
            print(f"wrote {args.target.rstrip('/')}/manifest.json: {manifest['total']} samples in "
                  f"{len(manifest['shards'])} shards")
            return 0
        checked, problems = index.verify(args.target)
    except (ValueError, OSError) as err:
        print(f"dcgan_dist.shard {command}: error: {err}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"verified {checked} shards in {args.target}: " + (f"{len(problems)} problems" if problems else "all good"))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("index", "verify"):
        return _index_or_verify(argv[0], argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        opts = _options(args)
    except ValueError as err:
        parser.error(str(err))
    try:
        manifest = run(args.source, args.outdir, opts, workers=args.workers, progress=not args.quiet)
    except (ShardError, sources.SourceError) as err:
        print(f"dcgan_dist.shard: error: {err}", file=sys.stderr)
        return 1
    counts = manifest["counts"]
    print(f"{manifest['total']} samples in {len(manifest['shards'])} shards in {args.outdir}: {counts['inputs']} "
          f"inputs, {counts['skipped']} skipped, {counts['duplicates']} duplicates removed"
          + (f", {counts['no_face']} without a face" if opts.faces else ""))
    return 0
