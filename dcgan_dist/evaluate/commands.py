"""The evaluation commands (cli.py parses their options): each takes (args, networks, report).

interpolate, arithmetic, features, nearest, coverage, fid, kid, pr. Each writes PNG grids and COMMAND.json
into --out (default RUN_DIR/eval/CHECKPOINT_NAME/) and, with --tensorboard, logs its headline numbers and grids
to the run's TensorBoard under eval/COMMAND/ at the checkpoint's image count.
"""

from __future__ import annotations

import json
import math
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import files, grids, models
from ..checkpoint import Networks
from ..data import storage
from ..data.load import load_images, load_labelled
from ..distributed import context
from ..models import generate, generate_images
from . import classifier, features, fid, latent, precision_recall, reference, sharded


class Report:
    """A command's outputs: PNGs and COMMAND.json in out_dir, each written whole (files.atomic_open), so that a
    link someone planted at an output's name is replaced, never written through; optionally TensorBoard in the
    run directory."""

    def __init__(self, command: str, networks: Networks, out_dir: Path, tensorboard: bool, main: bool = True):
        self.command, self.networks, self.out_dir, self.main = command, networks, out_dir, main
        self.writer = None
        self.files: list[str] = []
        if not main:  # another rank of a sharded command: rank 0 reports
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(networks.run_dir / "tb"))

    def picture(self, name: str, image: Image.Image) -> None:
        path = self.out_dir / f"{self.command}-{name}.png"
        with files.atomic_open(path) as f:
            image.save(f, format="PNG")
        self.files.append(str(path))
        if self.writer is not None:
            self.writer.add_image(f"eval/{self.command}/{name}", np.asarray(image.convert("RGB")),
                                  self.networks.images, dataformats="HWC")

    def say(self, text: str) -> None:
        """A line on the terminal, once (from rank 0 under torchrun)."""
        if self.main:
            print(text)

    def finish(self, results: dict, scalars: dict[str, float]) -> dict:
        """Write the JSON (results plus what was evaluated) and log the headline scalars; return the JSON."""
        record = {"command": self.command, "checkpoint": str(self.networks.path),
                  "checkpoint_images": self.networks.images, "generator": self.networks.generator, **results,
                  "scalars": scalars, "files": self.files}
        if not self.main:
            return record
        path = self.out_dir / f"{self.command}.json"
        files.write_text(path, json.dumps(record, indent=2) + "\n")
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"eval/{self.command}/{name}", value, self.networks.images)
            self.writer.close()
        shown = ", ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        print(f"{self.command}: {shown}\n  wrote {path}" + "".join(f"\n  wrote {f}" for f in self.files))
        return record


def real_shards(args, s: Networks) -> str:
    """The real images a command compares with: --shards, else the checkpoint's own data.shards when that is a
    plain local path. A checkpoint may come from someone else (SECURITY.md): a `pipe:` command or a URL in it is
    neither run nor fetched, and the run says which local path it took from it."""
    if args.shards:
        return args.shards
    spec = s.cfg.data.shards
    if any(storage.is_remote(part.strip()) for part in spec.split("::")):
        raise ValueError(f"{s.path}: the checkpoint's data.shards is {spec!r}, a URL or a command; a checkpoint "
                         f"is a file made elsewhere, so what it names is neither fetched nor run: give the real "
                         f"images with --shards")
    if context.rank_and_world()[0] == 0:
        print(f"real images: {spec}, the checkpoint's data.shards (--shards to choose others)", file=sys.stderr)
    return spec


# -- the commands: each takes (args, networks, report) and returns report.finish(...) ---------------------------

