"""Image operations of both paths: decode any input, centre crop, antialiased resize (the shard tool and the
trainer share them, so a shard decodes the same in both), encode (the shard tool).

Arrays are uint8 (H, W, C) with C = 1 (greyscale stays greyscale) or 3. Decoding is strict: a truncated or corrupt
file raises BadImage with a readable reason instead of yielding grey padding. Images are someone else's files: one
whose header declares more than max_pixels pixels is refused before anything is decoded (a few KiB can declare
30,000 x 30,000 pixels, 2.7 GB decoded).
"""

from __future__ import annotations

import io
import re
import struct

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from ..limits import MAX_IMAGE_PIXELS
from .tarread import SKIPPED

FORMATS = ("jpg", "png", "webp", "raw")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")  # image files of a source, and image fields of a sample
SAMPLE_FIELDS = ("raw", *IMAGE_EXTS)  # where a sample's image may be, fastest first
# Raw pixels: this magic, then height, width, channels (little-endian u16, u16, u8), then uint8 HWC pixels.
# Nothing to decode, and lossless: the fastest format for the loader and the right one for FID.
RAW_MAGIC = b"DCGRAW1\0"
_RAW_HEADER = struct.Struct("<HHB")
_JPEG_MAGIC = b"\xff\xd8\xff"
_ADDRESS = re.compile(r" ?<[^>]* at 0x[0-9a-f]+>")  # object reprs would make manifests differ run to run


class BadImage(ValueError):
    """An input that is not a usable image; the message is the reason recorded in the manifest."""


def reason(err: Exception) -> str:
    """Why an input was dropped, in words that are the same on every run (no object addresses)."""
    if isinstance(err, BadImage):
        return str(err)
    if isinstance(err, UnidentifiedImageError):
        return "not an image: unrecognised format"
    return _ADDRESS.sub("", f"{type(err).__name__}: {err}")


def _check_pixels(height: int, width: int, max_pixels: int) -> None:
    """Refuse, from its header, an image larger than max_pixels: a bomb must not be decoded to find out."""
    if height * width > max_pixels:
        raise BadImage(f"{width:,} x {height:,} = {width * height:,} pixels, over the limit of {max_pixels:,} "
                       f"(data.max_image_pixels, the shard tool's --max-image-pixels): not decoded")


def _as_hwc(arr: np.ndarray) -> np.ndarray:
    return arr[:, :, None] if arr.ndim == 2 else arr


# EXIF orientation (tag 0x0112) -> the numpy steps that show the picture upright (PIL's exif_transpose table).
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
           7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}
BACKGROUND = 255  # transparent pixels are composited over white, as viewers and browsers show them


