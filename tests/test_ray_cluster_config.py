"""cluster/*.yaml pass the validation `ray up` runs (defaults filled in, then Ray's JSON schema and its checks)."""

from __future__ import annotations

import copy
import subprocess
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


def _run_start_commands(commands: list[str], home: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run a YAML's start commands in order as Ray's updater does (each in its own shell, stopping at the first
    failure), with a `ray` and a `python` on PATH that record how they were called: their arguments and
    RAY_AUTH_MODE (ray) or `python` (the follower of local.yaml's workers)."""
    bin_dir, calls = home / "bin", home / "ray-calls"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ray").write_text(f'#!/bin/sh\necho "RAY_AUTH_MODE=$RAY_AUTH_MODE $*" >> {calls}\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "python $*" >> {calls}\n')
    for tool in ("ray", "python"):
        (bin_dir / tool).chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin", "RAY_HEAD_IP": "10.0.0.10"}
    proc = None
    for command in commands:
        proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=30)
        if proc.returncode != 0:
            break
    return proc, calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
@pytest.mark.parametrize("node", ["head", "worker"])
def test_nodes_start_only_with_the_token_and_demand_it(name, node, tmp_path):
    """Token authentication that fails closed: without ~/.ray/auth_token a node refuses to start (Ray would
    start an open cluster), with it every `ray start` runs with RAY_AUTH_MODE=token; the head's dashboard
    listens on loopback only (users reach it through `ray dashboard`'s SSH tunnel)."""
    commands = _validated(name)[f"{node}_start_ray_commands"]
    proc, calls = _run_start_commands(commands, tmp_path)
    assert proc.returncode != 0 and "~/.ray/auth_token is missing" in proc.stderr, proc.stderr
    assert "ray get-auth-token --generate" in proc.stderr
    assert not any(" start " in c for c in calls), calls

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0" * 64)
    proc, calls = _run_start_commands(commands, tmp_path)
    assert proc.returncode == 0, proc.stderr
    starts = [c for c in calls if " start " in c]
    assert starts and all(c.startswith("RAY_AUTH_MODE=token start ") for c in starts), calls
    if node == "head":
        assert all("--head" in c and "--dashboard-host=127.0.0.1" in c for c in starts), starts
    else:
        assert all("--address=10.0.0.10:6379" in c for c in starts), starts
    if name == "local.yaml" and node == "worker":  # after `ray start`: `ray down` leaves nothing (follow_head)
        assert calls[-1] == "python -m dcgan_dist.distributed.follow_head 10.0.0.10:6379", calls
