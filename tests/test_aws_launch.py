"""The AWS launch of cluster/gpu.yaml as far as it goes without AWS: the user's steps of docs/cluster.md against
moto's server on 127.0.0.1 (fill in provider.dcgan, `python cluster/aws_setup.py cluster/gpu.yaml`), then Ray's own
AWS bootstrap (what `ray up` runs before it launches anything) and Ray's AWS node provider launching a head and a
GPU node as the launcher and the autoscaler do; checked: the IAM roles, the security group and the instances."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import pytest
import yaml
from ray.autoscaler._private.aws import config as aws_config
from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
from ray.autoscaler._private.commands import _bootstrap_config

ROOT = Path(__file__).resolve().parent.parent
BUCKET, SSH_FROM = "dcgan-shards", "203.0.113.7/32"
REGION = "us-west-2"


@pytest.fixture(scope="module")
def endpoint():
    """moto's server (EC2, IAM, STS, SSM) on 127.0.0.1, with AWS's managed policies loaded as Ray's defaults
    attach them; yields its URL."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
        server.stop()


@pytest.fixture
def aws(endpoint, tmp_path, monkeypatch):
    """A fresh moto account, this process and its children pointed at it, HOME in tmp_path (Ray writes the key
    pair it makes to ~/.ssh); yields the environment for subprocesses."""
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).read()
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "HOME": str(tmp_path)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(aws_config.time, "sleep", lambda s: None)  # Ray's waits for IAM propagation
    return {**os.environ, **env}


def _user_yaml(tmp_path: Path, ssh_cidr: str = SSH_FROM) -> Path:
    """cluster/gpu.yaml with provider.dcgan filled in, as the docs tell the user."""
    text = (ROOT / "cluster" / "gpu.yaml").read_text()
    for old, new in ((" bucket: CHANGE-ME ", f" bucket: {BUCKET} "),
                     (" ssh_cidr: CHANGE-ME ", f" ssh_cidr: {ssh_cidr} ")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "gpu.yaml"
    path.write_text(text)
    return path


def _aws_setup(path: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cluster/aws_setup.py", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _bootstrap(path: Path) -> dict:
    """What `ray up` does with the YAML before it launches anything (defaults, the node types' resources from EC2,
    validation, Ray's AWS bootstrap), by the function `ray up` calls."""
    return _bootstrap_config(yaml.safe_load(path.read_text()), no_config_cache=True)


def _launch(config: dict) -> dict[str, dict]:
    """A head as `ray up` launches it (its node type's config plus config["head_node"]) and a GPU node as the
    autoscaler does, through Ray's AWS node provider; their EC2 descriptions by node type."""
    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    ec2 = boto3.client("ec2", region_name=REGION)
    out = {}
    for kind in ("head", "gpu_worker"):
        node_config = copy.deepcopy(config["available_node_types"][kind]["node_config"])
        if kind == config["head_node_type"]:
            node_config.update(config["head_node"])
        [instance_id] = provider.create_node(node_config, {"ray-node-type": "head" if kind == "head" else "worker",
                                                           "ray-user-node-type": kind}, 1)
        [reservation] = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        out[kind] = reservation["Instances"][0]
    return out


def _statements(iam, role: str) -> list[dict]:
    return [s for name in iam.list_role_policies(RoleName=role)["PolicyNames"]
            for s in iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]["Statement"]]


def _listed(value) -> list:
    return value if isinstance(value, list) else [value]


def test_launch_gives_each_node_its_least_privilege_and_ssh_from_the_users_address_only(aws, tmp_path):
    path = _user_yaml(tmp_path)
    for _ in range(2):  # the docs say to run it again after a change: a second run brings the same state
        proc = _aws_setup(path, aws)
        assert proc.returncode == 0, proc.stderr
    assert "Next: ray up" in proc.stdout, proc.stdout
    config = _bootstrap(path)
    iam, ec2 = boto3.client("iam"), boto3.client("ec2", region_name=REGION)

    # Ray made no role of its own (its default has AmazonEC2FullAccess and AmazonS3FullAccess) and no group.
    roles = {r["RoleName"]: r for r in iam.list_roles()["Roles"]}
    assert set(roles) == {"dcgan-head", "dcgan-worker"}, sorted(roles)
    assert "IamInstanceProfile" not in config["head_node"]
    for role in roles:
        assert iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == []
    [group] = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["dcgan-nodes"]}])[
        "SecurityGroups"]
    assert not ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["ray-autoscaler-dcgan"]}])[
        "SecurityGroups"]

    # Every node: read the bucket, write under the run prefix, nothing else.
    worker = _statements(iam, "dcgan-worker")
    assert all(a.startswith("s3:") for s in worker for a in _listed(s["Action"])), worker
    writes = [s for s in worker if {"s3:PutObject", "s3:DeleteObject"} & set(_listed(s["Action"]))]
    assert [r for s in writes for r in _listed(s["Resource"])] == [f"arn:aws:s3:::{BUCKET}/runs/*"], writes
    assert all(r.startswith(f"arn:aws:s3:::{BUCKET}") for s in worker for r in _listed(s["Resource"])), worker

    # The head: the same, and starting and stopping this cluster's instances only, passing the worker role only.
    head = _statements(iam, "dcgan-head")
    assert not [a for s in head for a in _listed(s["Action"]) if "*" in a], head
    assert not [s for s in head if s["Resource"] == "*" and not all(
        a.startswith("ec2:Describe") for a in _listed(s["Action"]))], head
    by_action: dict[str, list[dict]] = {}
    for s in head:
        for a in _listed(s["Action"]):
            by_action.setdefault(a, []).append(s)
    worker_role = roles["dcgan-worker"]["Arn"]
    assert [s["Resource"] for s in by_action["iam:PassRole"]] == [worker_role]
    assert set(by_action) - {"iam:PassRole"} <= {
        "ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:RunInstances", "ec2:CreateTags",
        "ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances", "ssm:GetParameters",
        *{a for s in worker for a in _listed(s["Action"])}}, sorted(by_action)
    for action in ("ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"):
        [s] = by_action[action]
        assert s["Condition"] == {"StringEquals": {"aws:ResourceTag/ray-cluster-name": "dcgan"}}, s
    [launch] = [s for s in by_action["ec2:RunInstances"] if _listed(s["Resource"])[0].endswith(":instance/*")]
    profile = iam.get_instance_profile(InstanceProfileName="dcgan-worker")["InstanceProfile"]["Arn"]
    assert launch["Condition"] == {"StringEquals": {"aws:RequestTag/ray-cluster-name": "dcgan",
                                                    "ec2:InstanceProfile": profile}}, launch
    [into] = [s for s in by_action["ec2:RunInstances"] if s is not launch]
    assert [r for r in into["Resource"] if ":security-group/" in r] == [
        f"arn:aws:ec2:{REGION}:123456789012:security-group/{group['GroupId']}"], into

    # SSH from the user's address only; everything between the nodes (NFS included).
    def rules(permissions: list[dict]) -> list[str]:
        return sorted(json.dumps(p, sort_keys=True) for p in permissions)

    assert rules(group["IpPermissions"]) == rules([
        {"IpProtocol": "-1", "IpRanges": [], "Ipv6Ranges": [], "PrefixListIds": [],
         "UserIdGroupPairs": [{"GroupId": group["GroupId"], "UserId": "123456789012",
                               "Description": "between the nodes"}]},
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "Ipv6Ranges": [], "PrefixListIds": [],
         "UserIdGroupPairs": [], "IpRanges": [{"CidrIp": SSH_FROM, "Description": "SSH: provider.dcgan.ssh_cidr"}]},
    ])

    # The instances as launched: each its own profile, the group, IMDSv2 only, tagged as this cluster's.
    launched = _launch(config)
    for kind, profile_name in (("head", "dcgan-head"), ("gpu_worker", "dcgan-worker")):
        instance = launched[kind]
        assert instance["IamInstanceProfile"]["Arn"].endswith(f":instance-profile/{profile_name}"), instance
        assert [g["GroupId"] for g in instance["SecurityGroups"]] == [group["GroupId"]]
        assert instance["MetadataOptions"]["HttpTokens"] == "required", instance["MetadataOptions"]
        assert {"Key": "ray-cluster-name", "Value": "dcgan"} in instance["Tags"]


