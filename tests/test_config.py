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
    (["trainer.num_workers=2", "trainer.min_workers=3"], "trainer.min_workers: 3 is more than trainer.num_workers"),
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


def _numeric_keys():
    """Every int or float key of the schema, as section.name."""
    import dataclasses
    import typing

    keys = []
    for section in dataclasses.fields(config.Config):
        if not dataclasses.is_dataclass(section.default_factory if section.default_factory is not
                                        dataclasses.MISSING else None):
            continue
        hints = typing.get_type_hints(section.default_factory)
        for f in dataclasses.fields(section.default_factory):
            base = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
            if base[0] in (int, float) and base[0] is not bool:
                keys.append(f"{section.name}.{f.name}")
    return keys


def test_every_numeric_key_has_a_range_or_choices():
    keys = _numeric_keys()
    assert len(keys) > 30
    missing = [k for k in keys if k not in config.RANGES and k not in config.CHOICES]
    assert not missing, f"numeric keys without a range check: {missing}"


def _bad_value(key):
    if key in config.CHOICES:
        return 7
    bounds = config.RANGES[key]
    if bounds[0] == "<":
        return bounds[1]  # the excluded lower bound itself
    if bounds[-2:-1] == ("<",) or (len(bounds) == 3 and bounds[1] == "<"):
        return bounds[-1]  # the excluded upper bound itself
    return bounds[0] - 1


@pytest.mark.parametrize("key", sorted(set(config.RANGES) | {k for k in config.CHOICES if k != "eval.metric"}))
def test_every_key_rejects_a_bad_value_naming_it(key):
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.load(None, [f"{key}={_bad_value(key)}"])


def _too_big(key):
    bounds = config.RANGES[key]
    high = bounds[-1]
    return high if (len(bounds) == 4 or (len(bounds) == 3 and bounds[0] != "<")) else high * 2 + 1


@pytest.mark.parametrize("key", sorted(config.RANGES))
def test_every_size_has_an_upper_bound_that_is_enforced(key):
    """A config also comes out of checkpoints someone else made: no key may ask for unbounded memory or time."""
    assert config.RANGES[key][-1] is not None, f"{key} has no upper bound"
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.") + ": must be"):
        config.load(None, [f"{key}={_too_big(key)}"])


# Through the command line, three of the examples (the walk above covers every key through load()).
@pytest.mark.parametrize("override", ["train.lr_d=-1", "train.beta1=1.5", "data.loader_workers=-1"])
def test_cli_rejects_bad_values_with_status_2(override, tmp_path):
    r = subprocess.run([sys.executable, "-m", "dcgan_dist.train", override, f"run_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and override.split("=")[0] in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_config_error_exits_before_torch_is_loaded():
    """The command line reads the config before it imports the training modules: a typo costs no torch import."""
    code = ("import sys\nfrom dcgan_dist.train import cli\ntry:\n    cli.parse_args(['train.lr_d=-1'])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["2", "False"], r.stdout + r.stderr


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("train:\n  images: 10\nmodel: [1, 2\n")
    r = subprocess.run([sys.executable, "-m", "dcgan_dist.train", "--config", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "broken.yaml" in r.stderr and "line" in r.stderr and "not valid YAML" in r.stderr
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(config.ConfigError, match="mapping of sections"):
        config.load(listed)


def test_shipped_config_by_name():
    assert config.find("lsun_bedroom_64") == config.CONFIG_DIR / "lsun_bedroom_64.yaml"
    assert config.find("faces_64.yaml") == config.CONFIG_DIR / "faces_64.yaml"
    with pytest.raises(config.ConfigError, match="shipped configs: .*mnist_local"):
        config.find("no_such_config")


def test_an_elastic_group_restarts_after_a_lost_node_by_default():
    """trainer.max_failures unset: 3 restarts for an elastic group (losing a node is what it is for), none for a
    fixed one; an explicit value always wins."""
    from dcgan_dist.distributed.ray_launch import resolved

    def failures(*overrides: str) -> int:
        return resolved(config.load(None, ["trainer.num_workers=2", *overrides])).trainer.max_failures

    assert failures("trainer.min_workers=1") == 3
    assert failures() == 0 and failures("trainer.min_workers=2") == 0  # min == num: not elastic
    assert failures("trainer.min_workers=1", "trainer.max_failures=0") == 0
    assert failures("trainer.max_failures=5") == 5


def test_a_bucket_run_dir_is_refused_naming_the_key(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dcgan_dist.train", "run_dir=s3://my-bucket/runs/x"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "run_dir" in r.stderr and "storage_path" in r.stderr, r.stderr
    assert not (tmp_path / "s3:").exists()


def test_a_renamed_key_keeps_working_with_one_line_saying_so(tmp_path, capsys):
    """data.num_workers (loader processes per rank) read as trainer.num_workers (ranks): it is data.loader_workers
    now. The old name, in a config file or an override, still works, with one line on stderr; a checkpoint's or
    run's config written before the rename is read silently."""
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  num_workers: 5\n")
    assert config.load(old, []).data.loader_workers == 5
    assert config.load(None, ["data.num_workers=3"]).data.loader_workers == 3
    said = capsys.readouterr().err.splitlines()
    assert said == [f"dcgan_dist: {old}: data.num_workers is now data.loader_workers (the old name still works)",
                    "dcgan_dist: override: data.num_workers is now data.loader_workers (the old name still works)"]
    written = config.to_dict(config.load(None, []))
    written["data"]["num_workers"] = written["data"].pop("loader_workers")
    assert config.from_dict(written).data.loader_workers == 1 and capsys.readouterr().err == ""  # mnist_local's
