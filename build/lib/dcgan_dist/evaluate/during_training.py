"""Sample quality during training: FID or classifier coverage every eval.every_images, the best checkpoint kept.

It runs on rank 0 between steps, only when its interval is crossed; the other ranks go on and wait for rank 0 in
their next collective. The reference (the real set's FID statistics, or the coverage judge) is built once, before
the first step, and the samples come from the same latent draws every time, so scores move only with G.
DCGAN quality can decay late in training: checkpoints/best.pt keeps G and D at the best score so far (it holds
no optimizer state; resuming still uses the newest ckpt-*.pt).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import checkpoint, models
from .. import config as config_mod
from ..config import Config
from ..data.load import load_images, load_labelled
from ..distributed.context import Context
from . import classifier, fid

BEST = "best.pt"


def build(cfg: Config, ctx: Context) -> "TrainingEval | None":
    """The evaluator on rank 0 when eval.metric is set; every rank first checks the FID weights file exists."""
    if cfg.eval.metric is None:
        return None
    if cfg.eval.metric == "fid":
        fid.check_weights(cfg.eval.inception_weights)  # on every rank: no rank waits for one that failed
    return TrainingEval(cfg, ctx.device) if ctx.is_main else None


class TrainingEval:
    """Call with (G, D, images seen, RunLog) to score G, log the score and update best.pt."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device, self.metric = cfg, device, cfg.eval.metric
        self.best_path = checkpoint.directory(cfg.run_dir) / BEST
        self.best = self._previous_best()
        # The reference is built now, so that a bad weights file or unlabelled shards fail before training,
        # not hours into it; the judge's seeded fit runs on a forked RNG so training's stays where it was.
        e, m = cfg.eval, cfg.model
        shards = e.shards or cfg.data.shards
        self.first: dict[str, float] = {}  # logged with the first score
        if self.metric == "fid":
            self.net = fid.load_inception(e.inception_weights, e.inception_dims, device)
            real = load_images(shards, m.resolution, m.channels, e.real_samples)
            self.reference = fid.statistics(fid.inception_features(self.net, real))
        else:
            x, y = load_labelled(shards, m.resolution, m.channels, e.real_samples)
            with torch.random.fork_rng(devices=[]):
                self.judge, info = classifier.fit_with_holdout(x, y, device=device)
            self.first["eval/coverage_judge_accuracy"] = info["heldout_accuracy"]  # how far to trust the judge

    def _previous_best(self) -> float | None:
        if not self.best_path.exists():
            return None
        saved = checkpoint.load(self.best_path).get("eval", {})
        return saved.get("score") if saved.get("metric") == self.metric else None

    def _improves(self, score: float) -> bool:
        if self.best is None:
            return True
        return score < self.best if self.metric == "fid" else score > self.best

    def __call__(self, G: nn.Module, D: nn.Module, images: int, log) -> dict[str, float]:
        with models.eval_mode(G):  # running batchnorm statistics, as for the sample grids
            samples = models.generate(G, self.cfg.model, self.cfg.eval.samples, seed=self.cfg.train.seed + 1)
        values = {**self.first, **(self._fid(samples) if self.metric == "fid" else self._coverage(samples))}
        self.first = {}
        score = values[f"eval/{self.metric}"]
        log.scalars(images, values)
        if self.cfg.eval.keep_best and self._improves(score):
            self.best = score
            state = {"G": G.state_dict(), "D": D.state_dict(), "config": config_mod.to_dict(self.cfg),
                     "images": images, "eval": {"metric": self.metric, "score": score, "images": images}}
            checkpoint.save(state, self.best_path)
            log.message(f"best {self.metric} so far, {score:.4g} at {images} images: saved {self.best_path}")
        return values

    def _fid(self, samples: torch.Tensor) -> dict[str, float]:
        fake = fid.statistics(fid.inception_features(self.net, samples))
        return {"eval/fid": fid.frechet_distance(*self.reference, *fake)}

    def _coverage(self, samples: torch.Tensor) -> dict[str, float]:
        cov = classifier.coverage(classifier.predict_proba(self.judge, samples))
        return {"eval/coverage": cov["score"], "eval/coverage_entropy": cov["entropy"],
                "eval/coverage_confidence": cov["mean_confidence"]}
