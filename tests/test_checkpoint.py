"""The checkpoint format has one owner (checkpoint.py): a typed record written and read there, best.pt the same
record, and a clear error naming the file and the field for anything else."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import torch

from dcgan_dist import checkpoint, config
from dcgan_dist.train.loop import train
from helpers import assert_same_tensors
from tiny_run import TINY


# The tiny model's run in this process and through the command line alike: checkpoints at 160 and 320 images.
RUN = (*TINY, "data.loader_workers=0", "train.device=cpu", "log.every_images=64", "log.sample_every_images=320",
       "log.checkpoint_every_images=160")


@pytest.fixture(scope="module")
def trained_once(mnist_shards, tmp_path_factory):
    """One real run of 320 images (checkpoints at 160 and 320), trained once for the module."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(config.load(None, [f"data.shards={mnist_shards}", *RUN, "train.images=320", f"run_dir={run_dir}"]))
    return run_dir


@pytest.fixture
def trained(trained_once, tmp_path):
    """A copy of that run for this test; its newest checkpoint."""
    shutil.copytree(trained_once, tmp_path / "run")
    return checkpoint.latest(tmp_path / "run")


def _rewrite(src, dst, change) -> None:
    state = torch.load(src, weights_only=True)
    change(state)
    torch.save(state, dst)


def test_a_training_checkpoint_is_the_whole_record_and_round_trips(trained, tmp_path):
    record = checkpoint.load(trained, resumable=True)
    assert record.format == checkpoint.FORMAT and record.images == 320 and record.best is None
    r = record.resume
    assert r.step == 20 and r.data_step == 20 and r.rollbacks == 0
    assert r.geometry == {"world_size": 1, "batch_size": 16, "loader_workers": 0}
    assert len(r.skipped) == len(r.consumed) == 1 and r.skipped[0] == [0, 0]
    assert set(r.opt_G) == {"state", "param_groups"} and "torch" in r.rng
    assert record.G_ema is not None and set(record.G_ema) == set(record.G)
    config.from_dict(record.config)  # the resolved config it was trained with validates
    again = checkpoint.save(record, tmp_path / "checkpoints" / "ckpt-000000000320.pt")
    copy = checkpoint.load(again, resumable=True)
    assert copy.to_file_dict().keys() == record.to_file_dict().keys()
    assert_same_tensors(record.G, copy.G, "G")
    assert copy.resume.step == 20


@pytest.mark.parametrize("change, field, says", [
    (lambda s: s.pop("opt_D"), "opt_D", "is missing"),
    (lambda s: s.pop("images"), "images", "is missing"),
    (lambda s: s.update(images="320"), "images", "is a str, not a int"),
    (lambda s: s.update(step=True), "step", "is a bool, not a int"),
    (lambda s: s["geometry"].pop("batch_size"), "geometry", "has no 'batch_size'"),
    (lambda s: s.update(skipped=[[0, 0], [0, 0]]), "skipped", "2 entries for a world size of 1"),
    (lambda s: s.update(rng={}), "rng", "no 'torch' state"),
])
def test_a_missing_or_wrong_field_is_an_error_naming_the_file_and_field(trained, tmp_path, change, field, says):
    bad = tmp_path / "bad.pt"
    _rewrite(trained, bad, change)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(bad, resumable=True)
    assert str(bad) in str(err.value) and repr(field) in str(err.value) and says in str(err.value), str(err.value)


def test_a_newer_format_and_a_foreign_file_are_refused_by_name(trained, tmp_path):
    newer, foreign = tmp_path / "newer.pt", tmp_path / "foreign.pt"
    _rewrite(trained, newer, lambda s: s.update(format=checkpoint.FORMAT + 1))
    torch.save([1, 2, 3], foreign)
    with pytest.raises(checkpoint.CheckpointError, match=f"{newer}: format {checkpoint.FORMAT + 1}"):
        checkpoint.load(newer)
    with pytest.raises(checkpoint.CheckpointError, match=f"{foreign}: holds a list"):
        checkpoint.load(foreign)


def test_best_pt_is_the_same_record_and_is_not_resumed_from(trained, tmp_path):
    record = checkpoint.load(trained)
    best = checkpoint.Checkpoint(record.config, record.images, record.G, record.D, record.G_ema,
                                 best=checkpoint.Best("coverage", 0.75, "G_ema"))
    path = checkpoint.save(best, checkpoint.best_path(tmp_path))
    again = checkpoint.load(path)
    assert again.resume is None and again.best == checkpoint.Best("coverage", 0.75, "G_ema") and again.images == 320
    assert torch.load(path, weights_only=True)["eval"] == {"metric": "coverage", "score": 0.75,
                                                           "generator": "G_ema", "images": 320}
    with pytest.raises(checkpoint.CheckpointError, match="holds no training state"):
        checkpoint.load(path, resumable=True)
    nets = checkpoint.load_networks(path)  # sampling from best.pt works
    assert nets.generator == "G_ema" and nets.images == 320


def test_a_checkpoint_from_before_the_format_number_resumes(trained, mnist_shards):
    """The layout written before `format` existed (the same fields, plus a top-level world_size) is format 1:
    a run with such a newest checkpoint resumes from it through the command line."""
    _rewrite(trained, trained, lambda s: (s.pop("format"), s.update(world_size=1)))
    assert checkpoint.load(trained, resumable=True).format == 1
    run_dir = trained.parent.parent
    r = subprocess.run([sys.executable, "-m", "dcgan_dist.train", f"data.shards={mnist_shards}", *RUN,
                        "train.images=352", f"run_dir={run_dir}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"resumed from {trained} at 320 images" in r.stdout, r.stdout + r.stderr
    assert re.search(r"^done: 352 images in \d+ s\. ", r.stdout, re.MULTILINE), r.stdout  # README's training time
    assert checkpoint.load(checkpoint.latest(run_dir)).images == 352


def test_a_damaged_newest_checkpoint_is_passed_over_by_name(trained, capsys):
    older = checkpoint.list_checkpoints(trained.parent.parent)[0]
    _rewrite(trained, trained, lambda s: s.pop("rng"))
    path, record = checkpoint.newest_readable(trained.parent.parent)
    assert path == older and record.images == checkpoint.images_of(older) == 160
    assert f"{trained}: the field 'rng' is missing; trying the checkpoint before it" in capsys.readouterr().err
