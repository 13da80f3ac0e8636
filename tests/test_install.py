"""The package as users install it: a built wheel runs the main job from any folder, configs included."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

from doc_commands import documented, documented_shell, shell_env

ROOT = Path(__file__).resolve().parent.parent


def _wheel(tmp_path: Path) -> Path:
    # Built from a copy of what the wheel is made of: setuptools leaves build/ and egg-info beside the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("dcgan_dist", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # Without build isolation when setuptools is at hand (no index needed); else pip fetches the build backend.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", *isolation, "-q", "-w",
                    str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("dcgan_dist-*.whl")
    return wheel


def test_wheel_runs_the_main_job_from_another_folder(tmp_path):
    wheel = _wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert {"dcgan_dist/configs/mnist_local.yaml", "dcgan_dist/configs/lsun_bedroom_64.yaml",
            "dcgan_dist/train/__main__.py", "dcgan_dist/data/stream.py"} <= set(names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*args, **kw):
        return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, **kw)

    where = run("-c", "import dcgan_dist, dcgan_dist.config as c; print(dcgan_dist.__file__); print(c.CONFIG_DIR)")
    module_file, config_dir = where.stdout.split()
    assert module_file.startswith(str(site)) and config_dir == str(site / "dcgan_dist" / "configs")
    # The main job with the default config, only shrunk: shards and run directory land in this folder.
    r = run("-m", "dcgan_dist.train", "train.images=64", "train.batch_size=32", "model.ngf=8", "model.ndf=8",
            "data.loader_workers=0", "log.every_images=32", "log.sample_every_images=64",
            "log.checkpoint_every_images=32", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (work / "shards" / "mnist5k" / "manifest.json").exists()
    checkpoints = work / "runs" / "mnist_local" / "checkpoints"
    assert {p.name for p in checkpoints.glob("ckpt-*.pt")} == {"ckpt-000000000032.pt", "ckpt-000000000064.pt"}
    _documented_commands_on_the_run(work, env)
    # A shipped config by name: found (the bad key is reported, not a missing file).
    r = run("-m", "dcgan_dist.train", "--config", "lsun_bedroom_64", "train.bogus=1", timeout=120)
    assert r.returncode == 2 and "train.bogus" in r.stderr and "does not exist" not in r.stderr


def _documented_commands_on_the_run(work: Path, env: dict) -> None:
    """The documented commands that read the default run, as typed, in the folder it was made in: README's `sample`
    of the run directory draws from its newest checkpoint, TensorBoard serves the run's curves, and docs/evaluate.md's
    `features` finds the labelled shards through the checkpoint's relative data.shards."""
    sample = subprocess.run(["bash", "-c", documented_shell(
        "python -m dcgan_dist.sample runs/mnist_local --n 64 --out grid.png")], cwd=work, env=shell_env(env),
        capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0 and "wrote 64 samples of G_ema to grid.png" in sample.stdout, sample.stderr
    newest = subprocess.run([sys.executable, "-m", "dcgan_dist.sample", "runs/mnist_local/checkpoints/"
                             "ckpt-000000000064.pt", "--out", "newest.png"], cwd=work, env=env, timeout=300)
    assert newest.returncode == 0 and (work / "grid.png").read_bytes() == (work / "newest.png").read_bytes()

    board = subprocess.Popen(documented("tensorboard --logdir runs/mnist_local/tb", "--port", "0"), cwd=work,
                             env=shell_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # "TensorBoard 2.x at http://localhost:PORT/ (Press CTRL+C to quit)": --port 0 lets the OS choose the port.
        url, said = None, []
        while url is None:
            line = board.stderr.readline()
            assert line, f"tensorboard ended: {''.join(said)[-2000:]}"
            said.append(line)
            found = re.search(r"(http://\S+:\d+/)", line)
            url = found and found.group(1)
        deadline = time.monotonic() + 60
        while True:  # TensorBoard reads the event files in the background
            tags = json.loads(urllib.request.urlopen(f"{url}data/plugin/scalars/tags", timeout=10).read())
            if any("loss/D" in run for run in tags.values()):
                break
            assert time.monotonic() < deadline, tags
            time.sleep(0.5)
    finally:
        board.terminate()
        board.wait(timeout=30)

    features = subprocess.run(documented("python -m dcgan_dist.evaluate features runs/mnist_local --test-fraction 0.2",
                                         "--limit", "300", "--cs", "0.1", "--folds", "2"),
                              cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert features.returncode == 0 and "shards/mnist5k, the checkpoint's data.shards" in features.stderr, \
        features.stdout + features.stderr
    record = json.loads((work / "runs/mnist_local/eval/ckpt-000000000064/features.json").read_text())
    assert record["n_test"] == 60 and set(record["results"]) == {"trained_D", "random_D", "pixels"}
