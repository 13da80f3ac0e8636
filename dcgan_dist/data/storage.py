"""Where shards live: local paths, s3://, gs://, http(s):// (through fsspec) and pipe:COMMAND (its stdout).

Credentials and endpoints come from the places each cloud library already reads: the environment, ~/.aws, the
instance role, gcloud's application-default credentials; AWS_ENDPOINT_URL points S3 at MinIO or a loopback
server, STORAGE_EMULATOR_HOST does the same for GCS. Nothing here reads a secret from our configs.
"""

from __future__ import annotations

import io
import itertools
import os
import random
import select
import signal
import subprocess
import sys
import time
from typing import IO, Iterator

import aiohttp
import fsspec

from ..limits import MAX_SAMPLE_BYTES
from . import tarread

_PIPE_CHUNK = 1 << 20
DEFAULT_TIMEOUT = 30.0  # seconds a connection or a read may stall before the attempt counts as failed
_HTTP_BUFFER = 1 << 20
_jitter = random.Random()  # private: retry timing must not touch the random state that checkpoints restore


def is_remote(url: str) -> bool:
    """True for URLs (s3://, gs://, http(s)://, pipe:, ...); False for local paths."""
    return "://" in url or url.startswith("pipe:")


def _options(protocol: str, timeout: float) -> dict:
    """fsspec options that bound how long a connect or a read may stall, so a dead endpoint fails, not hangs."""
    stall = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
    if protocol in ("http", "https"):
        return {"client_kwargs": {"timeout": stall}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout}}
    if protocol in ("gs", "gcs"):
        return {"requests_timeout": stall}
    return {}


def filesystem(url: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path within it) for a local path or URL."""
    return fsspec.core.url_to_fs(url, **_options(fsspec.utils.get_protocol(url), timeout))


class PipeStream:
    """The standard output of `pipe:COMMAND` (run by the shell, as WebDataset does), read front to back.

    A command that exits non-zero after its output was read to the end is an error naming it, so that a failed
    download (`pipe:aws s3 cp ... -`) is retried and counted, not taken for a short shard. A command that writes
    nothing for `timeout` seconds (data.io_timeout) is a TimeoutError naming it, like a stalled remote read: a read
    never waits for ever. Closing early stops it.
    """

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT):
        self.command, self.timeout = url[len("pipe:"):], timeout
        self.proc = subprocess.Popen(self.command, shell=True, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     preexec_fn=_stoppable, bufsize=0)
        self._fd, self._buf, self._pos, self._eof = self.proc.stdout.fileno(), bytearray(), 0, False

    def _fill(self) -> None:
        """At least one more chunk of the command's output into the buffer, or EOF; TimeoutError on a stall."""
        ready, _, _ = select.select([self._fd], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"pipe command {self.command!r} wrote nothing for {self.timeout:g} s (data.io_timeout)")
        chunk = os.read(self._fd, _PIPE_CHUNK)
        self._eof = not chunk
        if self._pos:  # drop what was read: one copy per chunk, not per read
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += chunk

    def read(self, n: int = -1) -> bytes:
        while not self._eof and (n < 0 or len(self._buf) - self._pos < n):
            self._fill()
        end = len(self._buf) if n < 0 else min(self._pos + n, len(self._buf))
        out = bytes(self._buf[self._pos:end])
        self._pos = end
        return out

    def __enter__(self) -> "PipeStream":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            while self.read(_PIPE_CHUNK):  # the tar's trailing padding: let the command finish
                pass
        self.proc.stdout.close()  # a reader that stopped early: the command gets SIGPIPE on its next write
        try:
            status = self.proc.wait(timeout=None if exc_type is None else 1)
        except subprocess.TimeoutExpired:
            # The whole group: a shell that ran a script has the script's own commands below it, which would
            # outlive it holding the trainer's stderr.
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return
        if status > 0 and exc_type is not GeneratorExit:  # the command's failure explains a short stream too
            raise OSError(f"pipe command {self.command!r} exited with status {status}") from exc


def _stoppable() -> None:
    """In a pipe command's process, before it runs: SIGTERM and SIGINT end it (the loader workers that start it
    ignore them, distributed/interruptions.py, and an ignored signal stays ignored across exec, where a shell
    cannot undo it), and it leads a process group of its own, which PipeStream can end whole."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)
    os.setpgid(0, 0)


def open_read(url: str, timeout: float = DEFAULT_TIMEOUT) -> IO[bytes]:
    """A binary stream over a whole object, read front to back."""
    if url.startswith("pipe:"):
        return PipeStream(url, timeout)
    if not is_remote(url):  # the loader's hot path: a plain buffered file, without fsspec's per-read wrapper
        return open(url, "rb", buffering=1 << 20)
    fs, path = filesystem(url, timeout)
    if fsspec.utils.get_protocol(url) in ("http", "https"):
        # One streaming GET instead of a HEAD and ranged reads, which not every web server supports; buffered
        # here, since each read of the raw stream is a round trip to fsspec's event-loop thread.
        return io.BufferedReader(fs.open(path, "rb", block_size=0), buffer_size=_HTTP_BUFFER)
    return fs.open(path, "rb")


def read_bytes(url: str, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """A whole (small) object: a manifest, say. Errors name the URL."""
    fs, path = filesystem(url, timeout)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist") from None
    except Exception as err:
        raise OSError(f"cannot read {url}: {type(err).__name__}: {err}") from err


def check_readable(url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Fail at start-up, naming the URL, when an object is missing or its store cannot be reached."""
    if url.startswith("pipe:"):
        return
    fs, path = filesystem(url, timeout)
    try:
        fs.info(path)
    except Exception as err:
        # fsspec's HTTP reports every failure as FileNotFoundError; its cause tells a dead server from a 404.
        cause = err.__cause__ if isinstance(err.__cause__, aiohttp.ClientConnectionError) else err
        if isinstance(cause, FileNotFoundError):
            raise FileNotFoundError(f"{url} does not exist") from None
        raise OSError(f"cannot reach {url}: {type(cause).__name__}: {cause}") from err


def _retryable(url: str, err: Exception) -> bool:
    # A local read that failed fails again; a missing or forbidden object will not appear within seconds.
    return is_remote(url) and not isinstance(err, (FileNotFoundError, PermissionError))


def tar_samples(url: str, retries: int = 3, backoff: float = 1.0, timeout: float = DEFAULT_TIMEOUT,
                max_bytes: int = MAX_SAMPLE_BYTES) -> Iterator[dict]:
    """The samples of one tar shard in order; a failed remote read is retried, resuming after the last sample given.
    A sample larger than max_bytes comes unread, saying why (tarread.samples).

    A retry reopens the shard and passes over the samples already yielded, so the caller sees exactly the samples
    of an unbroken read. After `retries` retries (waits of backoff, 2 x backoff, ...) the last error is raised.
    """
    done = 0
    for attempt in range(retries + 1):
        try:
            with open_read(url, timeout) as stream:
                samples = tarread.samples(stream, url, max_bytes)
                for _ in itertools.islice(samples, done):
                    pass  # yielded before the failure
                for sample in samples:
                    done += 1
                    yield sample
            return
        except Exception as err:
            if attempt == retries or not _retryable(url, err):
                raise
            wait = backoff * 2 ** attempt * (0.5 + _jitter.random())  # jitter: ranks do not retry in lockstep
            print(f"dcgan_dist.storage: reading {url} failed after {done} samples ({type(err).__name__}: {err}); "
                  f"retry {attempt + 1} of {retries} in {wait:.1f} s", file=sys.stderr)
            time.sleep(wait)