def cmd_interpolate(args, s: Networks, rep: Report) -> dict:
    """Rows of smooth walks through random latent points; the largest frame-to-frame jump flags discontinuities."""
    gen = torch.Generator().manual_seed(args.seed)
    points = models.sample_z(args.rows * args.points, s.cfg.model, generator=gen).view(args.rows, args.points, -1)
    z = torch.cat([latent.walk(p, args.frames, args.slerp) for p in points])
    x = generate_images(s.G, z, args.batch_size)
    rep.picture("walks", Image.fromarray(grids.grid(x, nrow=args.frames)))
    frames = x.view(args.rows, args.frames, -1)
    steps = (frames[:, 1:] - frames[:, :-1]).square().mean(2).sqrt()  # RMS pixel change between frames
    jump = float((steps.max(1).values / steps.mean(1).clamp(min=1e-12)).max())
    results = {"seed": args.seed, "rows": args.rows, "frames": args.frames, "points": args.points,
               "spherical": args.slerp, "mean_step_rms": float(steps.mean()), "max_step_rms": float(steps.max()),
               "max_step_over_row_mean": jump}
    return rep.finish(results, {"mean_step_rms": float(steps.mean()), "max_step_over_row_mean": jump})


def cmd_arithmetic(args, s: Networks, rep: Report) -> dict:
    """A numbered sample sheet; with --expr, the arithmetic of exemplar means and noisy variations of it."""
    gen = torch.Generator().manual_seed(args.seed)
    sheet_z = models.sample_z(args.sheet, s.cfg.model, generator=gen)
    sheet = generate_images(s.G, sheet_z, args.batch_size)
    rep.picture("sheet", grids.render(grids.numbered_rows(sheet, ncol=math.ceil(args.sheet ** 0.5))))
    results = {"seed": args.seed, "sheet": args.sheet, "expr": args.expr}
    if not args.expr:
        print(f"pick exemplars by number from {rep.out_dir / 'arithmetic-sheet.png'} and rerun with the same "
              f"--seed and --sheet and --expr 'i,j,k - l,m,n + o,p,q'")
        return rep.finish(results, {})
    terms = latent.parse_expression(args.expr, args.sheet)
    means, result = latent.combine(sheet_z, terms)
    variations = latent.jitter(result, args.variations, args.noise, torch.Generator().manual_seed(args.seed + 1))
    mean_images = generate_images(s.G, means)
    out_images = generate_images(s.G, torch.cat([result[None], variations]))
    rows = [[(sheet[i], f"{'+' if sign > 0 else '-'}#{i}") for i in idx] + [(mean_images[t], "mean")]
            for t, (sign, idx) in enumerate(terms)]
    rows.append([(out_images[0], "result")] + [(img, f"noise {j + 1}") for j, img in enumerate(out_images[1:])])
    rep.picture("result", grids.render(rows))
    results.update({"terms": [{"sign": sign, "indices": idx} for sign, idx in terms], "noise": args.noise,
                    "variations": args.variations})
    return rep.finish(results, {})


def cmd_features(args, s: Networks, rep: Report) -> dict:
    """Linear-SVM accuracy of trained-D features against random-D features and raw pixels, on held-out data."""
    res, ch = s.cfg.model.resolution, s.cfg.model.channels
    shards = real_shards(args, s)
    x, y = load_labelled(shards, res, ch, limit=args.limit)
    if args.test_shards:
        train, test = (x, y), load_labelled(args.test_shards, res, ch, limit=args.test_limit)
    else:
        tr, te = features.split(len(x), args.test_fraction, args.seed)
        train, test = (x[tr], y[tr]), (x[te], y[te])
    torch.manual_seed(args.seed)
    random_d = models.build(s.cfg.model)[1].to(s.device)
    # Batchnorm statistics from the whole training split: unlabelled images serve as well as labelled ones.
    extractors = {"trained_D": partial(features.d_features, features.with_real_statistics(s.D, train[0])),
                  "random_D": partial(features.d_features, features.with_real_statistics(random_d, train[0])),
                  "pixels": features.pixels}
    if args.train_size:
        keep = features.balanced_subset(train[1], args.train_size, args.seed)
        train = (train[0][keep], train[1][keep])
    cs = [float(c) for c in args.cs.split(",")]
    scores = features.compare(extractors, train, test, cs, args.folds, args.seed)
    for name, r in scores.items():
        print(f"  {name:10s} accuracy {r['accuracy']:.4f} (error {r['error']:.4f})  C={r['C']:g}  "
              f"dims {r['dims']}  {r['seconds']:.1f} s")
    results = {"shards": shards, "test_shards": args.test_shards, "n_train": len(train[0]), "n_test": len(test[0]),
               "seed": args.seed, "results": scores}
    return rep.finish(results, {f"accuracy/{name}": r["accuracy"] for name, r in scores.items()})


