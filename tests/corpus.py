"""A corpus of bad and odd frames, shared by the decoder, pipeline and upload-tab tests."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from steelsight.model.inference.imageio import RejectReason


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


GRAY = Image.fromarray(np.random.default_rng(7).integers(0, 256, (48, 64), dtype=np.uint8))
RGB = Image.fromarray(np.dstack([np.full((40, 50), v, np.uint8) for v in (200, 100, 50)]))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge canvas: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


def animated_gif() -> bytes:
    frames = [Image.new("L", (32, 32), v) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return encode(Image.new("L", (60, 30), 128), "JPEG", exif=exif.tobytes())


def noise_png(side: int) -> bytes:
    """Incompressible, so its size in bytes is about side²."""
    return encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (side, side), dtype=np.uint8)), "PNG")


@dataclass(frozen=True)
class BadFrame:
    kind: str
    data: bytes
    ext: str
    reason: RejectReason | None  # None: a documented conversion, the frame is answered


REJECTED = [
    BadFrame("zero-bytes", b"", "png", RejectReason.EMPTY),
    BadFrame("random-bytes", np.random.default_rng(0).bytes(4096), "png", RejectReason.NOT_AN_IMAGE),
    BadFrame("html", b"<!doctype html><html><body>hi</body></html>", "png", RejectReason.NOT_AN_IMAGE),
    BadFrame("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "png",
             RejectReason.NOT_AN_IMAGE),
    BadFrame("pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "jpg", RejectReason.NOT_AN_IMAGE),
    BadFrame("zip", b"PK\x03\x04" + b"\0" * 100, "bmp", RejectReason.NOT_AN_IMAGE),
    BadFrame("truncated-png", encode(GRAY, "PNG")[:1500], "png", RejectReason.TRUNCATED),
    BadFrame("truncated-jpeg", encode(GRAY, "JPEG")[:1000], "jpg", RejectReason.TRUNCATED),
    BadFrame("truncated-bmp", encode(GRAY, "BMP")[:1500], "bmp", RejectReason.TRUNCATED),
    BadFrame("one-by-one", encode(Image.new("L", (1, 1)), "PNG"), "png", RejectReason.TOO_SMALL),
    BadFrame("needle-4000x2", encode(Image.new("L", (4000, 2)), "PNG"), "png", RejectReason.TOO_SMALL),
    BadFrame("decompression-bomb", png_header_only(60000, 60000), "png", RejectReason.TOO_MANY_PIXELS),
]

CONVERTED = [
    BadFrame("16-bit", encode(Image.fromarray(np.full((40, 50), 32896, np.uint16)), "PNG"), "png", None),
    BadFrame("rgba", encode(RGB.convert("RGBA"), "PNG"), "png", None),
    BadFrame("cmyk-jpeg", encode(RGB.convert("CMYK"), "JPEG", quality=100), "jpg", None),
    BadFrame("palette", encode(RGB.convert("P"), "PNG"), "png", None),
    BadFrame("animated-gif", animated_gif(), "gif", None),
    BadFrame("exif-rotated-jpeg", exif_rotated_jpeg(), "jpg", None),
]

CORPUS = REJECTED + CONVERTED

# file names a camera or an engineer might produce; the producer turns each into a safe frame id
ODD_NAMES = ["../../etc/passwd.png", "frame with spaces & ümlauts.png", "..%2F..%2Fsecret.png", "__init__.png",
             "a;rm -rf ~.png", "$(reboot).png", "-leading-dash.png", "..png"]
