"""Make the AWS resources that cluster/gpu.yaml names, before the first `ray up`; run it again after changing them.

    python cluster/aws_setup.py cluster/gpu.yaml

From the YAML's cluster_name, provider.region, provider.security_group.GroupName, the node types' IamInstanceProfile
names and provider.dcgan (bucket, run_prefix, ssh_cidr), it makes or brings up to date:
- the worker role and instance profile: read the bucket, write under s3://<bucket>/<run_prefix>, nothing else;
- the head role and instance profile: the same, plus what Ray's autoscaler calls to start and stop this cluster's
  nodes (instances tagged ray-cluster-name=<cluster_name>, launched with the worker profile only), iam:PassRole
  on the worker role only, and the SSM parameter of the AMI the YAML resolves;
- the nodes' security group in the region's default VPC: all traffic between the nodes, SSH from ssh_cidr only
  (any other inbound rule is removed). Ray, finding the group by name, leaves it as it is.

Ray's own defaults, which this replaces, give the head AmazonEC2FullAccess and AmazonS3FullAccess, the workers no
role at all, and open SSH to 0.0.0.0/0. Needs boto3 and credentials that may manage IAM roles and EC2 security
groups (AWS_PROFILE or `aws configure`).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys

import boto3
import yaml

TAG = "ray-cluster-name"  # the tag Ray's AWS node provider puts on every instance it launches
TRUST = {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


class SetupError(Exception):
    """A setting in the YAML that cannot be used; the message names the key."""


def settings(path: str) -> dict:
    """What this script needs from the cluster YAML, checked."""
    config = yaml.safe_load(open(path))
    provider, types = config["provider"], config["available_node_types"]
    ours = provider.get("dcgan") or {}
    head_type = config["head_node_type"]
    for key in ("bucket", "run_prefix", "ssh_cidr"):
        value = str(ours.get(key) or "")
        if not value or "CHANGE-ME" in value:
            raise SetupError(f"provider.dcgan.{key} in {path} is not set ({value or 'empty'}): "
                             f"see the comment beside it")
    try:
        cidr = ipaddress.ip_network(ours["ssh_cidr"], strict=False)
    except ValueError as err:
        raise SetupError(f"provider.dcgan.ssh_cidr in {path}: {err}") from None
    if cidr.prefixlen == 0:
        raise SetupError(f"provider.dcgan.ssh_cidr in {path} is {cidr}: that opens SSH to the whole internet; "
                         f"give your own address, e.g. 203.0.113.7/32")
    prefix = ours["run_prefix"].strip("/")
    if not prefix:
        raise SetupError(f"provider.dcgan.run_prefix in {path} is empty: the nodes would write the whole bucket")
    profiles = {}
    for name, node_type in types.items():
        profile = node_type["node_config"].get("IamInstanceProfile", {}).get("Name")
        if not profile:
            raise SetupError(f"available_node_types.{name}.node_config.IamInstanceProfile.Name in {path} is not set")
        profiles["head" if name == head_type else "worker"] = profile
    group = provider.get("security_group", {}).get("GroupName")
    if not group:
        raise SetupError(f"provider.security_group.GroupName in {path} is not set: Ray would make a group that "
                         f"opens SSH to the world")
    images = {t["node_config"]["ImageId"].removeprefix("resolve:ssm:") for t in types.values()
              if t["node_config"]["ImageId"].startswith("resolve:ssm:")}
    return dict(cluster=config["cluster_name"], region=provider["region"], bucket=ours["bucket"], prefix=prefix,
                ssh_cidr=str(cidr), profiles=profiles, group=group, ssm_parameters=sorted(images))


def storage_policy(s: dict) -> dict:
    """Every node: list and read the bucket (the shards), write and delete under the run prefix only."""
    bucket = f"arn:aws:s3:::{s['bucket']}"
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "ListBucket", "Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
         "Resource": bucket},
        {"Sid": "ReadBucket", "Effect": "Allow", "Action": "s3:GetObject", "Resource": f"{bucket}/*"},
        {"Sid": "WriteRuns", "Effect": "Allow",
         "Action": ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
         "Resource": f"{bucket}/{s['prefix']}/*"},
    ]}


def autoscaler_policy(s: dict, account: str, group_id: str, worker_role_arn: str, worker_profile_arn: str) -> dict:
    """The head: what Ray 2.60's AWS node provider calls (ray/autoscaler/_private/aws/node_provider.py), on this
    cluster's instances only."""
    ec2 = f"arn:aws:ec2:{s['region']}:{account}"
    ours = {"StringEquals": {f"aws:ResourceTag/{TAG}": s["cluster"]}}
    return {"Version": "2012-10-17", "Statement": [
        # Describe calls take no resource or tag conditions in IAM.
        {"Sid": "Describe", "Effect": "Allow", "Action": ["ec2:DescribeInstances", "ec2:DescribeInstanceTypes"],
         "Resource": "*"},
        # The instance itself: tagged as this cluster's at launch, with the worker profile.
        {"Sid": "LaunchInstances", "Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": f"{ec2}:instance/*",
         "Condition": {"StringEquals": {f"aws:RequestTag/{TAG}": s["cluster"],
                                        "ec2:InstanceProfile": worker_profile_arn}}},
        {"Sid": "LaunchInto", "Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": [f"{ec2}:volume/*", f"{ec2}:network-interface/*", f"{ec2}:subnet/*", f"{ec2}:key-pair/*",
                      f"{ec2}:security-group/{group_id}", f"arn:aws:ec2:{s['region']}::image/*"]},
        {"Sid": "TagAtLaunch", "Effect": "Allow", "Action": "ec2:CreateTags", "Resource": f"{ec2}:instance/*",
         "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}}},
        {"Sid": "ManageOwnNodes", "Effect": "Allow",
         "Action": ["ec2:CreateTags", "ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"],
         "Resource": f"{ec2}:instance/*", "Condition": ours},
        {"Sid": "PassWorkerRole", "Effect": "Allow", "Action": "iam:PassRole", "Resource": worker_role_arn,
         "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}},
    ] + [  # an ImageId of resolve:ssm:<parameter> is read by EC2 as the caller of RunInstances
        {"Sid": "ResolveImage", "Effect": "Allow", "Action": "ssm:GetParameters",
         "Resource": [f"arn:aws:ssm:{s['region']}::parameter{p}" for p in s["ssm_parameters"]]},
    ][:1 if s["ssm_parameters"] else 0]}


def ensure_role(iam, name: str, policies: dict[str, dict]) -> str:
    """A role and an instance profile, both called name, whose only permissions are these inline policies."""
    try:
        iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(TRUST),
                        Description="dcgan-dist cluster node (cluster/aws_setup.py)")
    except iam.exceptions.EntityAlreadyExistsException:
        iam.update_assume_role_policy(RoleName=name, PolicyDocument=json.dumps(TRUST))
    for attached in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]:
        iam.detach_role_policy(RoleName=name, PolicyArn=attached["PolicyArn"])
    for old in set(iam.list_role_policies(RoleName=name)["PolicyNames"]) - set(policies):
        iam.delete_role_policy(RoleName=name, PolicyName=old)
    for policy_name, document in policies.items():
        iam.put_role_policy(RoleName=name, PolicyName=policy_name, PolicyDocument=json.dumps(document))
    try:
        iam.create_instance_profile(InstanceProfileName=name)
    except iam.exceptions.EntityAlreadyExistsException:
        pass
    profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    if name not in [r["RoleName"] for r in profile["Roles"]]:
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    return profile["Arn"]


