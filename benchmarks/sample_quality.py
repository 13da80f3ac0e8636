"""Sample quality of an MNIST generator, measured: a CNN trained on the real MNIST-5k labels classifies samples.

    python benchmarks/sample_quality.py CHECKPOINT [CHECKPOINT ...] [--n 1000]

Prints the classifier's held-out accuracy on real digits (its credibility as a judge), then for each generator:
the share of samples per digit class (target: every class between 4% and 16%), the entropy of those shares and
the mean top-class probability (target: at least 0.8). A random-weights generator is scored in the same run as
the baseline. Several checkpoints share one judge. A checkpoint with a G_ema gives three rows: G, and G_ema with
each batchnorm choice of train.ema_bn (G's running statistics copied, or standing statistics recomputed), so one
run measures the choice.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time

import torch

from dcgan_dist import checkpoint, models
from dcgan_dist.checkpoint import load_networks
from dcgan_dist.config import from_dict
from dcgan_dist.data.load import load_labelled
from dcgan_dist.evaluate import classifier
from dcgan_dist.shard.run import builtin_shards
from dcgan_dist.train.ema import for_sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--shards", default=None, help="labelled MNIST shards (default: write mnist5k to a temp dir)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    cfg = load_networks(args.checkpoints[0]).cfg
    shards = args.shards or str(builtin_shards("mnist5k", tempfile.mkdtemp(prefix="mnist5k-")))
    x, y = load_labelled(shards, cfg.model.resolution, cfg.model.channels)
    t0 = time.perf_counter()
    judge, held = classifier.fit_with_holdout(x, y)  # every 10th digit held out: the judge's own accuracy
    acc = held["heldout_accuracy"]
    fit_s = time.perf_counter() - t0

    torch.manual_seed(0)
    rows = {"random-init G (baseline)": models.generate(models.build(cfg.model)[0].eval(), cfg.model, args.n, seed=1)}
    for path in args.checkpoints:
        for name, g, model in generators(path):
            rows[f"{path} {name}"] = models.generate(g, model, args.n, seed=1)
    results = {name: classifier.coverage(classifier.predict_proba(judge, s)) for name, s in rows.items()}

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads")
    print(f"judge: SmallCNN fit on {held['n_train']} real digits in {fit_s:.1f} s, "
          f"held-out accuracy {acc:.4f} on {held['n_heldout']}\n")
    print(f"| generator | n | min share | max share | entropy (max {math.log(10):.3f}) | mean confidence "
          f"| per-class shares 0..9 | targets met |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        ok = min(r["shares"]) >= 0.04 and max(r["shares"]) <= 0.16 and r["mean_confidence"] >= 0.8
        print(f"| {name} | {r['n']} | {min(r['shares']):.3f} | {max(r['shares']):.3f} | {r['entropy']:.3f} "
              f"| {r['mean_confidence']:.3f} | {' '.join(f'{s:.3f}' for s in r['shares'])} | {'yes' if ok else 'no'} |")
    print("\ntargets: every class between 4% and 16% of samples, mean top-class probability >= 0.8")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"judge_accuracy": acc, **results}, f, indent=1)


def generators(path: str):
    """(name, G in eval mode, model config) for G and, if the checkpoint has one, G_ema under each BN choice."""
    record = checkpoint.load(checkpoint.latest(path) or path)
    cfg = from_dict(record.config)
    g = models.Generator(cfg.model)
    g.load_state_dict(record.G)
    yield "G", g.eval(), cfg.model
    if record.G_ema is None:
        return
    ema = models.Generator(cfg.model)
    buffers = {k: v for k, v in record.G.items() if "running" in k or "num_batches" in k}
    ema.load_state_dict({**record.G_ema, **buffers})  # G's running statistics: train.ema_bn=copy
    yield "G_ema (BN copied from G)", ema.eval(), cfg.model
    cfg.train.ema_bn = "recompute"
    yield "G_ema (standing BN statistics)", for_sampling(ema, cfg), cfg.model


if __name__ == "__main__":
    main()
