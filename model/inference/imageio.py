"""Turn untrusted bytes into a grayscale uint8 surface, or a typed rejection.

Documented conversions (everything else is rejected with a reason):

* 1-bit, palette, RGB, RGBA, CMYK, YCbCr, LAB, HSV -> 8-bit luminance (ITU-R 601-2);
  alpha is dropped, transparent palette entries become their colour;
* 16-bit and 32-bit integer images -> scaled to 8 bits over their full range
  (0..65535 for I;16, min..max for 32-bit);
* EXIF orientation is applied;
* multi-frame files (animated GIF, multi-page TIFF) -> first frame.

:func:`decode_rgb` applies the same checks and gives RGB at display size, for the dashboard.

Uncompressed 8-bit gray BMPs (NEU's format) are decoded by OpenCV: the same pixels,
several times faster than Pillow's BMP reader. Everything else goes through Pillow.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from steelsight.contract import MAX_FRAME_BYTES

DEFAULT_MAX_BYTES = MAX_FRAME_BYTES
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MIN_SIDE = 16


class RejectReason(StrEnum):
    EMPTY = "empty"
    TOO_MANY_BYTES = "too_many_bytes"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    TOO_MANY_PIXELS = "too_many_pixels"
    TOO_SMALL = "too_small"
    UNSUPPORTED_MODE = "unsupported_mode"
    UNREADABLE = "unreadable"


class ImageRejected(ValueError):
    """The bytes are not a usable surface image; ``reason`` says why."""

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE


_DEEP_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_gray(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return (np.asarray(img, dtype=np.uint32) // 257).astype(np.uint8)
    if mode == "I":
        arr = np.asarray(img, dtype=np.int64)
        lo, hi = int(arr.min()), int(arr.max())
        if hi <= 65535 and lo >= 0:
            return (arr // 257).astype(np.uint8)
        return ((arr - lo) * 255 // max(hi - lo, 1)).astype(np.uint8)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 if float(np.nanmax(arr)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale, 0, 255).astype(np.uint8)
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode == "P":
        img = img.convert("RGBA")
    if mode in ("1", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA"):
        return np.asarray(img.convert("RGB").convert("L"), dtype=np.uint8)
    raise ImageRejected(RejectReason.UNSUPPORTED_MODE, f"pixel mode {mode!r} is not supported")


def _check_bytes(data: bytes, limits: DecodeLimits) -> None:
    if not data:
        raise ImageRejected(RejectReason.EMPTY, "zero bytes")
    if len(data) > limits.max_bytes:
        raise ImageRejected(RejectReason.TOO_MANY_BYTES, f"{len(data)} bytes > limit {limits.max_bytes}")


def _check_size(width: int, height: int, limits: DecodeLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageRejected(
            RejectReason.TOO_MANY_PIXELS, f"{width}x{height} = {width * height} pixels > limit {limits.max_pixels}"
        )
    if min(width, height) < limits.min_side:
        raise ImageRejected(RejectReason.TOO_SMALL, f"{width}x{height} is below the {limits.min_side}px minimum side")


def _gray_bmp_fast(data: bytes, limits: DecodeLimits) -> np.ndarray | None:
    """Uncompressed 8-bit BMP with a gray palette (NEU's format) through OpenCV.

    Pillow's BMP reader checks the 256-entry palette in Python, most of a small frame's
    decode time; OpenCV decodes the same pixels directly. Anything else (colour palette,
    RLE, other depths, damaged headers) returns None and takes Pillow's path.
    """
    if len(data) < 54 or data[:2] != b"BM":
        return None
    pixels_at = struct.unpack_from("<I", data, 10)[0]
    header_size, width, height, _, bits, compression = struct.unpack_from("<IiiHHI", data, 14)
    if header_size < 40 or bits != 8 or compression != 0 or width <= 0 or height == 0:
        return None
    _check_size(width, abs(height), limits)
    if pixels_at + (width + 3) // 4 * 4 * abs(height) > len(data):  # truncated: Pillow says so, OpenCV only logs
        return None
    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return gray if gray is not None and gray.ndim == 2 and gray.shape == (abs(height), width) else None


def decode_gray(data: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Decode image bytes into an (H, W) uint8 array or raise :class:`ImageRejected`."""
    _check_bytes(data, limits)
    fast = _gray_bmp_fast(data, limits)
    return fast if fast is not None else _decode_with_pillow(data, limits)


def decode_rgb(data: bytes, limits: DecodeLimits = DecodeLimits(), max_side: int | None = None) -> np.ndarray:
    """Decode image bytes for display: (H, W, 3) uint8 RGB at most ``max_side`` px on the longer side.

    The same checks as :func:`decode_gray` (bytes and pixels before anything is decoded). JPEGs decode
    straight at a reduced scale (libjpeg's DCT scaling, Pillow's ``draft``); other formats are shrunk
    right after decoding, before any conversion, so the peak is one full-size image in the file's own
    mode (Pillow holds RGB at 4 bytes a pixel: 160 MB at the 40 Mpixel limit, 40 MB for 8-bit gray).
    """
    _check_bytes(data, limits)
    return _with_pillow(data, limits, lambda img: _display_rgb(img, max_side))


def _display_rgb(img: Image.Image, max_side: int | None) -> np.ndarray:
    deep = img.mode in _DEEP_GRAY_MODES
    if max_side and max(img.size) > max_side:
        if deep:  # Pillow cannot resample these modes
            img.load()
            img, deep = Image.fromarray(_to_gray(img)), False
        img.draft(None, (max_side, max_side))  # JPEG: the smallest DCT scale still >= max_side; others: no-op
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    else:
        img.load()
    img = ImageOps.exif_transpose(img) or img
    if deep:
        return np.repeat(_to_gray(img)[..., None], 3, axis=2)
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    try:
        return np.asarray(img.convert("RGB"))
    except ValueError as exc:
        raise ImageRejected(RejectReason.UNSUPPORTED_MODE, f"pixel mode {img.mode!r} cannot be shown") from exc


def _decode_with_pillow(data: bytes, limits: DecodeLimits) -> np.ndarray:
    def gray(img: Image.Image) -> np.ndarray:
        img.load()
        return _to_gray(ImageOps.exif_transpose(img) or img)

    return _with_pillow(data, limits, gray)


def _with_pillow(data: bytes, limits: DecodeLimits, finish) -> np.ndarray:
    """Open ``data`` with Pillow, check its size before decoding, then ``finish(img)``; every failure
    becomes an :class:`ImageRejected`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_size(*img.size, limits)
            img.seek(0)
            return finish(img)
    except ImageRejected:
        raise
    except UnidentifiedImageError as exc:
        raise ImageRejected(RejectReason.NOT_AN_IMAGE, "no known image format matches these bytes") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(RejectReason.TOO_MANY_PIXELS, str(exc)) from exc
    except (OSError, SyntaxError, EOFError) as exc:
        text = str(exc)
        reason = RejectReason.TRUNCATED if "truncat" in text.lower() or isinstance(exc, EOFError) else (
            RejectReason.UNREADABLE)
        raise ImageRejected(reason, text or type(exc).__name__) from exc
    except (ValueError, MemoryError, TypeError, IndexError) as exc:
        raise ImageRejected(RejectReason.UNREADABLE, f"{type(exc).__name__}: {exc}") from exc


def read_gray(path: str | Path, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Read and decode a file; a missing or unreadable file is an :class:`ImageRejected`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageRejected(RejectReason.TOO_MANY_BYTES, f"{size} bytes > limit {limits.max_bytes}")
        data = path.read_bytes()
    except OSError as exc:
        raise ImageRejected(RejectReason.UNREADABLE, f"{path}: {exc.strerror or exc}") from exc
    return decode_gray(data, limits)


def encode_png(rgb: np.ndarray, level: int = 0) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG bytes.

    Colour-mapped texture barely deflates, so level 0 (stored, no filter) is the
    default: much faster than level 1 for somewhat more bytes (``bench/explain_overhead.py``).
    """
    filter_ = cv2.IMWRITE_PNG_FILTER_UP if level else cv2.IMWRITE_PNG_FILTER_NONE
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_FILTER, filter_])
    if not ok:
        raise ValueError(f"PNG encoding failed for an array of shape {rgb.shape}")
    return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes: about as fast as stored PNG, ~10x smaller for an overlay."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an array of shape {rgb.shape}")
    return buf.tobytes()


def encode_overlay(rgb: np.ndarray, overlay_format: str, jpeg_quality: int = 90, png_level: int = 0) -> bytes:
    """An overlay as the worker stores it: ``"jpeg"`` or ``"png"``."""
    if overlay_format == "jpeg":
        return encode_jpeg(rgb, jpeg_quality)
    if overlay_format == "png":
        return encode_png(rgb, png_level)
    raise ValueError(f"unknown overlay format {overlay_format!r}: use jpeg or png")
