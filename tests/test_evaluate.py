"""`python -m dcgan_dist.evaluate` end to end on checkpoints trained here on real MNIST shards, and the
evaluation run during training (TensorBoard scores, best checkpoint)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dcgan_dist import checkpoint, config
from dcgan_dist.evaluate.cli import main
from dcgan_dist.evaluate.commands import nearest
from dcgan_dist.train.loop import train


def _train(shards, run_dir, width: int, images: int, batch: int, extra=()) -> Path:
    cfg = config.load(None, [
        f"data.shards={shards}", "data.builtin=null", "data.loader_workers=0", "data.shuffle_buffer=500",
        f"model.ngf={width}", f"model.ndf={width}", f"train.batch_size={batch}", f"train.images={images}",
        "train.device=cpu", f"log.every_images={images}", f"log.sample_every_images={images}",
        f"log.checkpoint_every_images={images}", "log.grid_size=16", f"run_dir={run_dir}", *extra,
    ])
    train(cfg)
    return Path(run_dir)


@pytest.fixture(scope="module")
def trained_run(mnist_shards, tmp_path_factory):
    """The default width (32) trained for 1,000 steps of 16 images (~25 s on 2 cores): D's features then beat a
    random D's (20,000 images at batch 64 did not; the number of steps matters more than the images seen)."""
    return _train(mnist_shards, tmp_path_factory.mktemp("eval") / "run", width=32, images=16000, batch=16)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A randomly initialised Inception-v3 saved in the FID weights format (no real weights ship offline)."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=1008)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def _json(out: Path, command: str) -> dict:
    return json.loads((out / f"{command}.json").read_text())


def test_interpolate_writes_rows_of_walks(trained_run, tmp_path):
    record = main(["interpolate", str(trained_run), "--rows", "3", "--frames", "5", "--slerp", "--out", str(tmp_path)])
    assert record == _json(tmp_path, "interpolate")
    assert record["checkpoint_images"] == 16000 and record["checkpoint"].endswith("ckpt-000000016000.pt")
    with Image.open(tmp_path / "interpolate-walks.png") as grid:
        assert grid.size == (5 * 34 + 2, 3 * 34 + 2)  # 32-pixel frames with 2-pixel gaps, one walk per row
    assert 0 < record["mean_step_rms"] <= record["max_step_rms"] and record["max_step_over_row_mean"] >= 1


