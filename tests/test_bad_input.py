"""Every kind of bad or odd bytes gets a typed rejection or a documented conversion."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from steelsight.model.imageio import DecodeLimits, ImageRejected, RejectReason, decode_gray, read_gray


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


GRAY = Image.fromarray(np.random.default_rng(7).integers(0, 256, (48, 64), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge canvas: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


REJECTED = {
    "zero bytes": (b"", RejectReason.EMPTY),
    "random bytes": (np.random.default_rng(0).bytes(4096), RejectReason.NOT_AN_IMAGE),
    "html": (b"<!doctype html><html><body>hi</body></html>", RejectReason.NOT_AN_IMAGE),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', RejectReason.NOT_AN_IMAGE),
    "pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", RejectReason.NOT_AN_IMAGE),
    "zip": (b"PK\x03\x04" + b"\0" * 100, RejectReason.NOT_AN_IMAGE),
    "truncated png": (encode(GRAY, "PNG")[:1500], RejectReason.TRUNCATED),
    "truncated jpeg": (encode(GRAY, "JPEG")[:1000], RejectReason.TRUNCATED),
    "truncated bmp": (encode(GRAY, "BMP")[:1500], RejectReason.TRUNCATED),
    "1x1": (encode(Image.new("L", (1, 1)), "PNG"), RejectReason.TOO_SMALL),
    "needle 4000x2": (encode(Image.new("L", (4000, 2)), "PNG"), RejectReason.TOO_SMALL),
    "bomb": (png_header_only(60000, 60000), RejectReason.TOO_MANY_PIXELS),
}


@pytest.mark.parametrize("name", list(REJECTED))
def test_rejections_name_their_reason(name):
    data, reason = REJECTED[name]
    with pytest.raises(ImageRejected) as info:
        decode_gray(data)
    assert info.value.reason is reason
    assert info.value.detail


def test_byte_limit():
    with pytest.raises(ImageRejected) as info:
        decode_gray(encode(GRAY, "PNG"), DecodeLimits(max_bytes=100))
    assert info.value.reason is RejectReason.TOO_MANY_BYTES


def test_missing_file_is_a_rejection(tmp_path):
    with pytest.raises(ImageRejected) as info:
        read_gray(tmp_path / "missing.png")
    assert info.value.reason is RejectReason.UNREADABLE


RGB = Image.fromarray(np.dstack([np.full((40, 50), v, np.uint8) for v in (200, 100, 50)]))
CONVERTED = {
    "16-bit png": (encode(Image.fromarray(np.full((40, 50), 65535, np.uint16)), "PNG"), 255),
    "16-bit mid": (encode(Image.fromarray(np.full((40, 50), 32896, np.uint16)), "PNG"), 128),
    "rgba": (encode(RGB.convert("RGBA"), "PNG"), 124),
    "cmyk jpeg": (encode(RGB.convert("CMYK"), "JPEG", quality=100), None),
    "palette": (encode(RGB.convert("P"), "PNG"), 127),  # web palette's nearest colour: (204, 102, 51)
    "palette gif": (encode(RGB.convert("P"), "GIF"), 127),
    "1-bit": (encode(Image.new("1", (40, 50), 1), "PNG"), 255),
    "tiff": (encode(GRAY, "TIFF"), None),
    "webp": (encode(GRAY, "WEBP", lossless=True), None),
}


@pytest.mark.parametrize("name", list(CONVERTED))
def test_documented_conversions(name):
    data, value = CONVERTED[name]
    gray = decode_gray(data)
    assert gray.ndim == 2 and gray.dtype == np.uint8
    if value is not None:
        assert abs(int(np.median(gray)) - value) <= 2


def test_animated_gif_uses_first_frame():
    frames = [Image.new("L", (32, 32), v) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert int(np.median(decode_gray(buf.getvalue()))) == 10


def test_exif_rotation_is_applied():
    img = Image.new("L", (60, 30), 128)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(img, "JPEG", exif=exif.tobytes())
    assert decode_gray(data).shape == (60, 30)


def test_cli_predict_reports_bad_files_and_answers_good_ones(tmp_path, tiny_checkpoint, capsys):
    import json

    from steelsight.cli import main

    good = tmp_path / "good.png"
    GRAY.save(good)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rc = main(["predict", str(good), str(tmp_path / "bad.png"), "--json", "--checkpoint", str(tiny_checkpoint),
               "--cam-out", str(tmp_path / "cams")])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 3
    assert rows[0]["label"] and (tmp_path / "cams" / "good_cam.png").exists()
    assert rows[1]["error"]["reason"] == "not_an_image"
