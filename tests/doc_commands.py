"""The shell commands that README.md and docs/*.md give, and the one table of those no test runs as written.

The commands are those of ```bash, ```sh, ```shell and ```console blocks (also fenced at an indent inside list
items) and of indented code blocks; continuation lines are joined by one space, comment lines and trailing
`# comments` dropped, and `cmd1 && cmd2` stays one command. A test that runs one takes it from here by its literal
text: `documented("python -m ...", *more)` for an argv, `documented_shell(...)` for a `bash -c` line (shell
syntax: `&&`, variables, globs), `exported(...)` for the variable an `export NAME=VALUE` line sets, and
`every_command_in("docs/x.md")` for a test that runs all of one document's commands in order. Arguments appended
after the command may only shrink the run. tests/test_doc_commands.py reads those calls out of every tests/*.py
with `ast` and fails on a documented command that is neither run so nor in NOT_RUN, and on an entry of either
that no document writes any more.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}  # fenced blocks with these info strings hold commands
FENCE = re.compile(r"^( *)(`{3,}|~{3,})\s*([^\s`]*)")
LIST_ITEM = re.compile(r"^( *)([-*+]|\d{1,9}[.)])( +|$)")

# Documented commands that no test runs as written: why not here, and what checks them instead (naming the test).
NOT_RUN = {
    # README.md
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python -m dcgan_dist.train":
        "a new venv and `pip install` of torch, Ray and the rest from the package index: network and minutes, and "
        "the full default run is 5-9 minutes of 2 cores; tests/test_install.py installs the built wheel and runs "
        "its last part, `python -m dcgan_dist.train` with sizes appended, from another folder",
    'pip install -e ".[dev]" && python -m pytest -q':
        "the whole suite (about 10 minutes) plus an install from the index: it is what CI's .ci/run runs; a test "
        "inside the suite running the suite would recurse",
    "python -m dcgan_dist.train --config configs/lsun_bedroom_64.yaml train.images=3000000 data.loader_workers=8":
        "needs LSUN bedroom shards at shards/lsun_bedroom (about 3 M images) and a GPU-sized run; "
        "tests/test_ray_version.py runs `--config configs/lsun_bedroom_64.yaml` from a checkout up to the data "
        "check, tests/test_gpu.py trains that config through the CLI on CUDA",
    "python -m dcgan_dist.shard /data/bedroom_train_lmdb shards/lsun_bedroom --resolution 64 --dedup semantic "
    "--workers 16":
        "needs LSUN's bedroom_train_lmdb (/data, 3 M images); tests/test_shard.py "
        "(test_lsun_lmdb_through_the_command_line[readme-flags]) runs these options on a 30-image LMDB it makes",
    "python -m dcgan_dist.shard /data/img_align_celeba shards/celeba --resolution 64 --workers 16":
        "needs CelebA's img_align_celeba (/data); tests/test_shard.py runs the folder source through the CLI",
    "python -m dcgan_dist.shard /data/people_photos shards/faces --faces --workers 16":
        "needs a folder of photographs of people (/data); tests/test_shard_faces.py runs --faces on faces it draws",
    "python benchmarks/train_step.py":
        "a benchmark: 64x64 batch-128 steps, minutes of 2 cores (shrunk, --resolution 32 --batch 8 --steps 2 "
        "--warmup 1, still 15 s of CPU); no test runs it",
    "python benchmarks/gpu_throughput.py":
        "a benchmark, minutes on the CPU; benchmarks/gpu_run.sh runs it on a GPU; no test runs it",
    "python benchmarks/sample_quality.py runs/mnist_local/checkpoints/ckpt-*.pt":
        "needs the full default run (5-9 minutes) for a meaningful score, and its judge CNN's fit on 4,500 digits "
        "alone took 114 s of CPU (238 s on the shared 2 cores); it scores every checkpoint the glob gives (nargs "
        "'+', one judge). No test runs it (tests/test_evaluate.py tests the same judge through `evaluate coverage`)",
    "python benchmarks/shard_throughput.py":
        "a benchmark: 3,000 images three times through both tools, minutes of 2 cores; no test runs it "
        "(tests/test_shard.py tests the tool it measures)",
    "python benchmarks/scaling.py":
        "a benchmark: process groups of 1 and 2 workers, four variants each, minutes; no test runs it "
        "(tests/test_ddp.py tests DDP, SyncBN and gradient compression)",
    "python benchmarks/remote_read.py":
        "a benchmark: starts HTTP and moto S3 servers and reads MNIST-5k three times each way; no test runs it "
        "(tests/test_remote.py tests those reads)",
    "python benchmarks/resume_cost.py":
        "a benchmark: 20,000 64x64 images read and resumed three times, minutes; no test runs it "
        "(tests/test_checkpoint.py and tests/test_survival.py test the resume)",
    # docs/cluster.md
    "pip install -e . boto3":
        "an install from the package index (network); tests/test_install.py tests the package as installed",
    "aws configure":
        "interactive, and asks for real AWS credentials; no test",
    "ray up cluster/gpu.yaml":
        "launches EC2 instances (AWS, money); tests/test_aws_launch.py runs Ray's AWS bootstrap and node provider "
        "on cluster/gpu.yaml against moto, tests/test_ray_cluster_config.py validates the YAML as `ray up` does",
    "ray exec cluster/gpu.yaml \"python -m dcgan_dist.shard /mnt/dcgan/raw/bedroom_train_lmdb "
    "/mnt/dcgan/shards/lsun_bedroom --dedup semantic\"":
        "needs the AWS cluster and LSUN on its NFS; tests/test_shard.py runs the LMDB source with --dedup semantic",
    "ray dashboard cluster/gpu.yaml":
        "needs the AWS cluster; tests/test_ray_up.py tunnels `ray dashboard` to a cluster of test hosts made from "
        "cluster/local.yaml",
    "ray job submit --working-dir . --runtime-env-json '{\"env_vars\": {\"RAY_JOB_STOP_WAIT_TIME_S\": \"300\"}}' "
    "-- python -m dcgan_dist.train --config configs/lsun_bedroom_64.yaml trainer.num_workers=16 "
    "trainer.use_gpu=true data.shards=s3://my-bucket/lsun_bedroom/ trainer.storage_path=s3://my-bucket/runs "
    "run_dir=/home/ubuntu/runs/lsun_bedroom_64":
        "16 GPUs on AWS and LSUN shards in a bucket; tests/test_ray_up.py submits this form (--config "
        "configs/mnist_local.yaml, 3 CPU workers, paths on the hosts' shared /var/tmp) across three test hosts, "
        "tests/test_remote.py trains from a moto S3 bucket",
    "ray job submit --working-dir . --runtime-env-json '{\"env_vars\": {\"RAY_JOB_STOP_WAIT_TIME_S\": \"300\"}}' "
    "-- python -m dcgan_dist.train --config configs/lsun_bedroom_64.yaml trainer.num_workers=16 "
    "trainer.use_gpu=true data.shards=/mnt/dcgan/shards/lsun_bedroom run_dir=/mnt/dcgan/runs/lsun_bedroom_64 "
    "trainer.storage_path=s3://my-bucket/runs":
        "16 GPUs on AWS, EFS and a bucket; tests/test_ray_up.py submits this form on three test hosts (see above)",
    "aws s3 sync s3://my-bucket/runs/lsun_bedroom_64 ./lsun_bedroom_64":
        "AWS's own tool and a real bucket; no test",
    "python cluster/aws_setup.py cluster/gpu.yaml":
        "makes IAM roles and a security group on AWS; tests/test_aws_launch.py runs this script against moto's "
        "EC2/IAM/STS on a copy of cluster/gpu.yaml with provider.dcgan filled in (the user's edit)",
    "ray exec cluster/gpu.yaml \"tensorboard --logdir /mnt/dcgan/runs --port 6006\" --port-forward 6006":
        "needs the AWS cluster; tests/test_install.py runs README's `tensorboard --logdir` on a real run",
    "ray rsync-down cluster/gpu.yaml /mnt/dcgan/runs/lsun_bedroom_64/samples ./samples":
        "needs the AWS cluster; no test",
    "ray down cluster/gpu.yaml":
        "needs the AWS cluster; tests/test_ray_up.py runs `ray down -y` on the test hosts' cluster",
    "ray up -y cluster/local.yaml":
        "needs machines of yours: tests/test_ray_up.py runs `ray up -y` on cluster/local.yaml overlaid with the "
        "test hosts' addresses and SSH login, written to a temporary file (plus --no-config-cache)",
    "ray dashboard cluster/local.yaml":
        "tests/test_ray_up.py runs it on the overlaid copy of cluster/local.yaml (the test hosts' addresses)",
    "ray job submit --working-dir . --runtime-env-json '{\"env_vars\": {\"RAY_JOB_STOP_WAIT_TIME_S\": \"300\"}}' "
    "-- python -m dcgan_dist.train --config configs/lsun_bedroom_64.yaml trainer.num_workers=3 "
    "trainer.use_gpu=true data.shards=/mnt/dcgan/shards/lsun_bedroom run_dir=/mnt/dcgan/runs/lsun_bedroom_64 "
    "trainer.storage_path=/mnt/dcgan/ray":
        "3 GPU machines with NFS; tests/test_ray_up.py submits it with --submission-id, --config "
        "configs/mnist_local.yaml, CPU workers and the hosts' shared /var/tmp paths, one rank per test host",
    "ray down -y cluster/local.yaml":
        "tests/test_ray_up.py runs it on the overlaid copy of cluster/local.yaml and checks nothing is left",
    "ray job submit --working-dir . --runtime-env-json '{\"env_vars\": {\"RAY_JOB_STOP_WAIT_TIME_S\": \"300\"}}' "
    "-- python -m dcgan_dist.train --config configs/lsun_bedroom_64.yaml trainer.num_workers=16 "
    "trainer.min_workers=8 trainer.use_gpu=true data.shards=s3://my-bucket/lsun_bedroom/ "
    "trainer.storage_path=s3://my-bucket/runs run_dir=/home/ubuntu/runs/lsun_bedroom_64":
        "16 GPUs on AWS and a bucket; tests/test_ray.py (elastic group, preemption) and tests/test_hosts.py (a host lost) run "
        "elastic groups with trainer.min_workers on CPUs",
    "ray drain-node --address <head>:6379 --node-id <this node's ID> --reason DRAIN_NODE_REASON_PREEMPTION "
    "--reason-message \"spot interruption\" --deadline-remaining-seconds 120":
        "a template (<head>, <this node's ID>); tests/test_ray.py runs `ray drain-node` with these options and "
        "--deadline-remaining-seconds 20 on a node of a two-node cluster",
    # docs/evaluate.md
    "python -m dcgan_dist.evaluate COMMAND CHECKPOINT [options]":
        "a synopsis, not a command; tests/test_evaluate.py runs every command",
    "python -m dcgan_dist.evaluate arithmetic RUN --sheet 64 --expr \"3,17,22 - 5,9,11 + 1,2,40\"":
        "RUN stands for a run; tests/test_evaluate.py runs `arithmetic --sheet --expr` in-process on a run it "
        "trains",
    "python -m dcgan_dist.evaluate features RUN --shards TRAIN_SHARDS --test-shards TEST_SHARDS --train-size 1000":
        "placeholders; tests/test_evaluate.py runs `features --shards --train-size` in-process",
    "python -m dcgan_dist.evaluate features RUN --shards shards/svhn-train --test-shards shards/svhn-test "
    "--train-size 1000 --cs 0.001,0.01,0.1,1":
        "needs SVHN shards (not here); tests/test_evaluate.py runs `features` with --cs in-process on MNIST",
    "python -m dcgan_dist.evaluate fid RUN --inception-weights pt_inception-2015-12-05-6726825d.pth --n 10000":
        "needs the Inception weights file (not shipped, no network); tests/test_evaluate.py runs `fid` in-process "
        "with a random Inception saved in that format",
    "python -m dcgan_dist.evaluate kid RUN --inception-weights pt_inception-2015-12-05-6726825d.pth --n 10000":
        "needs the Inception weights file; tests/test_evaluate.py runs `kid` in-process with a random Inception",
    "python -m dcgan_dist.evaluate pr RUN --inception-weights pt_inception-2015-12-05-6726825d.pth --n 10000":
        "needs the Inception weights file; tests/test_evaluate.py runs `pr` in-process with a random Inception",
    "torchrun --nproc_per_node 8 -m dcgan_dist.evaluate fid RUN --inception-weights "
    "pt_inception-2015-12-05-6726825d.pth --num-samples 50000":
        "8 GPUs and the Inception weights; tests/test_evaluate.py runs `torchrun --nproc_per_node 2 -m "
        "dcgan_dist.evaluate fid` on CPUs with a random Inception and checks the score equals one process's",
    # docs/object_storage.md
    "python -m dcgan_dist.shard /data/bedroom_train_lmdb shards/lsun_bedroom --dedup semantic --workers 32":
        "needs LSUN's bedroom_train_lmdb; tests/test_shard.py runs the LMDB source with --dedup semantic",
    "aws s3 sync shards/lsun_bedroom s3://my-bucket/lsun_bedroom/ --exclude \".progress/*\"":
        "AWS's own tool and a real bucket; no test (tests/test_remote.py reads shards from a moto S3 server)",
    "python -m dcgan_dist.shard /data/bedroom_train_lmdb s3://my-bucket/lsun_bedroom --dedup semantic --workers 32":
        "LSUN and a real bucket; tests/test_remote.py runs the shard tool writing to a moto S3 bucket, killed and "
        "resumed",
    "ray job submit --working-dir . --runtime-env-json '{\"env_vars\": {\"RAY_JOB_STOP_WAIT_TIME_S\": \"300\"}}' "
    "-- python -m dcgan_dist.train --config configs/lsun_bedroom_64.yaml "
    "data.shards=s3://my-bucket/lsun_bedroom/ trainer.num_workers=8 trainer.use_gpu=true "
    "trainer.storage_path=s3://my-bucket/runs run_dir=/home/ubuntu/runs/lsun_bedroom_64":
        "8 GPUs on AWS and LSUN in a bucket; tests/test_remote.py trains from a moto S3 bucket, tests/test_ray.py "
        "submits jobs to a CPU cluster",
    "python -m dcgan_dist.shard /data/people_photos s3://my-bucket/faces --faces --dedup exact --workers 32":
        "photographs of people and a real bucket; tests/test_shard_faces.py runs --faces, tests/test_remote.py "
        "writes shards to a moto bucket",
    "ray job submit --working-dir . --runtime-env-json '{\"env_vars\": {\"RAY_JOB_STOP_WAIT_TIME_S\": \"300\"}}' "
    "-- python -m dcgan_dist.train --config configs/faces_64.yaml "
    "data.shards=s3://my-bucket/faces/ trainer.num_workers=8 trainer.use_gpu=true "
    "trainer.storage_path=s3://my-bucket/runs run_dir=/home/ubuntu/runs/faces_64":
        "8 GPUs on AWS and faces in a bucket; tests/test_config.py loads configs/faces_64.yaml, tests/test_ray.py "
        "submits jobs to a CPU cluster",
}


def strip_comment(line: str) -> str:
    """`line` without a trailing shell comment: a `#` outside quotes at the start or after whitespace."""
    quote, escaped = "", False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number of its first line, language, lines) of each code block: fenced (the info string's first word,
    lowercased, as language; at any indent inside list items) and indented (language "indented")."""
    lines, found, items = text.splitlines(), [], []  # items: content columns of the open list items
    i, after_blank = 0, True
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            after_blank, i = True, i + 1
            continue
        indent = len(line) - len(line.lstrip(" "))
        item = LIST_ITEM.match(line)
        if after_blank or item:  # a blank line (or a new item) closes the items this line is not inside
            while items and indent < items[-1]:
                items.pop()
        base = items[-1] if items else 0
        fence = FENCE.match(line)
        if fence and indent < base + 4:
            mark = fence.group(2)
            close = re.compile(rf"^ *{re.escape(mark[0])}{{{len(mark)},}}\s*$")
            body, i = [], i + 1
            while i < len(lines) and not close.match(lines[i]):
                body.append(lines[i][min(indent, len(lines[i]) - len(lines[i].lstrip(" "))):])
                i += 1
            found.append((i - len(body) + 1, fence.group(3).lower(), body))
            after_blank, i = False, i + 1
            continue
        if after_blank and indent >= base + 4:
            start, body = i, []
            while i < len(lines) and (not lines[i].strip() or
                                      len(lines[i]) - len(lines[i].lstrip(" ")) >= base + 4):
                body.append(lines[i][base + 4:])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            found.append((start + 1, "indented", body))
            after_blank = True
            continue
        if item:
            items.append(len(item.group(0)))
        after_blank, i = False, i + 1
    return found


