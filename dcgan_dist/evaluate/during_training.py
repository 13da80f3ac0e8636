"""Sample quality during training: FID or classifier coverage every eval.every_images, the best checkpoint kept.

Every rank takes part (sharded.py): each generates and embeds its share of the samples, the features are gathered
and rank 0 scores them, so N ranks do the work in 1/N of the time instead of rank 0 alone while the others wait.
The reference (the real set's Inception features, cached by reference.py, or the coverage judge fit on rank 0 and
sent to the others) is built once, before the first step, and the samples come from the same latent draws every
time, so scores move only with the generator. That is G_ema by default (eval.generator). DCGAN quality can decay
late in training: checkpoints/best.pt keeps G, G_ema and D at the best score so far (it holds no optimizer
state; resuming still uses the newest ckpt-*.pt).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import checkpoint, models
from .. import config as config_mod
from ..config import Config
from ..data.load import load_labelled
from ..distributed import context
from ..distributed.context import Context
from . import classifier, fid, reference, sharded

class EvalSetupError(ValueError):
    """An evaluation the config asks for that cannot run (no weights file, too few samples): a user's error."""


def check(cfg: Config, world_size: int) -> None:
    """Raise EvalSetupError, naming the key, when the evaluation cfg asks for cannot run with world_size ranks."""
    if cfg.eval.metric == "fid":
        try:
            fid.check_weights(cfg.eval.inception_weights)
        except FileNotFoundError as err:
            raise EvalSetupError(f"eval.inception_weights: {err}") from None
    if cfg.eval.metric is not None and cfg.eval.samples < world_size:
        raise EvalSetupError(f"eval.samples={cfg.eval.samples}: fewer than the {world_size} ranks that share them")


def build(cfg: Config, ctx: Context) -> "TrainingEval | None":
    """The evaluator (on every rank) when eval.metric is set; every rank checks first (no rank waits for one that
    failed)."""
    check(cfg, ctx.world_size)
    return None if cfg.eval.metric is None else TrainingEval(cfg, ctx)


class TrainingEval:
    """Call with (G, G_ema or None, D, images seen, RunLog or None) on every rank to score the generator, log the
    score and update best.pt (rank 0)."""

    def __init__(self, cfg: Config, ctx: Context):
        self.cfg, self.ctx, self.metric = cfg, ctx, cfg.eval.metric
        self.best_path = checkpoint.best_path(cfg.run_dir)
        self.best = self._previous_best() if ctx.is_main else None
        # The reference is built now, so that a bad weights file or unlabelled shards fail before training,
        # not hours into it; the judge's seeded fit runs on a forked RNG so training's stays where it was.
        e, m = cfg.eval, cfg.model
        shards = e.shards or cfg.data.shards
        self.first: dict[str, float] = {}  # logged with the first score
        if self.metric == "fid":
            self.net = fid.load_inception(e.inception_weights, e.inception_dims, ctx.device)
            real = reference.real_protocol(shards, m.resolution, m.channels, e.real_samples)
            inception = reference.inception_protocol(e.inception_weights, e.inception_dims)
            features, cached = reference.real_features(self.net, real, inception,
                                                       reference.cache_dir(e.reference_cache), ctx.rank,
                                                       ctx.world_size, ctx.device)
            self.reference = fid.statistics(features)
            generated = {"images": e.samples, "seed": cfg.train.seed + 1, "generator":
                         "G_ema" if e.generator == "ema" and cfg.train.ema_images != 0 else "G"}
            self.protocol = {"real": real, "inception": inception, "generated": generated, "cached": cached}
        else:
            judge = None
            if ctx.is_main:  # one fit, sent to the other ranks: they would all fit the same seeded judge
                x, y = load_labelled(shards, m.resolution, m.channels, e.real_samples)
                forked = [ctx.device] if ctx.device.type == "cuda" else []
                with torch.random.fork_rng(devices=forked):
                    judge, info = classifier.fit_with_holdout(x, y, device=ctx.device)
                judge = judge.cpu()  # sent as a pickle: device-free
                self.first["eval/coverage_judge_accuracy"] = info["heldout_accuracy"]  # how far to trust it
            self.judge = context.broadcast_object(judge).to(ctx.device)

    def describe(self) -> str:
        """What is measured, for the run's log: the FID protocol, or the coverage judge."""
        if self.metric == "fid":
            return f"eval: FID every {self.cfg.eval.every_images} images\n{reference.describe(self.protocol)}"
        return (f"eval: coverage every {self.cfg.eval.every_images} images of {self.cfg.eval.samples} samples, "
                f"judged by a SmallCNN fit on the labelled real images")

    def _previous_best(self) -> float | None:
        if not self.best_path.exists():
            return None
        best = checkpoint.load(self.best_path).best
        return best.score if best is not None and best.metric == self.metric else None

    def _improves(self, score: float) -> bool:
        if self.best is None:
            return True
        return score < self.best if self.metric == "fid" else score > self.best

    def __call__(self, G: nn.Module, G_ema: nn.Module | None, D: nn.Module, images: int, log) -> dict[str, float]:
        use_ema = self.cfg.eval.generator == "ema" and G_ema is not None
        g, ctx, n = (G_ema if use_ema else G), self.ctx, self.cfg.eval.samples
        z = models.sample_z(n, self.cfg.model, generator=torch.Generator().manual_seed(self.cfg.train.seed + 1))

        def embed(z_part: torch.Tensor) -> torch.Tensor:
            with models.eval_mode(g):  # running batchnorm statistics, as for the sample grids
                samples = models.generate_images(g, z_part)
            if self.metric == "fid":
                return fid.inception_features(self.net, samples)
            return classifier.predict_proba(self.judge, samples)

        rows = sharded.embed(z, embed, ctx.rank, ctx.world_size, ctx.device)
        if not ctx.is_main:
            return {}
        values = {**self.first, **(self._fid(rows) if self.metric == "fid" else self._coverage(rows))}
        self.first = {}
        score = values[f"eval/{self.metric}"]
        log.scalars(images, values)
        if self.cfg.eval.keep_best and self._improves(score):
            self.best = score
            scored = checkpoint.Best(self.metric, score, "G_ema" if use_ema else "G")
            checkpoint.save(checkpoint.Checkpoint(
                config=config_mod.to_dict(self.cfg), images=images, G=G.state_dict(), D=D.state_dict(),
                G_ema=G_ema.state_dict() if G_ema is not None else None, best=scored), self.best_path)
            log.message(f"best {self.metric} of {scored.generator} so far, {score:.4g} at {images} "
                        f"images: saved {self.best_path}")
        return values

    def _fid(self, features: torch.Tensor) -> dict[str, float]:
        return {"eval/fid": fid.frechet_distance(*self.reference, *fid.statistics(features))}

    def _coverage(self, probs: torch.Tensor) -> dict[str, float]:
        cov = classifier.coverage(probs)
        return {"eval/coverage": cov["score"], "eval/coverage_entropy": cov["entropy"],
                "eval/coverage_confidence": cov["mean_confidence"]}
