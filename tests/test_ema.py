"""G_ema: StyleGAN2-ADA's half-life rule, standing batchnorm statistics, a pure observer of training, and used
wherever users sample (sample CLI, evaluate, TensorBoard grids, best.pt)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from dcgan_dist import checkpoint, config, models
from dcgan_dist.train import ema
from dcgan_dist.train.loop import train
from helpers import assert_same_weights, events


def test_half_life_rule_and_ramp_up():
    cfg = config.load(None, ["train.batch_size=64"])
    assert ema.half_life(cfg, 64) == 20_000  # StyleGAN2-ADA: batch x 10/32 thousand images
    assert ema.half_life(cfg, 256) == 80_000
    assert ema.half_life(config.load(None, ["train.ema_images=5000"]), 64) == 5000
    # Without ramp-up, the old average's share halves over exactly one half-life of images.
    steps = 20_000 // 64
    assert math.prod(ema.beta_at(10 ** 9, 64, 20_000, None) for _ in range(steps)) == pytest.approx(
        0.5 ** (steps * 64 / 20_000))
    assert ema.beta_at(0, 64, 20_000, 0.05) == 0.0  # the first update copies G
    # Early on the half-life is 0.05 x images seen: at 100k images 5k, not 20k.
    assert ema.beta_at(100_000, 64, 20_000, 0.05) == pytest.approx(0.5 ** (64 / 5000))
    assert ema.beta_at(10 ** 7, 64, 20_000, 0.05) == pytest.approx(0.5 ** (64 / 20_000))


def test_update_is_the_lerp_and_copy_of_running_statistics():
    cfg = config.load(None, ["model.ngf=8", "train.ema_bn=copy"])
    g, _ = models.build(cfg.model)
    avg = ema.EMA(g, cfg, 64, torch.contiguous_format)
    before = {k: v.clone() for k, v in avg.module.state_dict().items()}
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
        for m in g.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(3.0)
    avg.weight.fill_(0.25)
    avg.update()
    now, g_state = avg.module.state_dict(), g.state_dict()
    for name, _ in g.named_parameters():
        assert torch.allclose(now[name], 0.75 * before[name] + 0.25 * g_state[name], atol=1e-6)
    for name in (k for k in now if "running" in k):
        assert torch.equal(now[name], g_state[name])  # ema_bn=copy samples with G's running statistics
    assert avg.for_sampling() is avg.module


def test_standing_statistics_are_the_average_of_generated_batch_statistics():
    cfg = config.load(None, ["model.ngf=8"]).model
    torch.manual_seed(0)
    g, _ = models.build(cfg)
    standing = models.standing_statistics(g, cfg, batches=3, batch_size=16, seed=5)
    again = models.standing_statistics(g, cfg, batches=3, batch_size=16, seed=5)
    bn = standing.main[1]
    assert not standing.training and g.training  # g itself untouched
    for a, b in zip(standing.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)  # a pure function of the weights and the seed
    # By hand: the first batchnorm's input over the same three latent batches.
    gen, means, variances = torch.Generator().manual_seed(5), [], []
    with torch.no_grad():
        for _ in range(3):
            h = g.main[0](models.sample_z(16, cfg, generator=gen).view(16, cfg.nz, 1, 1))
            means.append(h.mean((0, 2, 3)))
            variances.append(h.var((0, 2, 3), unbiased=True))
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, torch.stack(variances).mean(0), rtol=1e-5)
    assert bn.momentum == g.main[1].momentum


def _variant(cfg, run_dir, **train_keys):
    data = config.to_dict(cfg)
    data["run_dir"] = str(run_dir)
    data["train"].update(train_keys)
    return config.from_dict(data)


def test_g_ema_is_an_observer_and_is_saved_beside_g(tiny_cfg, tmp_path):
    """Training with and without G_ema gives bit-identical G and D; the checkpoint holds G_ema, unlike G."""
    train(tiny_cfg)
    train(_variant(tiny_cfg, tmp_path / "no_ema", ema_images=0))
    a, b = (checkpoint.load(checkpoint.latest(d)) for d in (tiny_cfg.run_dir, tmp_path / "no_ema"))
    assert_same_weights(a, b)  # else G_ema changed training
    assert a.G_ema is not None and b.G_ema is None
    assert any(not torch.equal(a.G_ema[k], a.G[k]) for k in a.G)

    # TensorBoard shows G and G_ema side by side at every sample interval; the PNG is G_ema's.
    acc = events(tiny_cfg.run_dir)
    assert [e.step for e in acc.Images("samples/fixed_noise_ema")] == [160, 320]
    assert [e.step for e in acc.Images("samples/fixed_noise")] == [160, 320]

    # The sample command, as typed: G_ema by default, the raw G on request, G with a note where there is no G_ema.
    def sample(*args):
        return subprocess.run([sys.executable, "-m", "dcgan_dist.sample", *args], capture_output=True,
                              text=True, timeout=120)

    ckpt = str(checkpoint.latest(tiny_cfg.run_dir))
    out = tmp_path / "grid.png"
    default = sample(ckpt, "--n", "8", "--out", str(out), "--npz", str(tmp_path / "ema.npz"))
    raw = sample(ckpt, "--n", "8", "--out", str(out), "--npz", str(tmp_path / "raw.npz"), "--generator", "raw")
    old = sample(str(tmp_path / "no_ema"), "--n", "8", "--out", str(out))
    assert default.returncode == raw.returncode == old.returncode == 0, default.stderr + raw.stderr + old.stderr
    assert "8 samples of G_ema" in default.stdout and "8 samples of G " in raw.stdout
    assert "8 samples of G " in old.stdout and "holds no G_ema" in old.stderr
    assert not np.array_equal(np.load(tmp_path / "ema.npz")["x"], np.load(tmp_path / "raw.npz")["x"])
    assert "G_ema" in sample("--help").stdout


def test_ema_settings_are_validated():
    for bad, key in (("train.ema_images=-1", "train.ema_images"), ("train.ema_rampup=0", "train.ema_rampup"),
                     ("train.ema_bn=average", "train.ema_bn"), ("eval.generator=best", "eval.generator")):
        with pytest.raises(config.ConfigError, match=key):
            config.load(None, [bad])
