"""cluster/*.yaml pass the validation `ray up` runs (defaults filled in, then Ray's JSON schema and its checks), and
their start and setup commands do on a node what the docs say."""

from __future__ import annotations

import copy
import re
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
    (tmp_path / ".ray" / "auth_token").chmod(0o644)  # as rsync or a umask of 022 may leave it
    proc, calls = _run_start_commands(commands, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600  # no other user of the node reads it
    starts = [c for c in calls if " start " in c]
    assert starts and all(c.startswith("RAY_AUTH_MODE=token start ") for c in starts), calls
    if node == "head":
        assert all("--head" in c and "--dashboard-host=127.0.0.1" in c for c in starts), starts
    else:
        assert all("--address=10.0.0.10:6379" in c for c in starts), starts
    if name == "local.yaml" and node == "worker":  # after `ray start`: `ray down` leaves nothing (follow_head)
        assert calls[-1] == "python -m dcgan_dist.distributed.follow_head 10.0.0.10:6379", calls


def _run_setup(config: dict, node: str, home: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run a YAML's setup as Ray's updater does on a node (setup_commands, then the node's own, each in its own
    shell, stopping at the first failure), with stand-ins on PATH for sudo, mount, mountpoint (nothing mounted
    yet) and python3 (whose `-m venv DIR` makes a DIR/bin/pip): each records its arguments."""
    bin_dir, calls = home / "bin", home / "calls"
    bin_dir.mkdir(exist_ok=True)
    log = f'echo "$(basename "$0") $*" >> {calls}\n'
    pip = f'#!/bin/sh\necho "pip $*" >> {calls}\n'
    stand_ins = {
        "sudo": f"#!/bin/sh\n{log}",
        "mount": f"#!/bin/sh\n{log}",
        "mountpoint": f"#!/bin/sh\n{log}exit 1\n",
        "python3": f'#!/bin/sh\n{log}[ "$1 $2" = "-m venv" ] && mkdir -p "$3/bin" && '
                   f"printf '%s' '{pip}' > \"$3/bin/pip\" && chmod +x \"$3/bin/pip\"\n",
    }
    for name, text in stand_ins.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"HOME": str(home), "USER": "ubuntu", "PATH": f"{bin_dir}:/usr/bin:/bin"}
    proc = None
    for command in config["setup_commands"] + config[f"{node}_setup_commands"]:
        proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=30)
        if proc.returncode != 0:
            break
    return proc, calls.read_text().splitlines() if calls.exists() else []


def _with_nfs(config: dict, value: str) -> dict:
    """The config with DCGAN_NFS set as docs/cluster.md tells the user: its one assignment in setup_commands."""
    config = copy.deepcopy(config)
    [i] = [i for i, c in enumerate(config["setup_commands"]) if 'DCGAN_NFS="";' in c]
    config["setup_commands"][i] = config["setup_commands"][i].replace('DCGAN_NFS="";', f"{value};")
    return config


@pytest.mark.parametrize("node", ["head", "worker"])
def test_s3_only_setup_mounts_nothing_and_installs_the_project(node, tmp_path):
    """The YAML as shipped is the S3 user's: no shared file system, so no sudo and no mount, and the setup goes on
    to install the project (whose pyproject.toml pins Ray) into ~/venv."""
    proc, calls = _run_setup(_validated("gpu.yaml"), node, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not [c for c in calls if c.startswith(("sudo", "mount "))], calls
    assert f"pip install -q -e {tmp_path}/dcgan-dist" in calls, calls
    # Ray comes from the project's pin, not from a second spec of its own
    assert not [c for c in calls if c.startswith("pip") and "ray" in c], calls
    assert ("pip install -q boto3>=1.28" in calls) == (node == "head"), calls


def _documented_nfs() -> str:
    """The DCGAN_NFS line docs/cluster.md gives EFS users."""
    [line] = re.findall(r'^DCGAN_NFS="fs-[^"]+"$', (CLUSTER.parent / "docs" / "cluster.md").read_text(), re.M)
    return line


def test_efs_setup_mounts_the_file_system_the_docs_name(tmp_path):
    line = _documented_nfs()
    proc, calls = _run_setup(_with_nfs(_validated("gpu.yaml"), line), "worker", tmp_path)
    assert proc.returncode == 0, proc.stderr
    target = line.split("=", 1)[1].strip('"')
    mounts = [c for c in calls if c.startswith("sudo mount ")]
    assert mounts == [f"sudo mount -t nfs4 -o nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,"
                      f"noresvport {target} /mnt/dcgan"], calls
    assert "sudo chown ubuntu /mnt/dcgan" in calls and f"pip install -q -e {tmp_path}/dcgan-dist" in calls, calls


@pytest.mark.parametrize("placeholder", ['DCGAN_NFS="fs-CHANGE-ME.efs.us-west-2.amazonaws.com:/"',
                                         'DCGAN_NFS="fs-....efs.<region>.amazonaws.com:/"'])
def test_a_placeholder_file_system_is_a_one_line_error_naming_the_key(placeholder, tmp_path):
    proc, calls = _run_setup(_with_nfs(_validated("gpu.yaml"), placeholder), "head", tmp_path)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: DCGAN_NFS "), proc.stderr
    assert not [c for c in calls if c.startswith(("sudo", "mount ", "pip"))], calls


@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
def test_the_cluster_key_is_not_the_users_own(name):
    """Ray copies auth.ssh_private_key to the head as ~/ray_bootstrap_key.pem, readable by every job there: the
    shipped YAMLs never name a personal key (~/.ssh/id_*), and say why."""
    text = (CLUSTER / name).read_text()
    key = yaml.safe_load(text).get("auth", {}).get("ssh_private_key")
    assert key is None or not Path(key).name.startswith("id_"), key
    if key is not None:
        assert "ray_bootstrap_key.pem" in text and "never your personal one" in text
