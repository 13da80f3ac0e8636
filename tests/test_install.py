"""The package as users install it: a built wheel runs the main job from any folder, configs included."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

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
            "data.num_workers=0", "log.every_images=32", "log.sample_every_images=64",
            "log.checkpoint_every_images=64", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (work / "shards" / "mnist5k" / "manifest.json").exists()
    assert (work / "runs" / "mnist_local" / "checkpoints" / "ckpt-000000000064.pt").exists()
    # A shipped config by name: found (the bad key is reported, not a missing file).
    r = run("-m", "dcgan_dist.train", "--config", "lsun_bedroom_64", "train.bogus=1", timeout=120)
    assert r.returncode == 2 and "train.bogus" in r.stderr and "does not exist" not in r.stderr