def test_aws_setup_repairs_the_group_a_ray_up_without_it_opened_to_the_world(aws, tmp_path):
    """A user who ran `ray up` before the setup: Ray made the group by the YAML's name and opened SSH to
    0.0.0.0/0 (the head then failed: no instance profile). The setup leaves the user's address only."""
    path = _user_yaml(tmp_path)
    config = _bootstrap(path)
    [before] = ec2_groups = boto3.client("ec2", region_name=REGION).describe_security_groups(
        Filters=[{"Name": "group-name", "Values": ["dcgan-nodes"]}])["SecurityGroups"]
    assert config["available_node_types"]["head"]["node_config"]["SecurityGroupIds"] == [before["GroupId"]]
    assert any(r["CidrIp"] == "0.0.0.0/0" for p in before["IpPermissions"] for r in p["IpRanges"]), ec2_groups

    proc = _aws_setup(path, aws)
    assert proc.returncode == 0, proc.stderr
    [after] = boto3.client("ec2", region_name=REGION).describe_security_groups(
        GroupIds=[before["GroupId"]])["SecurityGroups"]
    assert [r["CidrIp"] for p in after["IpPermissions"] for r in p["IpRanges"]] == [SSH_FROM], after


@pytest.mark.parametrize("edit, key", [(None, "provider.dcgan.bucket"), ("0.0.0.0/0", "provider.dcgan.ssh_cidr")])
def test_aws_setup_refuses_a_placeholder_or_the_whole_internet_naming_the_key(aws, tmp_path, edit, key):
    path = ROOT / "cluster" / "gpu.yaml" if edit is None else _user_yaml(tmp_path, ssh_cidr=edit)
    proc = _aws_setup(path, aws)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {key} in ") and \
        len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert boto3.client("iam").list_roles()["Roles"] == []
