"""What several test modules need alike: a run's TensorBoard events, a JPEG of an array, bit-for-bit comparisons of
weights, and a web server on 127.0.0.1 that records what was asked of it. (The trainer's tiny command line and its
overrides: tiny_run.py.)"""

from __future__ import annotations

import http.server
import io
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def events(run_dir):
    """A run's TensorBoard events (run_dir/tb), read with every event kept: EventAccumulator's default keeps a
    sample of 10,000 scalars and 4 images a tag, which could hide a step logged twice or not at all."""
    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    """One scalar of a run as (step, value) pairs, oldest first; steps count images."""
    return [(e.step, e.value) for e in events(run_dir).Scalars(tag)]


def jpeg(arr: np.ndarray) -> bytes:
    """A JPEG (quality 95) of uint8 pixels, greyscale written as RGB as photographs are (an RGB array's bytes are
    those of writing it directly)."""
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def assert_same_tensors(a: dict, b: dict, name: str) -> None:
    """Two state dicts bit for bit: the same keys, every tensor torch.equal (never allclose: a resumed or retried
    run repeats the arithmetic exactly, so any difference is a bug); the first one that differs is named."""
    assert a.keys() == b.keys(), f"{name}: keys differ: {sorted(a.keys() ^ b.keys())}"
    for key, value in a.items():
        assert torch.equal(value, b[key]), f"{name}.{key} differs"


def assert_same_weights(a, b, nets=("G", "D"), moments: tuple[str, str] | None = None) -> None:
    """Two checkpoints' networks bit for bit (assert_same_tensors), and with moments=(optimizer, moment), e.g.
    ("opt_D", "exp_avg_sq"), that optimizer's moment of every parameter too."""
    for net in nets:
        assert_same_tensors(getattr(a, net), getattr(b, net), net)
    if moments:
        opt, moment = moments
        per_parameter = [{k: s[moment] for k, s in getattr(c.resume, opt)["state"].items()} for c in (a, b)]
        assert_same_tensors(*per_parameter, f"{opt}.state.{moment}")


class LocalServer(http.server.ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 at a free port (`url`, ending in /), serving from a thread while in its with
    block, and closed at its end: every server a test starts is stopped by that test."""

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _FileHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the standard library's name)
        self.server.seen.append(self.path)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass  # a line on stderr for every request


class FileSite(LocalServer):
    """A web server holding `files` (URL path -> bytes; 404 for any other path), which records every path asked
    for, in order, in `seen`: what a command fetched, or that it fetched nothing."""

    def __init__(self, files: dict[str, bytes] | None = None):
        super().__init__(_FileHandler)
        self.files, self.seen = dict(files or {}), []
