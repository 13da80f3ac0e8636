"""A user's mistake gets one line that names what is wrong, a non-zero exit, and no traceback: all four commands."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor


def _cases(tmp):
    broken_yaml = tmp / "broken.yaml"
    broken_yaml.write_text("model: [1, 2\n")
    damaged = tmp / "ckpt-000000000064.pt"
    damaged.write_bytes(b"PK\x03\x04 not really a checkpoint")
    not_a_ckpt = tmp / "notes.txt"
    not_a_ckpt.write_text("hello")
    a_file = tmp / "afile"
    a_file.write_text("x")
    empty_dir = tmp / "empty"
    empty_dir.mkdir()
    return [
        ("train", ["--config", str(tmp / "missing.yaml")], "missing.yaml"),
        ("train", ["--config", str(broken_yaml)], "broken.yaml"),
        ("train", ["--config", str(empty_dir)], "empty"),
        ("train", [f"data.shards={tmp}/nothing-{{0..3}}.tar", "data.builtin=null"], "nothing-"),
        ("train", [f"data.shards={a_file}", "data.builtin=null"], "afile"),
        ("train", [f"data.shards={empty_dir}", "data.builtin=null"], "empty"),
        ("train", ["train.images=ten"], "train.images"),
        ("shard", [str(tmp / "no_such_source"), str(tmp / "out")], "no_such_source"),
        ("shard", [str(empty_dir), str(tmp / "out2")], "no file"),
        ("shard", [str(not_a_ckpt), str(tmp / "out3")], "notes.txt"),
        ("shard", ["builtin:nope", str(tmp / "out4")], "builtin:nope"),
        ("shard", ["builtin:mnist5k", str(a_file)], "afile"),
        ("shard", ["builtin:mnist5k", str(tmp / "out5"), "--quality", "0"], "--quality"),
        ("evaluate", ["interpolate", str(tmp / "missing.pt")], "missing.pt"),
        ("evaluate", ["coverage", str(damaged)], "ckpt-000000000064.pt"),
        ("evaluate", ["fid", str(empty_dir)], "empty"),
        ("evaluate", ["nearest", str(not_a_ckpt)], "notes.txt"),
        ("sample", [str(tmp / "missing.pt")], "missing.pt"),
        ("sample", [str(damaged)], "ckpt-000000000064.pt"),
        ("sample", [str(empty_dir)], "empty"),
        ("sample", [str(not_a_ckpt), "--n", "4"], "notes.txt"),
        ("train", ["trainer.num_workers=2"], "RAY_TRAIN_V2_ENABLED=0", {"RAY_TRAIN_V2_ENABLED": "0"}),
    ]


def test_every_mistake_is_one_line_naming_it(tmp_path):
    """The table runs two commands at a time (each start imports torch: seconds of CPU, not of waiting)."""
    table = _cases(tmp_path)

    def run(case):
        command, args, named, env = (*case, {})[:4]
        r = subprocess.run([sys.executable, "-m", f"dcgan_dist.{command}", *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=180, env={**os.environ, **env})
        if r.returncode == 0:
            return f"{command} {args}: exited 0"
        if "Traceback" in r.stderr:
            return f"{command} {args}: traceback\n{r.stderr[-1500:]}"
        if named not in r.stderr:
            return f"{command} {args}: the message does not name {named!r}: {r.stderr[-300:]}"
        said = [line for line in r.stderr.strip().splitlines()  # argparse's usage block aside
                if not line.startswith(("usage:", " "))]
        if len(said) > 2:
            return f"{command} {args}: more than a line or two: {r.stderr[-600:]}"
        return None

    with ThreadPoolExecutor(2) as pool:
        problems = [p for p in pool.map(run, table) if p]
    assert len(table) == 22 and not problems, "\n\n".join(problems)


def test_a_ray_older_than_the_launcher_needs_is_named(monkeypatch):
    """pyproject.toml asks for ray>=2.60; an older one installed anyway is an error naming both versions."""
    import ray

    from dcgan_dist.distributed import ray_launch

    ray_launch.check_ray()  # the installed one is fine
    monkeypatch.setattr(ray, "__version__", "2.59.0")
    try:
        ray_launch.check_ray()
    except ray_launch.RayUnsupported as err:
        assert "Ray 2.59.0 is installed" in str(err) and "2.60 or newer" in str(err)
    else:
        raise AssertionError("Ray 2.59.0 passed the check")
