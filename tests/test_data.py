"""The shard stream on real MNIST shards: shapes, determinism, exact resume, corrupt input, clear errors; and
evaluation's front-to-back reads (data/load.py)."""

import io
import itertools
import tarfile

import numpy as np
import pytest
import torch

from dcgan_dist import config, pixels
from dcgan_dist.data import stream
from dcgan_dist.data.shardset import resolve
from dcgan_dist.shard import writer
from helpers import jpeg


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _cfg(mnist_shards, *extra):
    return config.load(None, [f"data.shards={mnist_shards}", "model.resolution=32", "model.channels=1",
                              "train.batch_size=32", "data.shuffle_buffer=100", *extra])


def test_resolve_directory_manifest_and_pattern(mnist_shards):
    by_dir = resolve(str(mnist_shards))
    assert len(by_dir.urls) == 10 and by_dir.size == 5000
    assert resolve(str(mnist_shards / "manifest.json")).urls == by_dir.urls
    pattern = str(mnist_shards / "mnist5k-{000000..000009}.tar")
    assert resolve(pattern).urls == by_dir.urls and resolve(pattern).size == 5000  # counted from tar headers


@pytest.mark.parametrize("spec, match", [
    ("", "empty"),
    ("/nonexistent/shard-{000..003}.tar", "matches no shard"),
    ("/nonexistent/manifest.json", "does not exist"),
])
def test_resolve_errors_name_the_spec(spec, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        resolve(spec)


def test_empty_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        resolve(str(tmp_path))


def _opened_shards(monkeypatch) -> list[str]:
    """The list that every shard read from now on is appended to, in order."""
    from dcgan_dist.data import storage

    opened, tar_samples = [], storage.tar_samples

    def recording(url, *args, **kwargs):
        opened.append(url)
        return tar_samples(url, *args, **kwargs)

    monkeypatch.setattr(storage, "tar_samples", recording)
    return opened


def test_evaluation_reads_open_only_the_shards_they_need(mnist_shards, monkeypatch):
    from dcgan_dist.data import load

    opened = _opened_shards(monkeypatch)
    urls = resolve(str(mnist_shards)).urls  # 10 shards of 500
    assert len(load.load_images(str(mnist_shards), 32, 1, limit=100)) == 100 and opened == urls[:1]
    opened.clear()
    assert len(load.load_images(str(mnist_shards), 32, 1, limit=500)) == 500 and opened == urls[:1]
    opened.clear()
    part = torch.cat(list(load.image_batches(str(mnist_shards), 32, 1, 64, start=1200, stop=1300)))
    assert opened == urls[2:3]  # shards 0 and 1 end before image 1200: skipped by their counts, unopened
    assert torch.equal(part, load.load_images(str(mnist_shards), 32, 1, limit=1300)[1200:])


def test_batches_shape_range_and_pass_length(mnist_shards):
    cfg = _cfg(mnist_shards, "data.loader_workers=0")
    batches = stream.ShardStream(resolve(cfg.data.shards), cfg, rank=0, world_size=1)
    assert batches.steps_per_pass == 157  # ceil(5000 / 32)
    images, skipped, bad = next(iter(batches))
    assert images.shape == (32, 32, 32, 1) and images.dtype == torch.uint8  # NHWC
    assert (skipped, bad) == (0, 0)
    x = pixels.from_uint8(images, torch.device("cpu"))
    assert x.shape == (32, 1, 32, 32) and torch.equal(x[3, 0], images[3, :, :, 0].float() / 127.5 - 1)
    assert x.min() >= -1 and x.max() <= 1 and x.max() == 1 and x.min() == -1  # digits: black and white pixels


def test_ranks_take_identical_step_counts(mnist_shards):
    cfg = _cfg(mnist_shards, "data.loader_workers=2")
    shards = resolve(cfg.data.shards)
    counts = {stream.ShardStream(shards, cfg, r, 3).steps_per_pass for r in range(3)}
    assert len(counts) == 1 and counts.pop() % 2 == 0  # same on every rank, a multiple of the loader workers


def test_resume_sees_exactly_the_same_batches(mnist_shards):
    """Batches from a loader restarted at step k equal steps k.. of an uninterrupted loader (2 workers)."""
    cfg = _cfg(mnist_shards, "data.loader_workers=2")
    shards = resolve(cfg.data.shards)
    spp = stream.steps_per_pass(shards, cfg, 1)
    full = _take(stream.make_loader(shards, cfg, 0, 1, pin_memory=False), spp + 6)
    for k in (3, spp - 1, spp + 1):  # mid-pass at an odd offset, just before and just after a pass boundary
        resumed = _take(stream.make_loader(shards, cfg, 0, 1, pin_memory=False,
                                                   start=stream.StreamPosition.at(shards, cfg, 1, k)), 4)
        for (a, _, _), (b, _, _) in zip(full[k:k + 4], resumed):
            assert torch.equal(a, b)
    assert not torch.equal(full[0][0], full[1][0])


def test_resume_passes_over_the_prefix_without_decoding_and_sees_the_same_batches(tmp_path, mnist_shards):
    """With the raw-sample counts the trainer records (StreamPosition), a resumed loader skips the pass's first
    batches undecoded; with corrupt samples among them it still yields exactly the uninterrupted batches."""
    import tarfile

    from dcgan_dist.data import images as images_mod

    rng = np.random.default_rng(1)
    with tarfile.open(mnist_shards / "mnist5k-000000.tar") as tf:
        pngs = [tf.extractfile(m).read() for m in tf if m.name.endswith(".png")][:300]
    samples = [(f"s{i:04d}", {"png": b"broken" if rng.random() < 0.15 else png}) for i, png in enumerate(pngs)]
    infos = [writer.write_shard(tmp_path / f"c-{k:06d}.tar", samples[k * 100:(k + 1) * 100]) for k in range(3)]
    writer.write_manifest(tmp_path, infos, source="test", options={})
    cfg = _cfg(tmp_path, "data.loader_workers=2", "data.shuffle_buffer=50")
    shards = resolve(cfg.data.shards)
    spp = stream.steps_per_pass(shards, cfg, 1)
    full = _take(stream.make_loader(shards, cfg, 0, 1, pin_memory=False), spp)
    k = spp // 2 + 1
    position = stream.StreamPosition.at(shards, cfg, 1)
    for _, corrupt, _ in full[:k]:
        position.took(corrupt)
    assert position.data_step == k
    decoded = []
    real_decode = images_mod.decode_image
    stream.decode_image = lambda *a: decoded.append(1) or real_decode(*a)  # counts decodes (0 workers below)
    try:
        one = stream.ShardStream(shards, cfg, 0, 1, start=position)
        resumed = []
        for worker in (0, 1):  # both virtual streams in this process, as the two loader workers would run them
            it = _as_worker(one, worker)
            resumed.append([next(it) for _ in range(2)])
            it.close()
    finally:
        stream.decode_image = real_decode
    for w in (0, 1):  # worker w serves batches k + w, k + w + 2
        for j, (img, corrupt, _) in enumerate(resumed[w]):
            assert torch.equal(img, full[k + w + 2 * j][0]) and corrupt == full[k + w + 2 * j][1]
    assert sum(decoded) < 190  # the four batches (~150 with their corrupt samples); the prefix too would be ~380


def _as_worker(ds, worker):
    """Iterate a ShardStream as DataLoader worker `worker` of ds.streams would."""
    from unittest import mock

    info = mock.Mock(id=worker, num_workers=ds.streams)
    with mock.patch.object(stream, "get_worker_info", return_value=info):
        yield from ds


def test_same_seed_same_stream_other_seed_other_stream(mnist_shards):
    shards = resolve(str(mnist_shards))
    a = next(iter(stream.ShardStream(shards, _cfg(mnist_shards, "data.loader_workers=0"), 0, 1)))[0]
    b = next(iter(stream.ShardStream(shards, _cfg(mnist_shards, "data.loader_workers=0"), 0, 1)))[0]
    c = next(iter(stream.ShardStream(shards, _cfg(mnist_shards, "data.loader_workers=0", "train.seed=1"), 0, 1)))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_every_pass_reads_every_shard_once_in_a_new_order(mnist_shards, monkeypatch):
    opened = _opened_shards(monkeypatch)
    cfg = _cfg(mnist_shards, "data.loader_workers=0", "data.resample=false", "train.batch_size=250")
    ds = stream.ShardStream(resolve(cfg.data.shards), cfg, rank=0, world_size=1)
    batches, orders = iter(ds), []
    for _ in range(3):
        opened.clear()
        _take(batches, ds.steps_per_pass)
        orders.append(list(opened))
    assert all(sorted(order) == ds.shards.urls for order in orders)
    assert len({tuple(order) for order in orders}) == 3  # a pass that reused another's order would repeat it


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    good = [jpeg(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(6)]
    samples = [("truncated", {"jpg": good[0][: len(good[0]) // 3]}), ("garbage", {"png": b"not a png"}),
               ("empty", {"jpg": b""}), ("nofield", {"txt": b"hello"})]  # first, so the first batch meets them
    samples += [(f"good{i}", {"jpg": g}) for i, g in enumerate(good)]
    info = writer.write_shard(tmp_path / "mixed-000000.tar", samples)
    writer.write_manifest(tmp_path, [info], source="test", options={})
    cfg = config.load(None, [f"data.shards={tmp_path}", "model.resolution=32", "model.channels=3",
                             "train.batch_size=6", "data.loader_workers=0", "data.shuffle_buffer=1"])
    images, skipped, bad = next(iter(stream.ShardStream(resolve(cfg.data.shards), cfg, 0, 1)))
    assert images.shape == (6, 32, 32, 3)  # 48x64 images centre-cropped and resized to 32x32
    assert skipped == 4 and bad == 0


def test_unreadable_shard_is_skipped_and_counted(tmp_path, mnist_shards):
    import shutil

    shutil.copy(mnist_shards / "mnist5k-000000.tar", tmp_path / "a-000000.tar")
    (tmp_path / "a-000001.tar").write_bytes(b"this is not a tar file at all" * 100)
    cfg = config.load(None, [f"data.shards={tmp_path}/a-{{000000..000001}}.tar", "data.size=500",
                             "model.resolution=32", "model.channels=1", "train.batch_size=50",
                             "data.loader_workers=0", "data.shuffle_buffer=10"])
    batches = _take(stream.ShardStream(resolve(cfg.data.shards), cfg, 0, 1), 10)
    assert sum(b for _, _, b in batches) >= 1
    assert all(x.shape == (50, 32, 32, 1) for x, _, _ in batches)


def test_no_readable_shard_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "bad-000000.tar").write_bytes(b"\0" * 10)
    cfg = config.load(None, [f"data.shards={tmp_path}", "data.size=10", "train.batch_size=2",
                             "data.loader_workers=0"])
    with pytest.raises(RuntimeError, match="no readable sample"):
        next(iter(stream.ShardStream(resolve(cfg.data.shards), cfg, 0, 1)))


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_matches_tarfile_and_catches_every_damaged_header_byte(tmp_path, fmt):
    """Our header parser against Python's tarfile (long names, pax paths, ustar's name prefix) on real tar files,
    and its checksum (zlib's adler32 sum) against a byte changed anywhere in a header."""
    from dcgan_dist.data import tarread

    rng = np.random.default_rng(0)
    names = ["a.jpg", "a.cls", "d" * 60 + "/" + "n" * 80 + ".png", "deep/" * 25 + "x.raw"]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for name in names:
            data = rng.integers(0, 256, int(rng.integers(0, 1500)), dtype=np.uint8).tobytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    raw = path.read_bytes()
    assert list(tarread.members(io.BytesIO(raw))) == expected

    header = raw.index(b"a.jpg")  # the first regular member's own header
    header -= header % tarread.BLOCK
    for offset in range(0, tarread.BLOCK, 7):
        damaged = bytearray(raw)
        damaged[header + offset] ^= 0x5A
        with pytest.raises(ValueError):  # TarError for the checksum, ValueError for a mangled octal field
            list(tarread.members(io.BytesIO(bytes(damaged))))


class _WorkerIds(torch.utils.data.IterableDataset):
    """Each loader worker yields its id, endlessly."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        while True:
            yield info.id


def test_the_dataloader_hands_out_its_workers_batches_in_turn():
    """StreamPosition (data/stream.py) relies on it: batch j after a start came from worker j % workers, whatever
    worker was quicker. If a torch release changes that order, the recorded stream position is wrong: this fails."""
    loader = torch.utils.data.DataLoader(_WorkerIds(), batch_size=None, num_workers=3, prefetch_factor=2)
    it = iter(loader)
    try:
        assert [int(next(it)) for _ in range(12)] == [j % 3 for j in range(12)]
    finally:
        del it
