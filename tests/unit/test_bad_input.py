"""Every kind of bad or odd bytes gets a typed rejection or a documented conversion."""

import struct

import numpy as np
import pytest
from PIL import Image

from steelsight.model.inference.imageio import (
    DecodeLimits,
    ImageRejected,
    RejectReason,
    _decode_with_pillow,
    _gray_bmp_fast,
    decode_gray,
    read_gray,
)

from .. import corpus
from ..corpus import GRAY, RGB, encode
from ..helpers import SAMPLES

REJECTED = {frame.kind: (frame.data, frame.reason) for frame in corpus.REJECTED}


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
    assert int(np.median(decode_gray(corpus.animated_gif()))) == 10


def test_exif_rotation_is_applied():
    assert decode_gray(corpus.exif_rotated_jpeg()).shape == (60, 30)


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


def _top_down(bmp: bytes) -> bytes:
    """The same bottom-up 8-bit BMP stored top-down (negative height, rows reversed)."""
    data = bytearray(bmp)
    pixels_at, height = struct.unpack_from("<I", data, 10)[0], struct.unpack_from("<i", data, 22)[0]
    stride = (len(data) - pixels_at) // height
    rows = [data[pixels_at + i * stride: pixels_at + (i + 1) * stride] for i in range(height)]
    struct.pack_into("<i", data, 22, -height)
    data[pixels_at:] = b"".join(reversed(rows))
    return bytes(data)


def _with_palette(image: Image.Image, palette: list[int]) -> Image.Image:
    image = image.convert("P")
    image.putpalette(palette)
    return image


NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 201), np.uint8))  # odd width: row padding
GRAY_BMPS = {
    "shipped sample": next(SAMPLES.rglob("*.bmp")).read_bytes(),
    "odd width": encode(NOISE, "BMP"),
    "top-down": _top_down(encode(NOISE, "BMP")),
    "inverted gray palette": encode(_with_palette(NOISE, [255 - i for i in range(256) for _ in range(3)]), "BMP"),
}


@pytest.mark.parametrize("name", list(GRAY_BMPS))
def test_gray_bmp_fast_path_gives_pillows_pixels(name):
    data = GRAY_BMPS[name]
    fast = _gray_bmp_fast(data, DecodeLimits())
    assert fast is not None, "this BMP should take the OpenCV path"
    assert fast.dtype == np.uint8 and (fast == _decode_with_pillow(data, DecodeLimits())).all()


def test_colour_and_truncated_bmps_take_pillows_path():
    colour = encode(_with_palette(NOISE, [v for i in range(256) for v in (i, 255 - i, i // 2)]), "BMP")
    assert _gray_bmp_fast(colour, DecodeLimits()) is None
    assert (decode_gray(colour) == _decode_with_pillow(colour, DecodeLimits())).all()
    truncated = encode(NOISE, "BMP")[:-10]
    assert _gray_bmp_fast(truncated, DecodeLimits()) is None
    with pytest.raises(ImageRejected) as info:
        decode_gray(truncated)
    assert info.value.reason is RejectReason.TRUNCATED
    with pytest.raises(ImageRejected) as info:
        decode_gray(encode(NOISE, "BMP"), DecodeLimits(max_pixels=1000))
    assert info.value.reason is RejectReason.TOO_MANY_PIXELS


# the dashboard's display decoder: the same guards, RGB at display size -----------------------------

@pytest.mark.parametrize("name", list(REJECTED))
def test_display_decoder_rejects_what_the_worker_rejects(name):
    from steelsight.model.inference.imageio import decode_rgb

    data, reason = REJECTED[name]
    with pytest.raises(ImageRejected) as info:
        decode_rgb(data, max_side=64)
    assert info.value.reason is reason


@pytest.mark.parametrize("name", list(CONVERTED))
def test_display_decoder_shows_every_documented_conversion(name):
    from steelsight.model.inference.imageio import decode_rgb

    data, _ = CONVERTED[name]
    full, small = decode_rgb(data), decode_rgb(data, max_side=20)
    assert full.ndim == 3 and full.shape[2] == 3 and full.dtype == np.uint8
    assert full.shape[:2] == decode_gray(data).shape
    assert max(small.shape[:2]) == 20 and small.shape[2] == 3
    # the same surface: gray of the display image matches the worker's gray within a few levels
    luminance = full.astype(float) @ [0.299, 0.587, 0.114]  # ITU-R 601-2, as the worker's conversion
    assert abs(float(np.median(luminance)) - float(np.median(decode_gray(data)))) <= 3


def test_display_decoder_downscales_large_jpegs_while_decoding():
    from steelsight.model.inference.imageio import decode_rgb

    big = encode(Image.new("RGB", (4000, 3000), (200, 100, 50)), "JPEG", quality=90)
    shown = decode_rgb(big, max_side=512)
    assert shown.shape == (384, 512, 3)
    assert np.abs(shown[192, 256].astype(int) - (200, 100, 50)).max() <= 4
    assert decode_rgb(corpus.exif_rotated_jpeg(), max_side=20).shape == (20, 10, 3)  # orientation kept
    with pytest.raises(ImageRejected) as info:
        decode_rgb(big, DecodeLimits(max_pixels=1_000_000), max_side=512)
    assert info.value.reason is RejectReason.TOO_MANY_PIXELS