def _jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation of a JPEG, 1 (upright) when it has none; only files with an EXIF block pay for PIL."""
    if data.find(b"Exif\0\0", 0, 1 << 16) < 0:
        return 1
    with Image.open(io.BytesIO(data)) as img:
        return int(img.getexif().get(0x0112, 1) or 1)


def upright(arr: np.ndarray, orientation: int) -> np.ndarray:
    """A decoded image turned as its EXIF orientation says (phone photos are stored sideways)."""
    turn = _ORIENT.get(orientation)
    return arr if turn is None else np.ascontiguousarray(turn(arr))


def _decode_jpeg(data: bytes, min_side: int, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """libjpeg-turbo, scaled in the DCT domain to no less than min_side: several times faster than PIL."""
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    # Even scaled 1/8, libjpeg holds a progressive JPEG's coefficients at full size: check before any decoding.
    _check_pixels(height, width, max_pixels)
    grey = colorspace == "Gray"
    arr = simplejpeg.decode_jpeg(data, "GRAY" if grey else "RGB", min_height=min_side, min_width=min_side)
    orientation = _jpeg_orientation(data)
    arr = upright(_as_hwc(arr), orientation)
    return arr, (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _to_uint8(img: Image.Image) -> np.ndarray:
    """Any PIL mode as uint8 greyscale (H, W) or RGB (H, W, 3): alpha composited over BACKGROUND, 16-bit and
    32-bit integer greyscale rescaled to 0..255 (PIL's own conversion clips them to white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or wide.max(initial=0) <= 65535 else float(wide.max())
        return np.clip(np.round(wide * (255.0 / top)), 0, 255).astype(np.uint8)
    if img.mode == "F":
        return np.clip(np.round(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("LA")
        back = Image.new("L", img.size, BACKGROUND)
        back.paste(img.getchannel("L"), mask=img.getchannel("A"))
        return np.asarray(back)
    if img.mode in ("RGBA", "RGBa"):
        back = Image.new("RGB", img.size, (BACKGROUND,) * 3)
        back.paste(img.convert("RGB"), mask=img.getchannel("A"))
        return np.asarray(back)
    grey = img.mode in ("1", "L")
    return np.asarray(img.convert("L" if grey else "RGB"))


def _decode_pil(data: bytes, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as img:  # lazy: only the header is read until load()
        _check_pixels(img.height, img.width, max_pixels)  # PIL's own check only warns below 179 M pixels
        img.load()
        orientation = int(img.getexif().get(0x0112, 1) or 1)
        arr = upright(_as_hwc(_to_uint8(img)), orientation)
    return arr, arr.shape[:2]


def encode_raw(arr: np.ndarray) -> bytes:
    """uint8 HWC pixels as a raw sample (RAW_MAGIC, shape, pixels)."""
    h, w, c = arr.shape
    return RAW_MAGIC + _RAW_HEADER.pack(h, w, c) + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def decode_raw(data: bytes) -> np.ndarray:
    """A raw sample's pixels: a read-only uint8 HWC view of the bytes, checked against the recorded shape."""
    start = len(RAW_MAGIC) + _RAW_HEADER.size
    if len(data) < start:
        raise BadImage(f"raw sample of {len(data)} bytes is shorter than its header")
    h, w, c = _RAW_HEADER.unpack_from(data, len(RAW_MAGIC))
    if c not in (1, 3) or len(data) != start + h * w * c:
        raise BadImage(f"raw sample of {len(data) - start} pixel bytes, but its header says {h} x {w} x {c}")
    return np.frombuffer(data, np.uint8, offset=start).reshape(h, w, c)


def raw_prefix(resolution: int, channels: int) -> bytes:
    """The first bytes of every raw sample of resolution x resolution x channels: a sample that starts with them
    and is len(prefix) + resolution**2 * channels long holds exactly the pixels a batch needs (stream.py copies
    them straight into the batch, faster than through decode_image's array view: docs/loader.md)."""
    return RAW_MAGIC + _RAW_HEADER.pack(resolution, resolution, channels)


def decode(data: bytes, min_side: int = 0, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes -> (uint8 HWC array, original (height, width)); JPEGs may come out scaled down to >= min_side.
    An image of more than max_pixels pixels raises BadImage undecoded."""
    if not data:
        raise BadImage("zero-byte file")
    if data.startswith(RAW_MAGIC):
        arr = decode_raw(data)  # a view of the bytes: its size is the sample's, bounded where it was read
        _check_pixels(*arr.shape[:2], max_pixels)
        return arr, arr.shape[:2]
    if data.startswith(_JPEG_MAGIC):
        try:
            return _decode_jpeg(data, min_side, max_pixels)
        except BadImage:
            raise
        except ValueError:
            pass  # CMYK and other rarities libjpeg-turbo refuses; PIL decides, and names the fault if it also fails
    try:
        return _decode_pil(data, max_pixels)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError... for bad files
        raise BadImage(reason(err)) from None


def from_array(arr: np.ndarray) -> np.ndarray:
    """An in-memory image (H, W) or (H, W, 1|3) as a contiguous uint8 HWC array."""
    arr = _as_hwc(np.asarray(arr))
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise BadImage(f"unsupported array {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def _pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def resize_box(arr: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    """The square box (left, top, side) of arr, resized to size x size with Lanczos (antialiased) filtering."""
    left, top, side = box
    crop = np.ascontiguousarray(arr[top:top + side, left:left + side])
    if side == size:
        return crop
    # The crop is cut out first: resize(box=...) would let the filter reach pixels outside the box.
    return _as_hwc(np.asarray(_pil(crop).resize((size, size), Image.LANCZOS)))


def centre_box(height: int, width: int) -> tuple[int, int, int]:
    """The largest centred square: (left, top, side)."""
    side = min(height, width)
    return (width - side) // 2, (height - side) // 2, side


def centre_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre crop to a square and resize to size x size, antialiased."""
    return resize_box(arr, centre_box(*arr.shape[:2]), size)


def encode(arr: np.ndarray, fmt: str, quality: int) -> bytes:
    """uint8 HWC -> jpg (libjpeg-turbo, 4:4:4), png, webp or raw bytes; the same array gives the same bytes."""
    if fmt == "raw":
        return encode_raw(arr)
    if fmt == "jpg":
        colorspace = "GRAY" if arr.shape[2] == 1 else "RGB"
        return simplejpeg.encode_jpeg(np.ascontiguousarray(arr), quality, colorspace, "444")
    buf = io.BytesIO()
    if fmt == "png":
        _pil(arr).save(buf, format="PNG", compress_level=6)
    elif fmt == "webp":
        _pil(arr).save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown image format {fmt!r}; known: {', '.join(FORMATS)}")
    return buf.getvalue()


def decode_image(data: bytes, resolution: int, channels: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Image bytes -> uint8 (H, W, C) at resolution x resolution: centre-cropped and antialiased if needed; an
    image of more than max_pixels pixels raises BadImage undecoded."""
    arr, _ = decode(data, resolution, max_pixels)
    if arr.shape[2] != channels:
        img = _pil(arr).convert("L" if channels == 1 else "RGB")
        arr = np.asarray(img).reshape(*arr.shape[:2], channels)
    if arr.shape[:2] != (resolution, resolution):
        arr = centre_square(arr, resolution)
    return arr


def image_field(sample: dict) -> bytes:
    """The encoded image of a WebDataset sample (its first field named like an image); BadImage for a sample the
    tar reader passed over unread (tarread.SKIPPED says why)."""
    if SKIPPED in sample:
        raise BadImage(sample[SKIPPED])
    for ext in SAMPLE_FIELDS:
        if ext in sample:
            return sample[ext]
    for name, value in sample.items():  # a key with dots ("a.b.jpg") leaves the rest of it in the field name
        if not name.startswith("__") and name.rsplit(".", 1)[-1] in SAMPLE_FIELDS:
            return value
    raise ValueError(f"no image field (one of {', '.join(SAMPLE_FIELDS)})")
