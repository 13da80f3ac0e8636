"""Shards on object storage: training from a real S3 API (moto's server) and from an HTTP server on 127.0.0.1,
with connections cut mid-shard, a missing shard and a stalled one. Every server started here is stopped here."""

from __future__ import annotations

import contextlib
import copy
import http.server
import itertools
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dcgan_dist import checkpoint
from dcgan_dist.data import storage
from dcgan_dist.data.load import load_labelled
from dcgan_dist.data.manifest import MANIFEST, read_manifest
from dcgan_dist.data.shardset import resolve
from dcgan_dist.shard import output as shard_output
from dcgan_dist.shard import writer
from dcgan_dist.shard.cli import main as shard_main
from dcgan_dist.train.loop import train
from doc_commands import documented
from helpers import LocalServer, assert_same_tensors, scalars

N_SHARDS, PER_SHARD = 8, 32


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: spinning intra-op threads made each run ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_shards(mnist_shards, tmp_path_factory) -> Path:
    """The first 256 real MNIST digits re-written as 8 shards of 32 + manifest: small enough that a short run
    reads every shard, so a faulty one is always met."""
    out = tmp_path_factory.mktemp("small_shards")
    first = resolve(str(mnist_shards)).urls[0]
    samples = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
               for s in itertools.islice(storage.tar_samples(first), N_SHARDS * PER_SHARD)]
    infos = [writer.write_shard(out / writer.shard_name("digits", k), samples[k * PER_SHARD:(k + 1) * PER_SHARD])
             for k in range(N_SHARDS)]
    writer.write_manifest(out, infos, source="test", options={})
    return out


class FaultyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; the server's `missing` names get 404, `cut` names lose the connection half-way through
    their first `cut[name]` responses, `stall` names send headers and then go silent for `stall_s` seconds."""

    def do_GET(self):
        name = self.path.lstrip("/")
        srv = self.server
        if name in srv.missing:
            self.send_error(404)
            return
        path = Path(self.directory) / name
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with srv.lock:
            cut = srv.cut.get(name, 0) > 0
            if cut:
                srv.cut[name] -= 1
        if name in srv.stall:
            time.sleep(srv.stall_s)
        if cut:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(0.1)  # let the reader consume the first half, so the drop falls mid-shard, not before it
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops with half the promised bytes sent
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class ShardServer(LocalServer):
    daemon_threads = True

    def __init__(self, directory: Path, missing=(), cut=None, stall=(), stall_s=2.0):
        super().__init__(lambda *a, **kw: FaultyHandler(*a, directory=str(directory), **kw))
        self.missing, self.cut, self.stall, self.stall_s = set(missing), dict(cut or {}), set(stall), stall_s
        self.lock = threading.Lock()

    def handle_error(self, request, client_address):
        pass  # a client that gave up on a stalled response: expected here


def _cfg(tiny_cfg, shards: str, run_dir: Path, **data_overrides):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.data.shards = shards
    cfg.data.resample = False  # every shard is read once per pass: a faulty shard is always met
    cfg.data.loader_workers = 1   # remote reads in a forked loader worker, as on the cluster
    cfg.data.retry_backoff = 0.01
    for key, value in data_overrides.items():
        setattr(cfg.data, key, value)
    cfg.run_dir = str(run_dir)
    return cfg


def _final_g(run_dir: Path) -> dict:
    return checkpoint.load(checkpoint.latest(run_dir)).G


@pytest.fixture(scope="module")
def local_run(small_shards, tmp_path_factory):
    """The reference: an uninterrupted run over the shards on local disk."""
    return tmp_path_factory.mktemp("local_run")


@pytest.fixture
def reference_g(tiny_cfg, small_shards, local_run):
    if checkpoint.latest(local_run) is None:
        train(_cfg(tiny_cfg, str(small_shards), local_run))
    return _final_g(local_run)


def test_cut_connections_are_retried_and_resume_on_the_same_sample(small_shards, tiny_cfg, tmp_path, capfd,
                                                                     reference_g):
    names = [writer.shard_name("digits", k) for k in range(N_SHARDS)]
    with ShardServer(small_shards, cut={n: 1 for n in names}) as srv:
        local = [s["__key__"] for s in storage.tar_samples(str(small_shards / names[0]))]
        remote = [s["__key__"] for s in storage.tar_samples(srv.url + names[0], backoff=0.01)]
        assert remote == local and len(remote) == PER_SHARD

        metrics = train(_cfg(tiny_cfg, srv.url, tmp_path / "run"))
    err = capfd.readouterr().err
    assert "retry 1 of 3" in err and re.search(r"failed after [1-9][0-9]* samples", err)  # cut mid-shard
    assert metrics["images"] == tiny_cfg.train.images and metrics["data/skipped_shards"] == 0
    # Retries resumed exactly where the cut fell: the same batches as from local disk, so the same weights.
    assert_same_tensors(_final_g(tmp_path / "run"), reference_g, "G")


def test_missing_and_stalled_shards_are_skipped_and_counted(small_shards, tiny_cfg, tmp_path, capfd):
    missing, stalled = writer.shard_name("digits", 2), writer.shard_name("digits", 5)
    with ShardServer(small_shards, missing=[missing], stall=[stalled], stall_s=1.5) as srv:
        t0 = time.perf_counter()
        metrics = train(_cfg(tiny_cfg, srv.url + MANIFEST, tmp_path / "run",
                             io_timeout=0.3, read_retries=1))
        elapsed = time.perf_counter() - t0
    err = capfd.readouterr().err
    assert f"skipping shard {srv.url}{missing}: FileNotFoundError" in err
    assert f"skipping shard {srv.url}{stalled}" in err and "retry 1 of 1" in err
    assert metrics["images"] == tiny_cfg.train.images
    assert metrics["data/skipped_shards"] >= 2
    assert scalars(tmp_path / "run", "data/skipped_shards")[-1][1] == metrics["data/skipped_shards"]
    assert elapsed < 30


def test_unreachable_store_is_a_clear_error_at_start_up(monkeypatch):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with _loopback_aws(f"http://127.0.0.1:{port}"):
        for spec, match in (("s3://unreachable/shards/", "s3://unreachable/shards/manifest.json"),
                            (f"http://127.0.0.1:{port}/digits-{{000000..000003}}.tar",
                             f"cannot reach http://127.0.0.1:{port}/digits-000000.tar")):
            t0 = time.perf_counter()
            with pytest.raises(ValueError, match=re.escape(match)):
                resolve(spec)
            assert time.perf_counter() - t0 < 20, spec


@contextlib.contextmanager
def _loopback_aws(endpoint: str):
    """S3 clients that talk to `endpoint` with dummy keys, never to ~/.aws, an instance role or the internet."""
    import s3fs

    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    with pytest.MonkeyPatch.context() as mp:
        for var, value in env.items():
            mp.setenv(var, value)
        s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches clients by arguments, not by environment
        try:
            yield
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3_bucket(small_shards):
    """moto's S3 server on 127.0.0.1 with the small shards uploaded under s3://shards/digits/; yields that URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with _loopback_aws(f"http://{host}:{port}"):
            fs, _ = storage.filesystem("s3://shards/")
            fs.mkdir("shards")
            fs.put([str(p) for p in sorted(small_shards.iterdir())], "shards/digits/")
            yield "s3://shards/digits/"
    finally:
        server.stop()


def test_train_from_s3_and_resume(s3_bucket, tiny_cfg, tmp_path, reference_g):
    shards = resolve(s3_bucket)
    assert shards.urls[0] == s3_bucket + writer.shard_name("digits", 0) and shards.size == N_SHARDS * PER_SHARD
    assert resolve("s3://shards/digits/digits-{000000..000007}.tar").urls == shards.urls

    run = tmp_path / "run"
    first = _cfg(tiny_cfg, s3_bucket, run)
    first.train.images = tiny_cfg.train.images // 2
    assert train(first)["images"] == first.train.images
    metrics = train(_cfg(tiny_cfg, s3_bucket, run))  # resumes from the checkpoint at half way
    assert metrics["images"] == tiny_cfg.train.images and metrics["data/skipped_shards"] == 0
    assert_same_tensors(_final_g(run), reference_g, "G")

    # evaluate's labelled loader reads through the same resolve and reader
    images, labels = load_labelled(s3_bucket, resolution=32, channels=1, limit=40)
    assert images.shape == (40, 1, 32, 32) and labels.shape == (40,)