def test_arithmetic_sheet_then_expression(trained_run, tmp_path, capsys):
    sheet = main(["arithmetic", str(trained_run), "--sheet", "16", "--out", str(tmp_path)])
    assert "rerun with the same --seed" in capsys.readouterr().out and "terms" not in sheet
    assert (tmp_path / "arithmetic-sheet.png").exists() and not (tmp_path / "arithmetic-result.png").exists()
    record = main(["arithmetic", str(trained_run), "--sheet", "16", "--expr", "0,1,2 - 3,4,5 + 6,7,8",
                   "--variations", "4", "--out", str(tmp_path)])
    assert record["terms"] == [{"sign": 1, "indices": [0, 1, 2]}, {"sign": -1, "indices": [3, 4, 5]},
                               {"sign": 1, "indices": [6, 7, 8]}]
    with Image.open(tmp_path / "arithmetic-result.png") as result:
        assert result.size[1] == 4 * (64 + 14 + 2) + 2  # three exemplar rows and the result row
    with pytest.raises(SystemExit) as exit_info:
        main(["arithmetic", str(trained_run), "--sheet", "16", "--expr", "0,1 - 99", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "index 99 is not on the sample sheet" in capsys.readouterr().err


def test_trained_discriminator_features_beat_a_random_discriminator(trained_run, mnist_shards, tmp_path):
    record = main(["features", str(trained_run), "--shards", str(mnist_shards), "--limit", "2000", "--test-fraction",
                   "0.5", "--train-size", "300", "--cs", "0.01,0.1,1", "--folds", "2", "--out", str(tmp_path)])
    r = record["results"]
    assert record["n_train"] == 300 and record["n_test"] == 1000
    assert r["trained_D"]["dims"] == r["random_D"]["dims"] == (32 + 64 + 128) * 16 and r["pixels"]["dims"] == 1024
    # Held-out accuracy, the same 300 labels and 1,000 test digits for all three: here 0.866, 0.841, 0.779.
    assert r["trained_D"]["accuracy"] > r["random_D"]["accuracy"] + 0.01
    assert r["trained_D"]["accuracy"] > r["pixels"]["accuracy"] + 0.05
    assert record["scalars"] == {f"accuracy/{k}": v["accuracy"] for k, v in r.items()}


def test_nearest_finds_exact_matches_across_chunks():
    bank = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    dist, idx = nearest(bank[[3, 41, 17]], bank, k=3, chunk=8)
    assert idx[:, 0].tolist() == [3, 41, 17] and torch.allclose(dist[:, 0], torch.zeros(3), atol=1e-3)
    full = torch.cdist(bank[[3, 41, 17]], bank).topk(3, largest=False)
    assert torch.equal(idx, full.indices) and torch.allclose(dist, full.values, atol=1e-5)


def test_nearest_grid_with_distances_in_both_spaces(trained_run, mnist_shards, tmp_path):
    record = main(["nearest", str(trained_run), "--shards", str(mnist_shards), "--n", "20", "--show", "3", "--k", "2",
                   "--limit", "300", "--out", str(tmp_path)])
    assert record["n_bank"] == 280 and record["n_heldout_real"] == 20
    for space in ("pixel", "D_feature"):
        s = record["summary"][space]
        assert s["generated_median"] > 0 and s["heldout_real_median"] > 0
        assert s["ratio"] == pytest.approx(s["generated_median"] / s["heldout_real_median"])
    assert len(record["shown"]) == 3
    for shown in record["shown"]:
        d = shown["pixel"]["distances"]
        assert len(d) == 2 and d[0] <= d[1] and all(20 <= i < 300 for i in shown["pixel"]["bank_indices"])
    with Image.open(tmp_path / "nearest-grid.png") as grid:
        assert grid.size[0] == 5 * (64 + 2) + 2  # sample, 2 pixel neighbours, 2 D-feature neighbours


def test_coverage_reports_shares_entropy_confidence_and_logs_to_tensorboard(trained_run, mnist_shards):
    record = main(["coverage", str(trained_run), "--shards", str(mnist_shards), "--n", "200", "--epochs", "3",
                   "--limit", "2000", "--tensorboard"])
    out = trained_run / "eval" / "ckpt-000000016000"
    assert record == _json(out, "coverage") and (out / "coverage-samples.png").exists()
    assert record["n"] == 200 and len(record["shares"]) == 10
    assert sum(record["shares"]) == pytest.approx(1, abs=1e-3)
    shares = torch.tensor([s for s in record["shares"] if s > 0], dtype=torch.float64)  # rounded to 4 digits
    assert record["entropy"] == pytest.approx(float(-(shares * shares.log()).sum()), abs=1e-3)
    assert record["max_entropy"] == pytest.approx(math.log(10)) and 0.1 <= record["mean_confidence"] <= 1
    assert record["score"] == pytest.approx(record["entropy"] / record["max_entropy"] * record["mean_confidence"])
    assert record["judge"]["n_heldout"] == 200 and record["judge"]["heldout_accuracy"] > 0.6  # real digits
    acc = EventAccumulator(str(trained_run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/coverage/entropy")] == [16000]
    assert acc.Scalars("eval/coverage/score")[0].value == pytest.approx(record["score"], rel=1e-5)
    assert "eval/coverage/samples" in acc.Tags()["images"]


def _numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook Fréchet distance with scipy's general matrix square root (what pytorch-fid computes)."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def _numpy_kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-sized sets with the cubic kernel (a.b / d + 1)^3 (Binkowski et al. 2018)."""
    m, d = a.shape
    kaa, kbb, kab = ((x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    return float((kaa.sum() - np.trace(kaa) + kbb.sum() - np.trace(kbb)) / (m * (m - 1)) - 2 * kab.mean())


def _numpy_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al.: the share of each set inside the union of the other's k-nearest-neighbour balls."""
    def inside(points, centres):
        radii = np.sort(np.linalg.norm(centres[:, None] - centres[None], axis=2), axis=1)[:, k]  # [:, 0]: itself
        return float((np.linalg.norm(points[:, None] - centres[None], axis=2) <= radii).any(1).mean())

    return inside(fake, real), inside(real, fake)


def test_fid_kid_and_pr_commands_report_what_their_features_give(trained_run, mnist_shards, random_inception,
                                                                    tmp_path):
    """Each score recomputed in numpy from the same Inception features: 12 generated and 12 real images, so one
    KID subset holds both whole sets."""
    from dcgan_dist.checkpoint import load_networks
    from dcgan_dist.evaluate.cli import _parser
    from dcgan_dist.evaluate.commands import _inception_features

    common = [str(trained_run), "--shards", str(mnist_shards), "--inception-weights", str(random_inception),
              "--n", "12", "--real-limit", "12", "--dims", "64", "--reference-cache", "off", "--out", str(tmp_path)]
    real_f, fake_f, _ = _inception_features(_parser().parse_args(["fid", *common]), load_networks(trained_run))
    real, fake = real_f.numpy(), fake_f.numpy()
    assert real.shape == fake.shape == (12, 64)

    record = main(["fid", *common])
    assert record["n_generated"] == 12 and record["n_real"] == 12 and record["dims"] == 64
    assert record["fid"] == pytest.approx(_numpy_fid(real, fake), rel=1e-6)
    assert "note" in record  # 12 samples < 64 dims: the bias is pointed out
    assert record["scalars"] == {"fid": record["fid"], "n_generated": 12}

    whole = main(["kid", *common, "--subsets", "1"])
    assert whole["subset_size"] == 12 and whole["kid_std"] == 0
    assert whole["kid"] == pytest.approx(_numpy_kid(real, fake), rel=1e-6)
    sampled = main(["kid", *common, "--subsets", "5", "--subset-size", "10"])
    assert sampled["subset_size"] == 10 and sampled["kid_std"] > 0 and sampled["kid"] != whole["kid"]

    pr = main(["pr", *common])
    assert (pr["precision"], pr["recall"]) == pytest.approx(_numpy_precision_recall(real, fake, 3))
    assert json.loads((tmp_path / "pr.json").read_text())["scalars"]["precision"] == pr["precision"]


def test_fid_states_its_protocol_and_caches_the_reference_under_it(trained_run, mnist_shards, random_inception,
                                                                     tmp_path, capsys):
    cache = tmp_path / "cache"
    common = [str(trained_run), "--shards", str(mnist_shards), "--inception-weights", str(random_inception),
              "--n", "12", "--dims", "64", "--reference-cache", str(cache)]
    first = main(["fid", *common, "--real-limit", "16", "--out", str(tmp_path / "a")])
    printed = capsys.readouterr().out
    again = main(["fid", *common, "--real-limit", "16", "--out", str(tmp_path / "b")])
    assert not first["protocol"]["cached"] and again["protocol"]["cached"] and "[cached reference]" in \
        capsys.readouterr().out
    assert again["fid"] == first["fid"] and again["n_real"] == 16 and len(list(cache.iterdir())) == 1
    real = first["protocol"]["real"]
    assert real["format"] == "png" and real["images"] == 16 and real["quality"] is None  # the builtin set: PNG
    assert first["generator"] == first["protocol"]["generated"]["generator"] == "G_ema"
    for fact in ("protocol:", f"fingerprint {real['fingerprint']}", "png", "from G_ema", "quantised to uint8",
                 "sha256", "bilinear"):
        assert fact in printed, fact
    other = main(["fid", *common, "--real-limit", "20", "--out", str(tmp_path / "c")])  # another protocol
    assert not other["protocol"]["cached"] and len(list(cache.iterdir())) == 2
    raw = main(["fid", *common, "--real-limit", "16", "--generator", "raw", "--out", str(tmp_path / "d")])
    assert raw["generator"] == "G" and raw["protocol"]["cached"] and raw["fid"] != first["fid"]


def test_fid_under_torchrun_shares_the_work_and_gives_the_same_score(trained_run, mnist_shards, random_inception,
                                                                      tmp_path):
    """docs/evaluate.md's torchrun form: each of 2 ranks embeds half of the samples and of the reference."""
    import os
    import subprocess
    import sys

    args = ["fid", str(trained_run), "--inception-weights", str(random_inception), "--shards", str(mnist_shards),
            "--num-samples", "12", "--real-limit", "16", "--dims", "64", "--device", "cpu", "--reference-cache", "off"]
    single = main([*args, "--out", str(tmp_path / "one")])
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "dcgan_dist.evaluate", *args, "--out",
                        str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    two = _json(tmp_path / "two", "fid")
    assert two["ranks"] == 2 and two["n_generated"] == 12 and two["n_real"] == 16
    assert two["fid"] == pytest.approx(single["fid"], rel=1e-4)
    assert r.stdout.count("protocol:") == 1  # rank 0 reports


def test_the_reference_is_read_and_embedded_a_batch_at_a_time(mnist_shards, random_inception, monkeypatch):
    """Bounded memory: the real images are decoded only as Inception asks for them, one batch at a time, and give
    the features of the whole set embedded at once."""
    from dcgan_dist.data import storage
    from dcgan_dist.data.load import load_images
    from dcgan_dist.evaluate import fid, reference

    net = fid.load_inception(random_inception, 64)
    read, calls = [0], []  # samples read from the shards; (images embedded, samples read by then) per call
    tar_samples, inception_features = storage.tar_samples, fid.inception_features

    def counting(url, *args, **kwargs):
        for sample in tar_samples(url, *args, **kwargs):
            read[0] += 1
            yield sample

    def recording(net, images, *args, **kwargs):
        calls.append((len(images), read[0]))
        return inception_features(net, images, *args, **kwargs)

    monkeypatch.setattr(storage, "tar_samples", counting)
    monkeypatch.setattr(fid, "inception_features", recording)
    monkeypatch.setattr(reference, "BATCH", 4)
    real = reference.real_protocol(str(mnist_shards), 32, 1, 18)
    features, cached = reference.real_features(net, real, reference.inception_protocol(random_inception, 64), None)
    assert calls == [(4, 4), (4, 8), (4, 12), (4, 16), (2, 18)] and not cached and real["images"] == 18
    monkeypatch.undo()
    assert torch.equal(features, fid.inception_features(net, load_images(str(mnist_shards), 32, 1, 18), 4))


def test_standard_2048_pool_features_from_the_weights_file(random_inception):
    from dcgan_dist.evaluate import fid

    net = fid.load_inception(random_inception, 2048)
    feats = fid.inception_features(net, torch.rand(2, 1, 32, 32) * 2 - 1)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64 and feats.abs().sum() > 0


def test_fid_without_weights_is_a_clear_error(trained_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fid", str(trained_run), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Nothing is downloaded" in err and "weights-inception-2015-12-05-6726825d.pth" in err
    assert not (tmp_path / "fid.json").exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["interpolate", str(tmp_path)])
    assert f"{tmp_path} holds no checkpoints" in capsys.readouterr().err


# -- during training ---------------------------------------------------------------------------------------

def test_eval_config_errors_name_the_key():
    with pytest.raises(config.ConfigError, match="eval.inception_weights"):
        config.load(None, ["eval.metric=fid"])
    with pytest.raises(config.ConfigError, match="eval.metric"):
        config.load(None, ["eval.metric=inception_score"])
    with pytest.raises(config.ConfigError, match="eval.inception_dims"):
        config.load(None, ["eval.inception_dims=100"])


def _scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_training_scores_coverage_and_keeps_the_best_checkpoint(mnist_shards, tmp_path):
    run = _train(mnist_shards, tmp_path / "run", width=8, images=320, batch=16, extra=[
        "log.checkpoint_every_images=160", "eval.metric=coverage", "eval.every_images=160", "eval.samples=100",
        "eval.real_samples=500"])
    scores = _scalars(run, "eval/coverage")
    assert [step for step, _ in scores] == [160, 320]
    (step, judge_accuracy), = _scalars(run, "eval/coverage_judge_accuracy")  # once, with the first score
    assert step == 160 and 0.1 < judge_accuracy <= 1
    best = checkpoint.load(run / "checkpoints" / "best.pt")
    best_step, best_score = max(scores, key=lambda s: s[1])
    assert best.best.metric == "coverage" and best.images == best_step
    assert best.best.generator == "G_ema" and best.G_ema is not None  # best.pt tracks the EMA's score
    assert best.best.score == pytest.approx(best_score, rel=1e-5)
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["ckpt-000000000160.pt", "ckpt-000000000320.pt"]
    record = main(["interpolate", str(run / "checkpoints" / "best.pt"), "--rows", "1", "--frames", "2",
                   "--out", str(tmp_path / "best")])
    assert record["checkpoint_images"] == best_step


def test_training_scores_fid_with_a_weights_file(mnist_shards, random_inception, tmp_path):
    run = _train(mnist_shards, tmp_path / "run", width=8, images=160, batch=16, extra=[
        "eval.metric=fid", f"eval.inception_weights={random_inception}", "eval.inception_dims=64",
        "eval.every_images=160", "eval.samples=16", "eval.real_samples=16"])
    (step, score), = _scalars(run, "eval/fid")
    assert step == 160 and score > 0
    saved = checkpoint.load(run / "checkpoints" / "best.pt")
    assert saved.best.metric == "fid" and saved.images == 160 and saved.best.score == pytest.approx(score, rel=1e-5)


def test_training_with_a_missing_weights_file_or_labels_fails_before_the_first_step(mnist_shards, tmp_path):
    with pytest.raises(ValueError, match="eval.inception_weights: .*Nothing is downloaded"):
        _train(mnist_shards, tmp_path / "run", width=8, images=160, batch=16, extra=[
            "eval.metric=fid", f"eval.inception_weights={tmp_path / 'missing.pth'}"])
    assert not (tmp_path / "run" / "checkpoints").exists()
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    with tarfile.open(next(Path(mnist_shards).glob("*.tar"))) as src, tarfile.open(unlabelled / "u.tar", "w") as dst:
        for member in src.getmembers():
            if not member.name.endswith(".cls"):
                dst.addfile(member, src.extractfile(member))
    with pytest.raises(ValueError, match="has no 'cls' label field"):
        _train(mnist_shards, tmp_path / "run2", width=8, images=160, batch=16, extra=[
            "eval.metric=coverage", f"eval.shards={unlabelled}"])
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_an_evaluation_that_cannot_run_is_a_one_line_error_from_the_command(mnist_shards, tmp_path):
    """Through the command line: no traceback, the key named, nothing written (a traceback on 188cd17)."""
    r = subprocess.run([sys.executable, "-m", "dcgan_dist.train", f"data.shards={mnist_shards}", "data.builtin=null",
                        "eval.metric=fid", f"eval.inception_weights={tmp_path / 'missing.pth'}",
                        f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "error: eval.inception_weights:" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "checkpoints").exists()