def nearest(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 4096
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances, indices) of the k nearest bank rows to each query row (L2), reading the bank in chunks."""
    best_d = torch.full((len(queries), 0), math.inf)
    best_i = torch.zeros((len(queries), 0), dtype=torch.long)
    for start in range(0, len(bank), chunk):
        d = torch.cdist(queries.float(), bank[start:start + chunk].float())
        idx = torch.arange(start, start + d.shape[1]).expand(len(queries), -1)
        best_d, order = torch.cat([best_d, d], 1).topk(min(k, best_d.shape[1] + d.shape[1]), largest=False)
        best_i = torch.cat([best_i, idx], 1).gather(1, order)
    return best_d, best_i


def cmd_nearest(args, s: Networks, rep: Report) -> dict:
    """Nearest training images of generated samples in pixel and D-feature space, against held-out real ones."""
    cfg = s.cfg
    real = load_images(real_shards(args, s), cfg.model.resolution, cfg.model.channels, args.limit)
    if len(real) <= args.n:
        raise ValueError(f"--n {args.n}: the shard set has only {len(real)} images; the first --n are held out "
                         f"as the real baseline, so it needs more")
    held, bank = real[:args.n], real[args.n:]
    fake = generate(s.G, cfg.model, args.n, seed=args.seed, batch_size=args.batch_size)
    d_real = features.with_real_statistics(s.D, bank)  # the same D features as the `features` command
    spaces = {"pixel": features.pixels, "D_feature": partial(features.d_features, d_real)}
    summary, found = {}, {}
    for space, extract in spaces.items():
        bank_f = extract(bank)
        found[space] = nearest(extract(fake), bank_f, args.k)
        baseline = nearest(extract(held), bank_f, 1)[0][:, 0]
        generated = found[space][0][:, 0]
        summary[space] = {"generated_median": float(generated.median()), "heldout_real_median":
                          float(baseline.median()), "ratio": float(generated.median() / baseline.median()),
                          "generated_min": float(generated.min())}
    rows, shown = [], []
    for i in range(min(args.show, args.n)):
        row = [(fake[i], f"sample {i}")]
        for space, tag in (("pixel", "px"), ("D_feature", "D")):
            distances, indices = found[space][0][i], found[space][1][i]
            row += [(bank[j], f"{tag} {d:.3g}") for d, j in zip(distances.tolist(), indices.tolist())]
        rows.append(row)
        shown.append({space: {"distances": found[space][0][i].tolist(),
                              "bank_indices": (found[space][1][i] + args.n).tolist()} for space in spaces})
    rep.picture("grid", grids.render(rows))
    results = {"n_generated": args.n, "n_heldout_real": args.n, "n_bank": len(bank), "k": args.k, "seed": args.seed,
               "summary": summary, "shown": shown}
    return rep.finish(results, {f"{space}/ratio": v["ratio"] for space, v in summary.items()})


def cmd_coverage(args, s: Networks, rep: Report) -> dict:
    """A classifier of the real labels classifies N samples: per-class shares, their entropy, confidence."""
    cfg = s.cfg
    x, y = load_labelled(real_shards(args, s), cfg.model.resolution, cfg.model.channels, args.limit)
    judge, judge_info = classifier.fit_with_holdout(x, y, epochs=args.epochs, seed=args.seed, device=s.device)
    samples = generate(s.G, cfg.model, args.n, seed=args.seed, batch_size=args.batch_size)
    probs = classifier.predict_proba(judge, samples)
    cov = classifier.coverage(probs)
    conf, label = probs[:64].max(1)
    order = label.argsort(stable=True)
    cells = [(samples[i], f"{int(label[i])}: {float(conf[i]):.2f}") for i in order.tolist()]
    rep.picture("samples", grids.render([cells[i:i + 8] for i in range(0, len(cells), 8)]))
    print("  shares: " + " ".join(f"{k}:{v:.3f}" for k, v in enumerate(cov["shares"])))
    results = {"judge": judge_info, "seed": args.seed, **cov}
    scalars = {"entropy": cov["entropy"], "mean_confidence": cov["mean_confidence"], "score": cov["score"],
               "judge_heldout_accuracy": judge_info["heldout_accuracy"]}
    return rep.finish(results, scalars)


def _inception_features(args, s: Networks) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Inception pool features of real shard images (cached, reference.py) and of generated samples, each rank
    under torchrun embedding its share (shared by fid, kid and pr); the protocol, printed on rank 0."""
    cfg = s.cfg
    net = fid.load_inception(args.inception_weights, args.dims, s.device)  # first: a missing file fails fast
    shards = real_shards(args, s)
    rank, world = context.rank_and_world()
    real = reference.real_protocol(shards, cfg.model.resolution, cfg.model.channels, args.real_limit)
    inception = reference.inception_protocol(args.inception_weights, args.dims)
    real_f, cached = reference.real_features(net, real, inception, reference.cache_dir(args.reference_cache),
                                             rank, world, s.device)
    z = models.sample_z(args.n, cfg.model, generator=torch.Generator().manual_seed(args.seed))
    fake_f = sharded.embed(z, lambda part: fid.inception_features(net, generate_images(s.G, part, args.batch_size)),
                           rank, world, s.device)
    generated = {"images": args.n, "generator": s.generator, "seed": args.seed}
    protocol = {"real": real, "inception": inception, "generated": generated, "cached": cached}
    if rank == 0:
        print(reference.describe(protocol), flush=True)
    info = {"n_generated": len(fake_f), "n_real": len(real_f), "shards": shards, "dims": args.dims,
            "inception_weights": str(args.inception_weights), "seed": args.seed, "ranks": world,
            "protocol": protocol}
    return real_f, fake_f, info


