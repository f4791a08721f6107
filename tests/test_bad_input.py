"""Every kind of bad or odd bytes gets a typed rejection or a documented conversion."""


import numpy as np
import pytest
from PIL import Image

from steelsight.model.imageio import DecodeLimits, ImageRejected, RejectReason, decode_gray, read_gray

from . import corpus
from .corpus import GRAY, RGB, encode

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
