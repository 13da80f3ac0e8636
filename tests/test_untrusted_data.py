"""Files that someone else made, fed to the commands users type: each costs bounded memory and time, and what is
refused is skipped with its reason (the trainer counts it in data/skipped_samples, the shard tool lists it in the
manifest) or, for a tar that no tar can be, an error naming the shard and the member."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from dcgan_dist.data.images import encode
from dcgan_dist.shard import writer
from helpers import scalars
from tiny_run import train_cli

import shard_data

BOMB = "30,000 x 30,000 = 900,000,000 pixels, over the limit of 67,108,864"  # with the default limit


def jpeg_declaring(height: int, width: int) -> bytes:
    """A real 16 x 16 JPEG whose frame header (SOF0) says height x width: a few hundred bytes."""
    data = bytearray(simplejpeg.encode_jpeg(np.full((16, 16, 3), 128, np.uint8), 90, "RGB", "444"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    assert simplejpeg.decode_jpeg_header(bytes(data))[:2] == (height, width)
    return bytes(data)


def png_declaring(height: int, width: int) -> bytes:
    """A real 16 x 16 PNG whose IHDR says width x height, its CRC made right."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 99, 199)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def noise_png(side: int = 256) -> bytes:
    """An incompressible PNG: side x side x 3 bytes and a little more."""
    return encode(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8), "png", 0)


def photos(n: int) -> list[bytes]:
    return [encode(arr, "jpg", 90) for arr in shard_data.distinct_images(n, side=48)]


# The tiny run (tiny_run.train_cli) on 32 x 32 RGB images: 8 steps of 8.
RGB_RUN = ("data.loader_workers=0", "data.shuffle_buffer=4", "model.resolution=32", "model.channels=3",
           "train.batch_size=8", "train.device=cpu", "log.grid_size=4")