def ensure_group(ec2, s: dict) -> str:
    """The nodes' security group in the default VPC, with exactly two inbound rules."""
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise SetupError(f"provider.region {s['region']} has no default VPC, where `ray up` puts the nodes")
    vpc = vpcs[0]["VpcId"]
    found = ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]},
                                                  {"Name": "group-name", "Values": [s["group"]]}])["SecurityGroups"]
    if found:
        group = found[0]
        if group["IpPermissions"]:
            ec2.revoke_security_group_ingress(GroupId=group["GroupId"], IpPermissions=group["IpPermissions"])
        group_id = group["GroupId"]
    else:
        group_id = ec2.create_security_group(
            GroupName=s["group"], VpcId=vpc, Description=f"dcgan-dist cluster {s['cluster']}: SSH from "
            f"{s['ssh_cidr']} only",
            TagSpecifications=[{"ResourceType": "security-group", "Tags": [{"Key": TAG, "Value": s["cluster"]}]}],
        )["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id, "Description": "between the nodes"}]},
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
         "IpRanges": [{"CidrIp": s["ssh_cidr"], "Description": "SSH: provider.dcgan.ssh_cidr"}]},
    ])
    return group_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cluster_yaml", help="the cluster config, e.g. cluster/gpu.yaml")
    args = parser.parse_args(argv)
    try:
        s = settings(args.cluster_yaml)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    session = boto3.session.Session(region_name=s["region"])
    iam, ec2 = session.client("iam"), session.client("ec2")
    account = session.client("sts").get_caller_identity()["Account"]
    try:
        group_id = ensure_group(ec2, s)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    storage = storage_policy(s)
    worker = s["profiles"]["worker"]
    worker_profile = ensure_role(iam, worker, {"dcgan-storage": storage})
    worker_role = iam.get_role(RoleName=worker)["Role"]["Arn"]
    head = s["profiles"]["head"]
    ensure_role(iam, head, {"dcgan-storage": storage,
                            "dcgan-autoscaler": autoscaler_policy(s, account, group_id, worker_role, worker_profile)})
    print(f"instance profiles {head} (head) and {worker} (workers): s3://{s['bucket']} read, "
          f"s3://{s['bucket']}/{s['prefix']}/ written; security group {s['group']} ({group_id}): SSH from "
          f"{s['ssh_cidr']} only. Next: ray up {args.cluster_yaml}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
