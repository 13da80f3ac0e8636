"""One Ray: pyproject.toml pins it for the user's machine and for the cluster (cluster/*.yaml install the project),
and a job whose code pins another Ray than the one running it says so in one line naming both."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_the_cluster_installs_the_ray_that_pyproject_pins():
    pin = re.findall(r'^\s*"ray\[train,default\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert pin == [ray.__version__], pin  # this environment came from the same pin
    for name in ("gpu.yaml", "local.yaml"):
        setup = yaml.safe_load((ROOT / "cluster" / name).read_text())["setup_commands"]
        installs = [c for c in setup if "pip install" in c and "~/dcgan-dist" in c]
        assert installs and not [c for c in installs if "ray" in c.replace("~/dcgan-dist", "")], (name, installs)


def _checkout(tmp_path: Path, ray_pin: str) -> Path:
    """A copy of this checkout's code whose pyproject.toml pins ray_pin, as `ray job submit --working-dir .` ships
    a user's checkout to the head."""
    out = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("dcgan_dist", "configs"):
        shutil.copytree(ROOT / name, out / name, ignore=ignore)
    text = (ROOT / "pyproject.toml").read_text()
    (out / "pyproject.toml").write_text(text.replace(f'"ray[train,default]=={ray.__version__}"',
                                                     f'"ray[train,default]=={ray_pin}"'))
    return out


@pytest.mark.parametrize("pin", [ray.__version__, "2.61.0"])
def test_a_job_whose_code_pins_another_ray_says_so_naming_both(pin, tmp_path):
    """The README's cluster command, run from the checkout as the head's job driver runs it; the shards are absent,
    so it stops at the data check that follows the Ray checks."""
    checkout = _checkout(tmp_path, pin)
    proc = subprocess.run(
        [sys.executable, "-m", "dcgan_dist.train", "--config", "configs/lsun_bedroom_64.yaml",
         "trainer.num_workers=16", "trainer.use_gpu=true", f"data.shards={tmp_path}/none",
         f"run_dir={tmp_path}/run"], cwd=checkout, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "matches no shard" in proc.stderr, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "pins Ray" in line]
    if pin == ray.__version__:
        assert said == [], proc.stderr
    else:
        assert len(said) == 1 and f"Ray {ray.__version__} runs this" in said[0] and f"pins Ray {pin}" in said[0], \
            proc.stderr
