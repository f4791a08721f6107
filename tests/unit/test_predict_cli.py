"""`steelsight predict --cam-out`: every file gets its row, and overlays never follow a link."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from steelsight.cli import main

from ..helpers import SAMPLES

GOOD = SAMPLES / "scratches" / "Sc_1.bmp"


def _predict(tmp_path, tiny_checkpoint, capsys, *images) -> tuple[int, list[dict]]:
    rc = main(["predict", *map(str, images), "--json", "--checkpoint", str(tiny_checkpoint),
               "--cam-out", str(tmp_path / "cams"), "--backend", "torch"])
    return rc, json.loads(capsys.readouterr().out)


def test_long_names_each_get_a_result_and_an_overlay(tmp_path, tiny_checkpoint, capsys):
    long_ascii = tmp_path / ("x" * 250 + ".bmp")  # 254 bytes: "<stem>_cam.png" would be 258, over NAME_MAX
    long_utf8 = tmp_path / ("ä" * 125 + ".bmp")  # 125 characters, 254 bytes
    short = tmp_path / "short.bmp"
    for path in (long_ascii, long_utf8, short):
        shutil.copy(GOOD, path)
    rc, rows = _predict(tmp_path, tiny_checkpoint, capsys, long_ascii, long_utf8, short)
    assert rc == 0
    assert [row["path"] for row in rows] == [str(long_ascii), str(long_utf8), str(short)]
    overlays = [row["overlay"] for row in rows]
    assert all(row["label"] for row in rows)
    assert len(set(overlays)) == 3 and all(os.path.isfile(p) for p in overlays)
    assert all(len(os.fsencode(os.path.basename(p))) <= 255 for p in overlays)
    assert os.path.basename(overlays[2]) == "short_cam.png"


def test_overlays_never_write_through_a_symlink(tmp_path, tiny_checkpoint, capsys):
    cams = tmp_path / "cams"
    cams.mkdir()
    outside = tmp_path / "outside" / "planted.png"
    outside.parent.mkdir()
    (cams / "Sc_1_cam.png").symlink_to(outside)  # dangling: exists() says False
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (cams / "Sc_1_cam_1.png").symlink_to(victim)  # to an existing file
    rc, rows = _predict(tmp_path, tiny_checkpoint, capsys, GOOD)
    assert rc == 0
    assert not outside.exists() and victim.read_text() == "keep me"
    assert (cams / "Sc_1_cam.png").is_symlink() and (cams / "Sc_1_cam_1.png").is_symlink()
    written = rows[0]["overlay"]
    assert os.path.basename(written) == "Sc_1_cam_2.png" and not os.path.islink(written)
    assert Path(written).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_overlay_failure_does_not_hide_the_other_results(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    import steelsight.cli as cli

    write = cli._write_overlay

    def failing(folder, stem, rgb):
        if stem == "b":
            raise OSError(28, "No space left on device")
        return write(folder, stem, rgb)

    monkeypatch.setattr(cli, "_write_overlay", failing)
    paths = [tmp_path / f"{stem}.bmp" for stem in "abc"]
    for path in paths:
        shutil.copy(GOOD, path)
    rc, rows = _predict(tmp_path, tiny_checkpoint, capsys, *paths)
    assert rc == cli.EXIT_SOME_REJECTED
    assert [bool(row.get("label")) for row in rows] == [True, True, True]  # every prediction reported
    assert os.path.isfile(rows[0]["overlay"]) and os.path.isfile(rows[2]["overlay"])
    assert "overlay" not in rows[1] and "No space left" in rows[1]["overlay_error"]
