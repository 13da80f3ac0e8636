"""Restarts: a run killed with SIGKILL, started again with the same arguments, keeps its finished shards and
ends with exactly the bytes of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from dcgan_dist.shard import run as shard
from dcgan_dist.shard.cli import main as shard_main
from dcgan_dist.shard.options import Options

import shard_data


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path):
    src = tmp_path / "lsun_like"
    src.mkdir()
    images = shard_data.random_crops(200)
    for k, arr in enumerate(images):
        (src / f"{k:04d}.jpg").write_bytes(shard_data.encode(arr, "JPEG", quality=90))
    for k in range(7, 200, 25):  # exact copies spread over the run: the duplicate index must survive the kill
        (src / f"{k:04d}-copy.jpg").write_bytes((src / f"{k - 7:04d}.jpg").read_bytes())
    args = ["--shard-size", "10", "--dedup", "exact", "--format", "png"]
    reference = tmp_path / "reference"
    shard_main([str(src), str(reference), *args, "--workers", "1", "--quiet"])

    out = tmp_path / "out"
    command = [sys.executable, "-m", "dcgan_dist.shard", str(src), str(out), *args, "--workers", "2", "--quiet"]
    proc = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and len(list((out / shard.PROGRESS).glob("*.tar.json"))) < 4:
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the tool, its forkserver and its workers
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (out / "manifest.json").exists()

    committed = {p.name[:-len(".json")] for p in (out / shard.PROGRESS).glob("*.tar.json")}
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert committed <= set(finished)
    for name in finished:  # no partial shard carries a final name
        with tarfile.open(out / name) as tf:
            assert len(tf.getmembers()) == 2 * 10

    subprocess.run(command, check=True, capture_output=True)
    assert shard_data.output_files(out) == shard_data.output_files(reference)
    for name in committed:  # finished shards were kept, not redone
        assert (out / name).stat().st_mtime_ns == finished[name]
    manifest = shard.run(str(src), out, Options(shard_size=10, dedup="exact", format="png"), progress=False)
    assert manifest["counts"]["duplicates"] == 8 and manifest["total"] == 200


def _children(pid: int) -> list[int]:
    return [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
            if _stat(p) and int(_stat(p).rsplit(")", 1)[1].split()[1]) == pid]


def _stat(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # the process is gone
        return ""


def _ended(pid: int) -> bool:
    stat = _stat(Path(f"/proc/{pid}/stat"))
    return not stat or stat.rsplit(")", 1)[1].split()[0] == "Z"  # gone, or dead and waiting for its reaper


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers end with the tool through Linux's prctl")
def test_sigkill_of_the_tool_alone_then_the_same_command_at_once(tmp_path):
    """Issue 29's report as a user meets it: kill -9 of the tool's own pid (its workers untouched) once two shards
    exist, then the same command at once. The workers die with the tool, no lock outlives it, and the rerun ends
    with exactly the bytes of an uninterrupted run."""
    lmdb = tmp_path / "bedroom_train_lmdb"
    shard_data.make_lmdb(lmdb, shard_data.random_crops(600))

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "dcgan_dist.shard", str(lmdb), str(out), "--resolution", "32",
                "--shard-size", "50", "--workers", "2"]  # the report's two workers, on any machine

    subprocess.run(command(tmp_path / "reference"), check=True, capture_output=True, timeout=300)
    out = tmp_path / "out"
    proc = subprocess.Popen(command(out), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and len(list(out.glob("*.tar"))) < 2:
            time.sleep(0.01)
        workers = _children(proc.pid)
        proc.kill()
        assert proc.wait() == -signal.SIGKILL and len(workers) == 2  # killed mid-run
        rerun = subprocess.run(command(out), capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert all(_ended(pid) for pid in workers)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # orphans, had they survived
        except ProcessLookupError:
            pass
    assert shard_data.output_files(out) == shard_data.output_files(tmp_path / "reference")


def test_crash_between_the_faces_of_one_image_resumes_mid_image(tmp_path, monkeypatch):
    face = skimage.data.astronaut()[40:260, 140:320]
    src = tmp_path / "groups"
    src.mkdir()
    for k in range(3):  # group photos: four faces each, so shards of 3 end inside an image
        tiles = [face, face[:, ::-1], face, face[:, ::-1]]
        group = np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)
        (src / f"group{k}.png").write_bytes(shard_data.encode(group, "PNG"))
    opts = Options(faces=True, shard_size=3, format="png")
    shard.run(str(src), tmp_path / "reference", opts, progress=False)
    assert shard_data.read_shards(tmp_path / "reference")[-1]["meta"]["face"] == 3

    real_commit, commits = shard._Run.commit, []

    def dies_after_two(self, after):
        if len(commits) == 2:
            raise KeyboardInterrupt
        commits.append(after)
        real_commit(self, after)

    monkeypatch.setattr(shard._Run, "commit", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        shard.run(str(src), tmp_path / "out", opts, progress=False)
    assert commits == [(0, 3), (1, 2)]  # the second shard ends after the second face of the second image
    monkeypatch.undo()
    shard.run(str(src), tmp_path / "out", opts, progress=False)
    assert shard_data.output_files(tmp_path / "out") == shard_data.output_files(tmp_path / "reference")