def cmd_fid(args, s: Networks, rep: Report) -> dict:
    """Fréchet Inception distance between generated samples and the shard set."""
    real_f, fake_f, info = _inception_features(args, s)
    value = fid.frechet_distance(*fid.statistics(real_f), *fid.statistics(fake_f))
    if min(len(real_f), len(fake_f)) <= args.dims:
        info["note"] = (f"fewer samples than feature dims ({args.dims}): the covariances are singular and the "
                        f"score is biased upwards; compare only scores with the same sample counts")
        rep.say(f"  note: {info['note']}")
    rep.say(f"  FID {value:.3f} on {info['n_generated']} generated and {info['n_real']} real images")
    return rep.finish({"fid": value, **info}, {"fid": value, "n_generated": info["n_generated"]})


def cmd_kid(args, s: Networks, rep: Report) -> dict:
    """Kernel Inception distance (mean and std over random subsets) between samples and the shard set."""
    real_f, fake_f, info = _inception_features(args, s)
    mean, std, m = fid.kernel_distance(real_f, fake_f, args.subsets, args.subset_size, args.seed)
    rep.say(f"  KID {mean:.5f} +- {std:.5f} ({args.subsets} subsets of {m}) on {info['n_generated']} generated "
            f"and {info['n_real']} real images")
    results = {"kid": mean, "kid_std": std, "subsets": args.subsets, "subset_size": m, **info}
    return rep.finish(results, {"kid": mean, "n_generated": info["n_generated"]})


def cmd_pr(args, s: Networks, rep: Report) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019, k nearest neighbours) on FID's Inception features."""
    real_f, fake_f, info = _inception_features(args, s)
    precision, recall = precision_recall.precision_recall(real_f.to(s.device), fake_f.to(s.device), args.k)
    rep.say(f"  precision {precision:.4f}, recall {recall:.4f} (k={args.k}) on {info['n_generated']} generated and "
            f"{info['n_real']} real images")
    results = {"precision": precision, "recall": recall, "k": args.k, **info}
    return rep.finish(results, {"precision": precision, "recall": recall, "n_generated": info["n_generated"]})
