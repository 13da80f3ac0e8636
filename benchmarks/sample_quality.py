"""Sample quality of an MNIST generator, measured: a CNN trained on the real MNIST-5k labels classifies samples.

    python benchmarks/sample_quality.py CHECKPOINT [CHECKPOINT ...] [--n 1000]

Prints the classifier's held-out accuracy on real digits (its credibility as a judge), then for the generator:
the share of samples per digit class (target: every class between 4% and 16%), the entropy of those shares and
the mean top-class probability (target: at least 0.8). A random-weights generator is scored in the same run as
the baseline. Several checkpoints share one judge.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time

import torch

from dcgan_dist import models
from dcgan_dist.checkpoint import load_networks
from dcgan_dist.data.load import load_labelled
from dcgan_dist.evaluate import classifier
from dcgan_dist.shard.run import builtin_shards


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
        nets = load_networks(path)
        rows[path] = models.generate(nets.G, nets.cfg.model, args.n, seed=1)
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


if __name__ == "__main__":
    main()
