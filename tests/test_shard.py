"""The shard tool on its real inputs: LSUN's LMDB layout, nested folders with broken files, zip and tar archives,
the built-in sets; output read back with tar, WebDataset and the trainer's own reader."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import lmdb
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dcgan_dist.data.images import decode_image
from dcgan_dist.data.shardset import resolve
from dcgan_dist.shard import run as shard
from dcgan_dist.shard.cli import main as shard_main
from dcgan_dist.shard.options import Options

import shard_data
from doc_commands import documented


@pytest.fixture(scope="module")
def images():
    return shard_data.distinct_images(40)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("folder")
    return root, shard_data.make_folder(root, images)


def test_lsun_lmdb_of_webp_streams_in_key_order_into_readable_shards(tmp_path, images):
    keys = shard_data.make_lmdb(tmp_path / "bedroom_train_lmdb", images[:25])
    webp = shard_data.encode(images[0], "WEBP")
    with lmdb.open(str(tmp_path / "bedroom_train_lmdb"), map_size=1 << 28) as env, env.begin(write=True) as txn:
        txn.put(b"f" * 40, webp[:len(webp) // 2])  # a truncated value, last in key order
    manifest = shard.run(str(tmp_path / "bedroom_train_lmdb"), tmp_path / "out", Options(shard_size=10),
                         progress=False)

    names = [s["name"] for s in manifest["shards"]]
    assert names == [f"bedroom_train_lmdb-{k:06d}.tar" for k in range(3)]
    assert [s["count"] for s in manifest["shards"]] == [10, 10, 5] and manifest["total"] == 25
    assert manifest["source"] == str(tmp_path / "bedroom_train_lmdb") and manifest["tool_version"]
    assert manifest["options"]["resolution"] == 64 and manifest["counts"]["inputs"] == 26
    assert manifest["skipped"] == [{"id": "f" * 40, "reason": "OSError: could not create decoder object"}]
    for s in manifest["shards"]:
        path = tmp_path / "out" / s["name"]
        assert path.stat().st_size == s["bytes"]
        listed = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True).stdout
        assert len(listed.split()) == 2 * s["count"]

    samples = shard_data.read_shards(tmp_path / "out")
    assert [s["meta"]["source_id"] for s in samples] == keys
    for s, arr in zip(samples, images):
        assert s["meta"]["orig_size"] == list(arr.shape[:2])
        assert shard_data.decode(s["jpg"]).shape == (64, 64, 3)

    loaded = list(wds.WebDataset(str(tmp_path / "out" / names[0]), shardshuffle=False).decode("rgb8"))
    assert len(loaded) == 10 and loaded[0]["jpg"].shape == (64, 64, 3)
    shards = resolve(str(tmp_path / "out"))  # what the trainer does with the directory
    assert shards.counts == [10, 10, 5]
    assert decode_image(samples[0]["jpg"], 64, 3).shape == (64, 64, 3)


def test_folder_recursive_with_broken_files_skips_counts_and_lists_them(tmp_path, folder):
    root, good = folder
    manifest = shard.run(str(root), tmp_path / "out", Options(shard_size=16), workers=2, progress=False)

    assert manifest["total"] == len(good) and manifest["counts"]["skipped"] == len(shard_data.BROKEN)
    reasons = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == set(shard_data.BROKEN)
    for name, reason in shard_data.BROKEN.items():
        assert reasons[name].startswith(reason), (name, reasons[name])
    samples = shard_data.read_shards(tmp_path / "out")
    assert [s["meta"]["source_id"] for s in samples] == good
    assert {k for s in samples for k in s if k not in ("key", "meta")} == {"jpg", "json"}
    assert not (tmp_path / "out" / shard.PROGRESS).exists()


def test_zip_and_tar_archives_give_the_folders_shards(tmp_path, folder):
    root, good = folder
    archives = shard_data.make_archives(root, tmp_path)
    opts = Options(shard_size=16, prefix="set")
    reference = shard.run(str(root), tmp_path / "from_folder", opts, progress=False)
    for kind, path in archives.items():
        manifest = shard.run(str(path), tmp_path / kind, opts, progress=False)
        assert manifest["shards"] == reference["shards"], kind
        assert manifest["skipped"] == reference["skipped"], kind


def test_same_input_gives_identical_bytes_for_any_worker_count_and_shuffle_seed(tmp_path, folder):
    root, good = folder
    runs = {}
    for name, workers, seed in (("w1", 1, None), ("w2", 2, None), ("s1", 1, 7), ("s1w2", 2, 7), ("s2", 1, 8)):
        shard.run(str(root), tmp_path / name, Options(shard_size=8, shuffle=seed, prefix="x"), workers=workers,
                  progress=False)
        runs[name] = shard_data.output_files(tmp_path / name)
    assert runs["w1"] == runs["w2"] and runs["s1"] == runs["s1w2"]

    def order(name):
        return [s["meta"]["source_id"] for s in shard_data.read_shards(tmp_path / name)]

    assert order("w1") == good
    assert sorted(order("s1")) == sorted(order("s2")) == good
    assert order("s1") != good and order("s1") != order("s2")


def test_centre_crop_and_antialiased_resize_keep_size_and_formats(tmp_path):
    # 1-pixel black/white stripes in a centre square, red bars beside it: an aliasing resize would keep stripes,
    # a crop that is not centred would let red in.
    stripes = np.zeros((300, 400, 3), np.uint8)
    stripes[:, 50:350] = (np.arange(300) % 2 * 255)[None, :, None]
    stripes[:, :50] = stripes[:, 350:] = (255, 0, 0)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "stripes.png").write_bytes(shard_data.encode(stripes, "PNG"))

    for fmt in ("jpg", "png", "webp"):
        shard.run(str(tmp_path / "in"), tmp_path / fmt, Options(format=fmt), progress=False)
        [sample] = shard_data.read_shards(tmp_path / fmt)
        out = shard_data.decode(sample[fmt]).astype(float)
        assert out.shape == (64, 64, 3)
        assert abs(out.mean() - 127.5) < 6 and out.std() < 12, fmt  # stripes averaged to grey
        assert np.abs(out[:, :, 0] - out[:, :, 1]).max() < 12, fmt  # no red

    shard.run(str(tmp_path / "in"), tmp_path / "keep", Options(format="png", keep_size=True), progress=False)
    [sample] = shard_data.read_shards(tmp_path / "keep")
    assert np.array_equal(shard_data.decode(sample["png"]), stripes)


def test_builtin_sets(tmp_path, mnist_shards):
    manifest = shard.run("builtin:lfw-faces", tmp_path / "lfw", Options(resolution=32, format="png"),
                         progress=False)
    assert manifest["total"] == 100 and manifest["shards"][0]["name"] == "lfw-faces-000000.tar"
    sample = shard_data.read_shards(tmp_path / "lfw")[0]
    assert shard_data.decode(sample["png"]).shape == (32, 32)  # greyscale stays greyscale
    assert sample["meta"] == {"source_id": "lfw-faces/0", "orig_size": [25, 25]}

    # shard.builtin_shards (the trainer's default data) goes through the same tool: 10 mixed shards of 500
    mnist = json.loads((mnist_shards / "manifest.json").read_text())
    assert [s["count"] for s in mnist["shards"]] == [500] * 10 and mnist["options"]["format"] == "png"
    first = shard_data.read_shards(mnist_shards)[:500]
    labels = [int(s["cls"]) for s in first]
    assert len(set(labels)) == 10 and shard_data.decode(first[0]["png"]).shape == (32, 32)


def test_errors_exit_non_zero_with_a_clear_message(tmp_path, capsys):
    def fails(*argv):
        assert shard_main([*map(str, argv), "--quiet"]) == 1
        return capsys.readouterr().err

    assert "source " + str(tmp_path / "missing") + " does not exist" in fails(tmp_path / "missing", tmp_path / "o")
    bad_lmdb = tmp_path / "church_outdoor_train_lmdb"
    bad_lmdb.mkdir()
    (bad_lmdb / "data.mdb").write_bytes(b"not an lmdb" * 100)
    assert f"cannot open LMDB {bad_lmdb}" in fails(bad_lmdb, tmp_path / "o")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"")
    (broken / "b.png").write_text("text")
    message = fails(broken, tmp_path / "o2")
    assert "no sample to write: of 2 inputs, 2 were skipped" in message and "zero-byte file" in message
    assert not (tmp_path / "o2" / "manifest.json").exists()
    (tmp_path / "empty").mkdir()
    assert "holds no file" in fails(tmp_path / "empty", tmp_path / "o3")
    with pytest.raises(SystemExit):
        shard_main([str(broken), str(tmp_path / "o4"), "--quality", "0"])
    assert "--quality must be between 1 and 100" in capsys.readouterr().err


def test_rerun_of_a_finished_set_is_a_no_op_and_other_options_are_refused(tmp_path, images, capsys):
    (tmp_path / "in").mkdir()
    for k, arr in enumerate(images[:5]):
        (tmp_path / "in" / f"{k}.png").write_bytes(shard_data.encode(arr, "PNG"))
    out = tmp_path / "out"
    first = shard.run(str(tmp_path / "in"), out, Options(), progress=False)
    assert shard.run(str(tmp_path / "in"), out, Options(), progress=False) == first
    assert shard_main([str(tmp_path / "in"), str(out), "--quality", "80", "--quiet"]) == 1
    assert "another options quality" in capsys.readouterr().err


def test_command_line_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        shard_main(["--help"])
    help_text = capsys.readouterr().out
    for option in ("--resolution", "--keep-size", "--format", "--quality", "--shard-size", "--prefix", "--shuffle",
                   "--faces", "--min-face", "--face-margin", "--dedup", "--dedup-fit", "--dedup-radius",
                   "--max-image-pixels", "--max-file-bytes", "--workers", "--quiet", "builtin:mnist5k"):
        assert option in help_text


def test_tar_fields_are_readable_by_plain_tarfile(tmp_path, images):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(shard_data.encode(images[0], "PNG"))
    manifest = shard.run(str(tmp_path / "in"), tmp_path / "out", Options(), progress=False)
    with tarfile.open(tmp_path / "out" / manifest["shards"][0]["name"]) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == ["000000000.jpg", "000000000.json"]
    assert all(m.mtime == 0 and m.uid == 0 for m in members)


@pytest.mark.parametrize("flags", [[], ["--resolution", "64", "--dedup", "semantic", "--workers", "16",
                                        "--dedup-fit", "30"]], ids=["defaults", "readme-flags"])
def test_lsun_lmdb_through_the_command_line(tmp_path, images, flags):
    """README's LSUN command as typed (default --workers is every core): no image may be lost to the LMDB."""
    shard_data.make_lmdb(tmp_path / "bedroom_train_lmdb", images[:30])
    r = subprocess.run([sys.executable, "-m", "dcgan_dist.shard", str(tmp_path / "bedroom_train_lmdb"),
                        str(tmp_path / "shards" / "lsun_bedroom"), *flags, "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "shards" / "lsun_bedroom" / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == 0 and manifest["counts"]["inputs"] == 30
    assert manifest["total"] + manifest["counts"]["duplicates"] == 30


def test_orientation_alpha_and_16_bit_through_the_command_line(tmp_path):
    """Phone photos upright (EXIF orientation), transparency over white, 16-bit greyscale rescaled, not clipped."""
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    yy, xx = np.mgrid[0:48, 0:32]
    upright = np.stack([yy * 5, xx * 7, np.full_like(yy, 90)], -1).astype(np.uint8)  # 48 tall, 32 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": the camera stored the picture turned the other way
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(src / "a_phone.jpg", quality=98, exif=exif)
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(src / "b_phone.png", exif=exif)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[:, :8, 3] = 200, 255  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(src / "c_alpha.png")
    ramp = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(ramp).save(src / "d_grey16.png")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "dcgan_dist.shard", str(src), str(out), "--keep-size", "--format",
                        "png", "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = {s["meta"]["source_id"]: shard_data.decode(s["png"]) for s in shard_data.read_shards(out)}
    for name in ("a_phone.jpg", "b_phone.png"):
        assert got[name].shape == (48, 32, 3), f"{name} is not upright"
        assert np.abs(got[name].astype(int) - upright).mean() < 3
    assert (got["c_alpha.png"][:, 8:] == 255).all() and (got["c_alpha.png"][:, :8, 0] == 200).all()
    grey = got["d_grey16.png"].reshape(16, 16)
    assert grey.min() == 0 and grey.max() == 255 and np.array_equal(grey.flatten(), np.arange(256))
    # The trainer's decoder agrees (it reads other tools' shards, phone photos among them).
    assert decode_image((src / "a_phone.jpg").read_bytes(), 32, 3).shape == (32, 32, 3)
    assert decode_image((src / "c_alpha.png").read_bytes(), 16, 3)[:, 8:].min() == 255


def test_a_decoder_that_kills_its_worker_is_isolated_and_skipped(tmp_path, images):
    """A real worker process dies (SIGSEGV) on one input: it is retried alone, skipped as "decoder crashed",
    listed in the manifest, and the run goes on, the same on every rerun. The crash comes from a sitecustomize
    that makes PIL die on a marker, as a buggy C decoder would."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "from PIL import Image\n"
        "_open = Image.open\n"
        "def _crashing_open(fp, *a, **k):\n"
        "    if hasattr(fp, 'getvalue') and b'CRASH-ME' in fp.getvalue():\n"
        "        os.kill(os.getpid(), signal.SIGSEGV)\n"
        "    return _open(fp, *a, **k)\n"
        "Image.open = _crashing_open\n")
    src = tmp_path / "in"
    src.mkdir()
    for k, arr in enumerate(images[:70]):
        (src / f"{k:03d}.png").write_bytes(shard_data.encode(arr, "PNG"))
    (src / "040_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n CRASH-ME")
    env = {**os.environ, "PYTHONPATH": f"{hook}:{os.environ.get('PYTHONPATH', '')}"}

    def run(out):
        return subprocess.run([sys.executable, "-m", "dcgan_dist.shard", str(src), str(out), "--resolution", "32",
                               "--workers", "2", "--quiet"], env=env, capture_output=True, text=True, timeout=300)

    r = run(tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == [{"id": "040_bad.png", "reason": "decoder crashed (its worker process died)"}]
    assert manifest["total"] == len(images[:70])
    again = run(tmp_path / "again")
    assert again.returncode == 0
    assert shard_data.output_files(tmp_path / "out") == shard_data.output_files(tmp_path / "again")


def test_outdir_is_locked_and_a_changed_source_is_detected(tmp_path, images):
    from dcgan_dist import files
    from dcgan_dist.shard.output import LocalDir

    src = tmp_path / "in"
    src.mkdir()
    for k, arr in enumerate(images[:12]):
        (src / f"{k:03d}.png").write_bytes(shard_data.encode(arr, "PNG"))
    out = tmp_path / "out"
    with LocalDir(out).lock():  # a run in progress
        r = subprocess.run([sys.executable, "-m", "dcgan_dist.shard", str(src), str(out), "--quiet"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and f"is being written by pid {os.getpid()}" in r.stderr
    # In OUTDIR: a user's own file, untagged, and what a writer killed mid-file leaves (a tagged temporary).
    (out / "mine.tmp").write_text("a user's own file")
    killed = subprocess.run([sys.executable, "-c", "import os, sys\nfrom dcgan_dist import files\n"
                             "with files.atomic_open(sys.argv[1]) as f:\n    f.write(b'half a shard')\n"
                             "    os.kill(os.getpid(), 9)\n", str(out / "in-000000.tar")], timeout=120)
    leftover = [p for p in out.iterdir() if files.TMP_TAG in p.name]
    assert killed.returncode == -9 and len(leftover) == 1, leftover
    assert shard_main([str(src), str(out), "--quiet"]) == 0
    assert not leftover[0].exists(), "the killed writer's temporary was not cleaned up"
    (src / "005.png").write_bytes(shard_data.encode(images[30], "PNG"))  # another picture in its place
    r = subprocess.run([sys.executable, "-m", "dcgan_dist.shard", str(src), str(out), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "changed since a finished run" in r.stderr
    assert (out / "mine.tmp").read_text() == "a user's own file"


def test_the_readme_builtin_command_writes_what_the_default_run_writes(mnist_shards, tmp_path):
    """README's `shard builtin:mnist5k shards/mnist5k`, run first, writes the very bytes the default run's
    data.builtin would (mnist_shards: the trainer's builtin_shards), so the default run trains on the same data
    whichever wrote the folder (it wrote 64 px JPEG, 1,000 a shard, unshuffled, before)."""
    r = subprocess.run(documented("python -m dcgan_dist.shard builtin:mnist5k shards/mnist5k", "--quiet"),
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in (tmp_path / "shards" / "mnist5k").iterdir() if not p.name.startswith("."))
    assert written == sorted(p.name for p in mnist_shards.iterdir() if not p.name.startswith("."))
    for name in written:
        assert (tmp_path / "shards" / "mnist5k" / name).read_bytes() == (mnist_shards / name).read_bytes(), name
    options = json.loads((mnist_shards / "manifest.json").read_text())["options"]
    assert (options["keep_size"], options["format"], options["shard_size"], options["shuffle"]) == (
        True, "png", 500, 0)
    asked = subprocess.run([sys.executable, "-m", "dcgan_dist.shard", "builtin:mnist5k", str(tmp_path / "r32"),
                            "--resolution", "40", "--quiet"], capture_output=True, text=True, timeout=300)
    assert asked.returncode == 0, asked.stderr
    sample = next(iter(wds.WebDataset(str(tmp_path / "r32" / "mnist5k-000000.tar"), shardshuffle=False)))
    with Image.open(io.BytesIO(sample["png"])) as image:  # a size asked for is made, in the built-in format
        assert image.size == (40, 40)
