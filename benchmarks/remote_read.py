"""Reading the same shards from local disk, a loopback HTTP server and a loopback S3 server (moto), in one run.

    python benchmarks/remote_read.py [--shards DIR] [--repeats 3]

DIR is a shard directory with a manifest.json (default: the MNIST-5k shards written to a temp dir). Both servers
run as separate processes on 127.0.0.1, so they do not share this process's interpreter lock. For each source the
table gives the raw tar read (samples and MB per second through storage.tar_samples) and the whole training input
pipeline (ShardStream: read, shuffle, decode, batch; images per second), best of --repeats; local disk is the
baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from dcgan_dist import config
from dcgan_dist.data import storage
from dcgan_dist.data.shardset import ShardSet, resolve
from dcgan_dist.data.stream import ShardStream
from dcgan_dist.shard.run import builtin_shards


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server(args: list[str], port: int):
    """A server process listening on 127.0.0.1:port, stopped on exit."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"{' '.join(args)} did not listen on 127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _raw_read(shards: ShardSet) -> tuple[int, int, float]:
    """(samples, bytes, seconds) for reading every shard front to back."""
    t0 = time.perf_counter()
    n = nbytes = 0
    for url in shards.urls:
        for sample in storage.tar_samples(url):
            n += 1
            nbytes += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
    return n, nbytes, time.perf_counter() - t0


def _pipeline(shards: ShardSet, cfg) -> tuple[int, float]:
    """(images, seconds) for one pass of the training input pipeline in this process."""
    stream = ShardStream(shards, cfg, rank=0, world_size=1)
    t0 = time.perf_counter()
    n = 0
    for _, (images, _, _) in zip(range(stream.steps_per_pass), stream):
        n += images.shape[0]
    return n, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=None, help="shard directory with manifest.json (default: MNIST-5k)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="remote-read-") as tmp:
        _bench(Path(args.shards or builtin_shards("mnist5k", Path(tmp) / "mnist5k")), args.repeats)


def _bench(local: Path, repeats: int) -> None:
    cfg = config.load(None, ["data.builtin=null", "data.loader_workers=0", "data.resample=false",
                             "data.shuffle_buffer=1000", "train.batch_size=64"])

    http_port, s3_port = _free_port(), _free_port()
    with _server(["-m", "http.server", "--bind", "127.0.0.1", "--directory", str(local), str(http_port)],
                 http_port) as http_url, \
            _server(["-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], s3_port) as s3_endpoint:
        # Loopback S3 with dummy keys: never ~/.aws, an instance role or the internet.
        os.environ.update(AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
        fs, _ = storage.filesystem("s3://bench/")
        fs.mkdir("bench")
        fs.put([str(p) for p in sorted(local.iterdir()) if p.is_file()], "bench/shards/")

        sources = {"local disk (baseline)": str(local), "HTTP, loopback": http_url + "/",
                   "S3 (moto), loopback": "s3://bench/shards/"}
        rows = {}
        for name, spec in sources.items():
            shards = resolve(spec)
            raw = min((_raw_read(shards) for _ in range(repeats)), key=lambda r: r[2])
            pipe = min((_pipeline(shards, cfg) for _ in range(repeats)), key=lambda r: r[1])
            rows[name] = (raw, pipe)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"shards: {local} ({len(shards.urls)} shards, {shards.size} samples); best of {repeats}\n")
    print("| source | raw samples/s | raw MB/s | pipeline images/s | pipeline vs local |")
    print("| --- | --- | --- | --- | --- |")
    base = rows["local disk (baseline)"][1][0] / rows["local disk (baseline)"][1][1]
    for name, ((n, nbytes, raw_s), (images, pipe_s)) in rows.items():
        print(f"| {name} | {n / raw_s:,.0f} | {nbytes / raw_s / 1e6:.1f} | {images / pipe_s:,.0f} "
              f"| {images / pipe_s / base:.2f}x |")


if __name__ == "__main__":
    main()
