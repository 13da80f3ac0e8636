"""Safe with what others hand you (issue 33, finding 7), through the commands users type: a manifest's
percent-encoded '..' never reaches a web server, evaluate never writes through a link planted at an output's
name, and a `pipe:` command that a loader worker starts ends on SIGTERM and SIGINT. (Two trainers on one run
directory, SIGHUP and a killed writer's temporaries: tests/test_survival.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from PIL import Image

from dcgan_dist.data.manifest import MANIFEST
from helpers import FileSite
from tiny_run import train_cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_a_manifest_name_that_escapes_once_percent_decoded_is_refused(mnist_shards, tmp_path):
    """`%2e%2e/x.tar` passed the '..' check and the HTTP client normalised it to /x.tar, outside the set."""
    entry = {"name": "%2e%2e/x.tar", "count": 500}
    # A shard set under /set/ and, outside it, /x.tar.
    with FileSite({"/set/" + MANIFEST: json.dumps({"shards": [entry], "total": 500}).encode(),
                   "/x.tar": (mnist_shards / "mnist5k-000000.tar").read_bytes()}) as site:
        manifest = f"{site.url}set/{MANIFEST}"
        r = train_cli(tmp_path / "run", manifest.removesuffix(MANIFEST), "train.device=cpu", "data.loader_workers=0",
                      env=ENV)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{manifest}: shards[0] {json.dumps(entry)}" in r.stderr and "percent-decoded" in r.stderr, r.stderr
    assert site.seen and all(p == "/set/" + MANIFEST for p in site.seen), site.seen
    assert not (tmp_path / "run").exists()


def test_evaluate_replaces_a_link_planted_at_an_output_name_and_leaves_its_target(mnist_shards, tmp_path):
    """`eval/<ckpt>/interpolate.json -> ~/.bashrc` planted by someone who can write there: the command's outputs
    replace the links; what they pointed at is unchanged."""
    run = tmp_path / "run"
    assert train_cli(run, mnist_shards, "train.device=cpu", "data.loader_workers=0", env=ENV).returncode == 0
    out = run / "eval" / "ckpt-000000000064"
    out.mkdir(parents=True)
    targets = {}
    for name in ("interpolate.json", "interpolate-walks.png"):
        target = tmp_path / f"precious-{name}"
        target.write_text("someone's own file\n")
        (out / name).symlink_to(target)
        targets[name] = target
    r = subprocess.run([sys.executable, "-m", "dcgan_dist.evaluate", "interpolate", str(run), "--rows", "2",
                        "--frames", "3"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name, target in targets.items():
        assert target.read_text() == "someone's own file\n", name
        assert not (out / name).is_symlink() and (out / name).is_file(), name
    assert json.loads((out / "interpolate.json").read_text())["command"] == "interpolate"
    assert Image.open(out / "interpolate-walks.png").size[0] > 0


def test_pipe_commands_started_by_loader_workers_end_on_sigterm_and_sigint(mnist_shards, tmp_path):
    """The loader workers ignore SIGTERM and SIGINT (the trainer answers them), and an ignored signal stays ignored
    in what they exec: each `pipe:` command records the signals it ignores (/proc's SigIgn mask) as it starts."""
    record = tmp_path / "sigign"
    shards = f"pipe:grep SigIgn /proc/self/status >> {record}; cat {mnist_shards}/mnist5k-{{000000..000001}}.tar"
    r = train_cli(tmp_path / "run", shards, "train.device=cpu", "data.loader_workers=2", "data.size=1000", env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    masks = [int(line.split()[1], 16) for line in record.read_text().splitlines()]
    ignored = [signal.Signals(s).name for m in masks for s in (signal.SIGTERM, signal.SIGINT) if m >> (s - 1) & 1]
    assert masks and not ignored, ignored