def _shard(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcgan_dist.shard", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def _skipped(outdir: Path) -> dict[str, str]:
    return {s["id"]: s["reason"] for s in json.loads((outdir / "manifest.json").read_text())["skipped"]}


def test_trainer_skips_and_counts_images_over_the_limits_undecoded(tmp_path):
    """A JPEG and a PNG whose headers declare bombs, and a sample over data.max_sample_bytes, in a shard among
    real photos: each skipped, named with its shard and reason, and counted."""
    shard = tmp_path / "shards" / "mixed-000000.tar"
    shard.parent.mkdir()
    hostile = [("bomb_jpeg", {"jpg": jpeg_declaring(30000, 30000)}),
               ("bomb_png", {"png": png_declaring(12000, 12000)}),  # under PIL's own refusal, which only warns
               ("too_big", {"png": noise_png()})]
    writer.write_shard(shard, hostile + [(f"good{i}", {"jpg": p}) for i, p in enumerate(photos(12))])
    r = train_cli(tmp_path / "run", shard.parent, *RGB_RUN, "data.max_sample_bytes=150000")
    assert r.returncode == 0, r.stderr[-3000:]
    for key, why in (("bomb_jpeg", BOMB), ("bomb_png", "12,000 x 12,000 = 144,000,000 pixels, over the limit"),
                     ("too_big", "sample larger than the limit of 150,000 bytes (data.max_sample_bytes)")):
        assert f"skipping sample {key!r} in {shard}: BadImage: {why}" in r.stderr, key
    assert sum(value for _, value in scalars(tmp_path / "run", "data/skipped_samples")) >= 3


def test_shard_tool_follows_no_link_out_or_round_and_reads_only_regular_files(tmp_path):
    """A folder holding `loop -> .`, `sub/up -> ..`, a FIFO named x.jpg, a link to /dev/zero and one to a photo
    outside it: the shard tool finishes at once and lists each unread with its reason; a link to a photo inside
    the folder is read."""
    src, secret = tmp_path / "photos", tmp_path / "secret.jpg"
    (src / "sub").mkdir(parents=True)
    a, b, c = photos(3)
    (src / "a.jpg").write_bytes(a)
    (src / "sub" / "b.jpg").write_bytes(b)
    secret.write_bytes(c)
    os.symlink(".", src / "loop")
    os.symlink("..", src / "sub" / "up")
    os.mkfifo(src / "x.jpg")
    os.symlink("/dev/zero", src / "zero.jpg")
    os.symlink(secret, src / "outside.jpg")
    os.symlink("sub/b.jpg", src / "inside.jpg")
    r = _shard(src, tmp_path / "out", "--resolution", "32", "--quiet", timeout=30)  # for ever (links) or 0.5 s
    assert r.returncode == 0, r.stderr[-3000:]
    loop = "a link to a folder that holds it, a loop: not followed"
    assert _skipped(tmp_path / "out") == {
        "loop": loop, "sub/up": loop, "x.jpg": "not a regular file: a FIFO",
        "zero.jpg": "a link to /dev/zero, outside the source folder: not followed",
        "outside.jpg": f"a link to {os.path.realpath(secret)}, outside the source folder: not followed"}
    assert "3 samples in 1 shards" in r.stdout  # a.jpg, inside.jpg, sub/b.jpg


@pytest.mark.parametrize("kind", ["folder", "zip", "tar", "tgz"])
def test_shard_tool_skips_inputs_over_the_limits_unread(tmp_path, kind):
    """Bombs declared in image headers, and a file over --max-file-bytes, in a folder or an archive: listed with
    their reasons, even with --keep-size (which decodes at full size)."""
    src = tmp_path / "photos"
    src.mkdir()
    good = photos(2)
    files = {"good0.jpg": good[0], "good1.jpg": good[1], "bomb.jpg": jpeg_declaring(30000, 30000),
             "bomb.png": png_declaring(12000, 12000), "big.png": noise_png()}
    for name, data in files.items():
        (src / name).write_bytes(data)
    source = src if kind == "folder" else shard_data.make_archives(src, tmp_path)[kind]
    r = _shard(source, tmp_path / "out", "--keep-size", "--format", "png", "--max-file-bytes", "100000", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = _skipped(tmp_path / "out")
    assert skipped == {
        "bomb.jpg": f"{BOMB} (data.max_image_pixels, the shard tool's --max-image-pixels): not decoded",
        "bomb.png": "12,000 x 12,000 = 144,000,000 pixels, over the limit of 67,108,864 (data.max_image_pixels, "
                    "the shard tool's --max-image-pixels): not decoded",
        "big.png": f"{len(files['big.png']):,} bytes, over the limit of 100,000 (--max-file-bytes): not read"}


def _shard_with_member_size(path: Path, size: int) -> None:
    """A shard of 4 real photos whose third image member's header declares `size` bytes in GNU base-256 (what
    GNU tar writes for sizes octal cannot hold), its checksum made right."""
    writer.write_shard(path, [(f"{i:06d}", {"jpg": p}) for i, p in enumerate(photos(4))])
    raw = bytearray(path.read_bytes())
    at = 0
    while raw[at:at + 100].split(b"\0")[0] != b"000002.jpg":
        at += 512 + -(-int(raw[at + 124:at + 136].split(b"\0")[0], 8) // 512) * 512
    raw[at + 124:at + 136] = (b"\xff" if size < 0 else b"\x80") + size.to_bytes(11, "big", signed=True)
    raw[at + 148:at + 156] = b" " * 8
    raw[at + 148:at + 156] = b"%06o\0 " % sum(raw[at:at + 512])
    path.write_bytes(bytes(raw))


IMPOSSIBLE = {"negative": (-512, "declares a negative size (-512 bytes)"),
              "2^62": (1 << 62, f"declares {1 << 62:,} bytes")}


def test_trainer_start_up_names_shards_with_impossible_member_sizes(tmp_path):
    """Shards without a manifest are counted from their headers at start-up: a size of -512 (which would seek
    back to the same header for ever) or 2^62 is an error naming the shard and the member, the shard is taken
    as empty, and training goes on with the others."""
    shards = tmp_path / "shards"
    shards.mkdir()
    writer.write_shard(shards / "good-000000.tar", [(f"{i:06d}", {"jpg": p}) for i, p in enumerate(photos(16))])
    for name, (size, _) in IMPOSSIBLE.items():
        _shard_with_member_size(shards / f"{name}-000000.tar", size)
    r = train_cli(tmp_path / "run", shards, *RGB_RUN, timeout=120)  # counting shards took for ever
    assert r.returncode == 0, r.stderr[-3000:]
    for name, (_, says) in IMPOSSIBLE.items():
        assert f"cannot count the samples of {shards / name}-000000.tar" in r.stderr
        assert f"tar member '000002.jpg' {says}" in r.stderr


@pytest.mark.parametrize("name", IMPOSSIBLE)
def test_shard_tool_names_tars_with_impossible_member_sizes(tmp_path, name):
    """The same shards to `shard index` (which reads every member, as the loader does) and as a tar SOURCE
    (read by Python's tarfile, which loops on a negative size too): errors naming the file and the member."""
    size, says = IMPOSSIBLE[name]
    shards = tmp_path / "shards"
    shards.mkdir()
    bad = shards / "bad-000000.tar"
    _shard_with_member_size(bad, size)
    index = _shard("index", shards, timeout=30)
    assert index.returncode == 1, index.stderr[-3000:]
    assert f"bad-000000.tar: damaged after 1 samples: tar member '000002.jpg' {says}" in index.stderr
    as_source = _shard(bad, tmp_path / "out", "--quiet", timeout=30)
    assert as_source.returncode == 1, as_source.stderr[-3000:]
    assert f"tar archive {bad}: member '000002.jpg' declares {size:,} bytes" in as_source.stderr