def block_commands(language: str, lines: list[str]) -> list[tuple[int, str]]:
    """(index of its first line, command) for the commands of one shell block: continuation lines joined by one
    space, comments dropped; in a console block only the `$ ` lines (and their continuations) are commands, the
    rest is output."""
    commands, pending, first = [], None, 0
    for index, raw in enumerate(lines):
        line = raw.strip()
        if pending is None and language == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:].strip()
        line = strip_comment(line)
        if pending is not None:
            line = f"{pending} {line}" if line else pending
        else:
            first = index
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending = line[:-1].rstrip()
            continue
        pending = None
        if line:
            commands.append((first, line))
    if pending:
        commands.append((first, pending))
    return commands


def commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) for every command of the text's shell blocks, fenced or indented."""
    return [(start + index, command) for start, language, body in blocks(text)
            if language in SHELL_LANGUAGES or language == "indented"
            for index, command in block_commands(language, body)]


def documents() -> list[Path]:
    """README.md and docs/*.md."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@functools.lru_cache(maxsize=None)
def documented_commands() -> dict[str, list[str]]:
    """Every documented command -> where it is written ("docs/x.md:LINE")."""
    where: dict[str, list[str]] = {}
    for doc in documents():
        for line, command in commands(doc.read_text()):
            where.setdefault(command, []).append(f"{doc.relative_to(REPO)}:{line}")
    return where


def _check(command: str) -> None:
    assert command in documented_commands(), (
        f"no document writes the command {command!r} (README.md, docs/*.md): the test runs something the docs "
        f"no longer give; run what they give now, or drop the test")


def program(name: str) -> str:
    """A command's program as the project's activated environment finds it: its bin folder first."""
    if name in ("python", "python3"):
        return sys.executable
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def documented(command: str, *appended: str) -> list[str]:
    """The argv of a command README.md or docs/*.md writes (its exact text), with `appended` after it."""
    _check(command)
    argv = shlex.split(command)
    needs_shell = "=" in argv[0] or {"&&", "||", "|", ";", ">"} & set(argv) or re.search(r"[*?$`]|^~", command)
    assert not needs_shell, f"{command!r} needs a shell (or may: a glob, a variable): use documented_shell"
    return [program(argv[0]), *argv[1:], *appended]


def documented_shell(command: str, *appended: str) -> str:
    """A documented command (its exact text) with `appended` after it, for `bash -c` with shell_env()."""
    _check(command)
    return " ".join([command, *map(shlex.quote, appended)])


def exported(command: str) -> dict[str, str]:
    """{NAME: VALUE} of a documented `export NAME=VALUE` (its exact text), for a test's environment."""
    _check(command)
    argv = shlex.split(command)
    assert argv[0] == "export" and len(argv) == 2 and "=" in argv[1], f"{command!r} is not one export"
    name, value = argv[1].split("=", 1)
    return {name: value}


def every_command_in(doc: str) -> list[str]:
    """Every command of one document (e.g. "docs/loader.md"), in order, for a test that runs them all as written:
    each then counts as run by that test."""
    return [command for _, command in commands((REPO / doc).read_text())]


def shell_env(env: dict | None = None) -> dict:
    """`env` (default: this process's) with the project's environment first on PATH, as after its activation."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
