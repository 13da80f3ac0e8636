"""Real photographs (scikit-image's) turned into the inputs the shard tool meets: LSUN's LMDB, nested folders with
broken files, archives. Shared by the tests/test_shard*.py files."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
          "camera", "clock", "coins", "moon", "page", "text", "brick", "grass", "gravel", "cell", "colorwheel")


def photos() -> list[np.ndarray]:
    """The whole photographs, RGB uint8."""
    out = []
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        out.append(np.stack([arr] * 3, axis=-1) if arr.ndim == 2 else arr[:, :, :3])
    return out


def distinct_images(n: int, side: int = 128) -> list[np.ndarray]:
    """n different images: each photograph whole, then its four quadrants, resized to about side pixels with
    varied aspect ratios."""
    crops = []
    for arr in photos():
        h, w = arr.shape[:2]
        crops.append(arr)
        crops += [arr[y:y + h // 2, x:x + w // 2] for y in (0, h // 2) for x in (0, w // 2)]
    if n > len(crops):
        raise ValueError(f"only {len(crops)} distinct images available")
    out = []
    for k, crop in enumerate(crops[:n]):
        aspect = (1.0, 1.25, 0.8, 1.5)[k % 4]
        out.append(np.asarray(Image.fromarray(crop).resize((round(side * aspect), side), Image.LANCZOS)))
    return out


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_lmdb(path: Path, images: list[np.ndarray]) -> list[str]:
    """An LMDB in LSUN's layout (40-hex-digit keys, WebP values); returns the keys in key order."""
    import lmdb

    keys = sorted(f"{k * 2654435761 % 16 ** 40:040x}" for k in range(1, len(images) + 1))
    with lmdb.open(str(path), map_size=1 << 28) as env, env.begin(write=True) as txn:
        for key, arr in zip(keys, images):
            txn.put(key.encode(), encode(arr, "WEBP", quality=90))
    return keys


BROKEN = {  # file -> the reason the manifest must give
    "sub/empty.png": "zero-byte file",
    "sub/deeper/not_an_image.jpg": "not an image: unrecognised format",
    "sub/deeper/notes.txt": "not an image file name (extension '.txt')",
    "truncated.jpg": "OSError: image file is truncated",
    "truncated.png": "OSError: image file is truncated",
}


def make_folder(root: Path, images: list[np.ndarray]) -> list[str]:
    """A nested folder of jpg/png/webp/bmp images plus the BROKEN files; returns the good files' ids, sorted."""
    formats = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("bmp", "BMP"))
    good = []
    for k, arr in enumerate(images):
        ext, fmt = formats[k % len(formats)]
        rel = f"{('', 'sub/', 'sub/deeper/')[k % 3]}img{k:03d}.{ext}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encode(arr, fmt))
        good.append(rel)
    (root / "sub/deeper").mkdir(parents=True, exist_ok=True)
    (root / "sub/empty.png").write_bytes(b"")
    (root / "sub/deeper/not_an_image.jpg").write_text("<html>a web page saved as .jpg</html>")
    (root / "sub/deeper/notes.txt").write_text("not an image")
    jpeg, png = encode(images[0], "JPEG"), encode(images[0], "PNG")
    (root / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (root / "truncated.png").write_bytes(png[:len(png) // 2])
    return sorted(good)


def make_archives(folder: Path, dest: Path) -> dict[str, Path]:
    """The folder as a zip, a plain tar and a gzipped tar (members in sorted order, like the folder's)."""
    import zipfile

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    out = {"zip": dest / "images.zip", "tar": dest / "images.tar", "tgz": dest / "images.tar.gz"}
    with zipfile.ZipFile(out["zip"], "w") as zf:
        for p in files:
            zf.write(p, p.relative_to(folder).as_posix())
    for key, mode in (("tar", "w"), ("tgz", "w:gz")):
        with tarfile.open(out[key], mode) as tf:
            for p in files:
                tf.add(p, p.relative_to(folder).as_posix())
    return out


def read_shards(outdir: Path) -> list[dict]:
    """Every sample of a shard directory, in manifest order, as {key, ext: bytes, meta: dict}."""
    manifest = json.loads((outdir / "manifest.json").read_text())
    samples = []
    for shard in manifest["shards"]:
        with tarfile.open(outdir / shard["name"]) as tf:
            grouped: dict[str, dict] = {}
            for member in tf:
                key, ext = member.name.split(".", 1)
                grouped.setdefault(key, {"key": key})[ext] = tf.extractfile(member).read()
        samples += grouped.values()
    for s in samples:
        s["meta"] = json.loads(s["json"])
    return samples


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def output_files(outdir: Path) -> dict[str, bytes]:
    """Every file under outdir by relative path, to compare two runs byte for byte."""
    return {p.relative_to(outdir).as_posix(): p.read_bytes() for p in sorted(outdir.rglob("*")) if p.is_file()}


def random_crops(n: int, seed: int = 0) -> list[np.ndarray]:
    """n LSUN-like images (about 180-260 px, varied aspect): random crops of the photographs."""
    rng = np.random.default_rng(seed)
    sources = photos()
    out = []
    for _ in range(n):
        arr = sources[rng.integers(len(sources))]
        h, w = arr.shape[:2]
        ch, cw = rng.integers(h // 3, h // 2 + 1), rng.integers(w // 3, w // 2 + 1)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        size = (int(rng.integers(180, 261)), int(rng.integers(180, 261)))
        out.append(np.asarray(Image.fromarray(arr[y:y + ch, x:x + cw]).resize(size, Image.BILINEAR)))
    return out