def test_missing_bucket_is_a_clear_error(s3_bucket):
    with pytest.raises(ValueError, match="s3://no-such-bucket/digits/manifest.json"):
        resolve("s3://no-such-bucket/digits/")


def test_shard_tool_writes_to_s3_and_a_rerun_skips_uploaded_shards(s3_bucket, small_shards, tmp_path, monkeypatch):
    src = tmp_path / "digits"
    src.mkdir()
    for sample in itertools.islice(storage.tar_samples(str(small_shards / writer.shard_name("digits", 0))), 30):
        (src / f"{sample['__key__']}.png").write_bytes(sample["png"])
    args = ["--shard-size", "8", "--format", "png", "--keep-size", "--workers", "1", "--quiet"]
    assert shard_main([str(src), str(tmp_path / "local"), *args]) == 0
    dest = "s3://shards/from-tool/"

    fs, _ = storage.filesystem(dest)
    uploads, real_put, real_write = [], fs.put_file, shard_output.BucketDir.write_bytes
    monkeypatch.setattr(fs, "put_file", lambda lpath, rpath, **kw: (uploads.append(Path(rpath).name),
                                                                     real_put(lpath, rpath, **kw))[1])

    def killed_before_third_record(self, name, data):
        if name.endswith(writer.shard_name("digits", 2) + ".json"):
            raise KeyboardInterrupt  # the shard is uploaded, its progress record never written
        real_write(self, name, data)

    monkeypatch.setattr(shard_output.BucketDir, "write_bytes", killed_before_third_record)
    with pytest.raises(KeyboardInterrupt):
        shard_main([str(src), dest, *args])
    assert uploads == [writer.shard_name("digits", k) for k in range(3)]

    monkeypatch.setattr(shard_output.BucketDir, "write_bytes", real_write)
    uploads.clear()
    assert shard_main([str(src), dest, *args]) == 0
    # Shards 0-1 kept by their progress records, shard 2 found in the bucket with a matching checksum.
    assert uploads == [writer.shard_name("digits", 3), MANIFEST]

    remote = read_manifest(dest + MANIFEST)
    assert remote["shards"] == read_manifest(tmp_path / "local" / MANIFEST)["shards"]
    assert resolve(dest).size == 30 and not fs.exists("shards/from-tool/.progress")


def test_index_and_verify_a_bucket_prefix_as_the_docs_write_them(s3_bucket, small_shards):
    """README: `python -m dcgan_dist.shard index s3://bucket/prefix/` for shards without a manifest, then
    `... verify` and docs/object_storage.md's start-up check, each as typed (the endpoint from the environment)."""
    fs, _ = storage.filesystem("s3://my-bucket/")
    fs.mkdir("my-bucket")  # the docs' bucket and prefix, so that their start-up check runs as written
    fs.put([str(p) for p in sorted(small_shards.glob("*.tar"))], "my-bucket/lsun_bedroom/")  # no manifest
    bare = "s3://my-bucket/lsun_bedroom/"

    def cli(*args):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)

    r = cli("-m", "dcgan_dist.shard", "index", bare)
    assert r.returncode == 0 and f"{N_SHARDS * PER_SHARD} samples in {N_SHARDS} shards" in r.stdout, r.stderr
    assert resolve(bare).counts == [PER_SHARD] * N_SHARDS
    assert cli("-m", "dcgan_dist.shard", "verify", bare).returncode == 0
    check = subprocess.run(documented(
        "python -c \"from dcgan_dist.data.shardset import resolve; s = resolve('s3://my-bucket/lsun_bedroom/'); "
        "print(len(s.urls), s.size)\""), capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.split() == [str(N_SHARDS), str(N_SHARDS * PER_SHARD)]
