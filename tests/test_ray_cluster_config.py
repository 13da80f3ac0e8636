"""cluster/*.yaml pass the validation `ray up` runs (defaults filled in, then Ray's JSON schema and its checks)."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def _validated(name: str) -> dict:
    raw = yaml.safe_load((CLUSTER / name).read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _setup_text(config: dict) -> str:
    return "\n".join(config["setup_commands"])


def test_gpu_cluster_is_valid_with_a_head_and_gpu_workers():
    config = _validated("gpu.yaml")
    assert config["provider"]["type"] in ("aws", "gcp")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert len(gpu) == 1 and 0 <= gpu[0]["min_workers"] <= gpu[0]["max_workers"] <= config["max_workers"]
    setup = _setup_text(config)
    assert "DCGAN_NFS=" in setup and "/mnt/dcgan" in setup  # the shared storage the user names
    assert "pip install" in setup and "~/dcgan-dist" in setup and config["file_mounts"]["~/dcgan-dist"] == "."


def test_local_cluster_is_valid():
    config = _validated("local.yaml")
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
    assert "DCGAN_NFS=" in _setup_text(config) and "pip install" in _setup_text(config)


def test_validation_rejects_a_misspelt_key():
    """The check above is Ray's schema, not a formality: an unknown key fails it."""
    raw = yaml.safe_load((CLUSTER / "gpu.yaml").read_text())
    raw["max_worker"] = raw.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))
