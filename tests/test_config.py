"""Every shipped config loads; bad keys, types and values are errors that name the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from dcgan_dist import config

SHIPPED = sorted(config.CONFIG_DIR.glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"mnist_local.yaml", "lsun_bedroom_64.yaml", "faces_64.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = config.load(path)
    assert cfg.train.images > 0 and cfg.model.resolution in (32, 64, 128)


def test_paper_settings_in_lsun_config():
    cfg = config.load(config.CONFIG_DIR / "lsun_bedroom_64.yaml")
    assert (cfg.train.lr_d, cfg.train.lr_g, cfg.train.beta1, cfg.train.batch_size) == (2e-4, 2e-4, 0.5, 128)
    assert cfg.model.resolution == 64 and cfg.model.channels == 3


def test_overrides_apply():
    cfg = config.load(None, ["train.images=123", "model.kernel=5", "run_dir=/tmp/x"])
    assert cfg.train.images == 123 and cfg.model.kernel == 5 and cfg.run_dir == "/tmp/x"


@pytest.mark.parametrize("override, named", [
    (["train.imagez=5"], "imagez"),
    (["train.images=many"], "train.images"),
    (["model.resolution=48"], "model.resolution"),
    (["model.z_prior=cauchy"], "model.z_prior"),
    (["train.batch_size=0"], "train.batch_size"),
    (["nokey"], "nokey"),
])
def test_bad_overrides_name_the_key(override, named):
    with pytest.raises(config.ConfigError, match=named.replace(".", r"\.")):
        config.load(None, override)


def test_bad_yaml_key_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(config.ConfigError, match=r"bad\.yaml.*train\.lr"):
        config.load(bad)


def test_cli_exits_nonzero_naming_the_key(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dcgan_dist.train", "train.bogus=1", f"run_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "train.bogus" in r.stderr
    assert not list(Path(tmp_path).iterdir())  # nothing was written
