"""Per-tile ground truth (JSON and VOC XML), tile matching and the frame-level all-classes-found rate."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from steelsight.model.evaluation.tiles import (
    BACKGROUND,
    UNKNOWN,
    Region,
    TileScore,
    read_truth,
    read_truth_json,
    tile_truth,
    truth_path,
)

VOC = """<annotation><size><width>400</width><height>200</height></size>
<object><name>scratches</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>100</xmax><ymax>200</ymax></bndbox></object>
<object><name>inclusion</name><bndbox><xmin>251</xmin><ymin>51</ymin><xmax>300</xmax><ymax>100</ymax></bndbox></object>
</annotation>"""


@dataclass
class Tile:
    x: int
    y: int
    w: int
    h: int
    label: str
    confidence: float = 0.9
    unknown: bool = False
    unknown_reason: str | None = None


@dataclass
class Result:
    tiles: list[Tile]
    defect_counts: dict[str, int] = field(default_factory=dict)
    label: str = BACKGROUND
    confidence: float = 1.0
    unknown: bool = False
    unknown_reason: str | None = None


def test_json_truth_is_read_beside_the_frame(tmp_path):
    frame = tmp_path / "strip.png"
    frame.write_bytes(b"")
    frame.with_suffix(".json").write_text(json.dumps({"tiles": [
        {"x": 0, "y": 0, "w": 200, "h": 200, "label": "crazing", "source": "Cr_1.bmp"},
        {"x": 200, "y": 0, "w": 200, "h": 200, "label": "background"}]}))
    assert truth_path(frame) == frame.with_suffix(".json")
    assert read_truth(truth_path(frame)) == [Region(0, 0, 200, 200, "crazing"), Region(200, 0, 200, 200, BACKGROUND)]
    # <frame>.json (the image's full name) is found too, before <stem>.json
    frame.with_name("strip.png.json").write_text(json.dumps({"tiles": []}))
    assert truth_path(frame) == frame.with_name("strip.png.json")


@pytest.mark.parametrize("text", ['{"tiles": [{"x": 0, "y": 0, "w": 10}]}', '[{"x": 0}]',
                                  '{"tiles": [{"x": 0, "y": 0, "w": 0, "h": 5, "label": "crazing"}]}'])
def test_malformed_json_truth_is_refused_with_the_file_named(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"bad\.json"):
        read_truth_json(path)


def test_voc_truth_converts_one_based_inclusive_corners(tmp_path):
    frame = tmp_path / "wide.bmp"
    frame.write_bytes(b"")
    frame.with_suffix(".xml").write_text(VOC)
    assert truth_path(frame) == frame.with_suffix(".xml")
    assert read_truth(truth_path(frame)) == [Region(0, 0, 100, 200, "scratches"), Region(250, 50, 50, 50, "inclusion")]


def test_a_tile_takes_the_label_covering_most_of_it_or_is_not_scored():
    regions = [Region(0, 0, 200, 200, "crazing"), Region(200, 0, 200, 200, "patches")]
    assert tile_truth(Tile(150, 0, 100, 100, "x"), regions) == "crazing"  # a tie: the first region listed
    assert tile_truth(Tile(120, 0, 100, 100, "x"), regions) == "crazing"  # 80 against 20
    assert tile_truth(Tile(180, 0, 160, 160, "x"), regions) == "patches"  # 20 against 140
    assert tile_truth(Tile(400, 0, 100, 100, "x"), regions) is None  # outside every region: maybe clean steel
    small = [Region(0, 0, 40, 40, "inclusion")]  # 16% of a 100 px tile: under MIN_COVER
    assert tile_truth(Tile(0, 0, 100, 100, "x"), small) is None
    assert tile_truth(Tile(0, 0, 100, 100, "x"), [Region(0, 0, 100, 100, BACKGROUND)]) == BACKGROUND  # named
    assert tile_truth(Tile(0, 0, 100, 100, "x"), small, min_cover=0.1) == "inclusion"


def test_tile_accuracy_and_all_classes_found_on_a_hand_made_example():
    truth = [Region(0, 0, 200, 200, "crazing"), Region(200, 0, 200, 200, "scratches"),
             Region(400, 0, 200, 200, "background")]
    score = TileScore(["crazing", "scratches", BACKGROUND, UNKNOWN])
    # frame 1: every tile right, both classes found
    one = Result([Tile(0, 0, 200, 200, "crazing"), Tile(200, 0, 200, 200, "scratches"),
                  Tile(400, 0, 200, 200, BACKGROUND)], {"crazing": 1, "scratches": 1})
    # frame 2: scratches tile flagged unknown (its label right), so scratches is not among the defects found
    two = Result([Tile(0, 0, 200, 200, "crazing"), Tile(200, 0, 200, 200, "scratches", unknown=True),
                  Tile(400, 0, 200, 200, BACKGROUND)], {"crazing": 1})
    # frame 3: both found, but the background tile is called crazing: found, not exact
    three = Result([Tile(0, 0, 200, 200, "crazing"), Tile(200, 0, 200, 200, "scratches"),
                    Tile(400, 0, 200, 200, "crazing")], {"crazing": 2, "scratches": 1})
    rows = [score.add(r, truth, (200, 600)) for r in (one, two, three)]
    assert rows[1]["missed"] == ["scratches"] and rows[2]["extra"] == [] and rows[2]["missed"] == []
    report = score.to_dict()
    assert report["tiles"] == 9
    assert report["tile_accuracy"] == pytest.approx(7 / 9)  # frame 2's unknown and frame 3's false crazing
    assert report["tile_accuracy_ignoring_unknown"] == pytest.approx(8 / 9)
    assert report["tile_unknown_rate"] == pytest.approx(1 / 9)
    assert report["frames"] == 3
    assert report["all_classes_found_rate"] == pytest.approx(2 / 3)
    assert report["exact_class_set_rate"] == pytest.approx(2 / 3)  # frame 3's extra crazing is a tile, not a class
    lo, hi = report["all_classes_found_ci95"]
    assert lo < 2 / 3 < hi
    cm = report["confusion_matrix"]
    labels = report["confusion_labels"]
    assert cm[labels.index(BACKGROUND)][labels.index("crazing")] == 1
    assert cm[labels.index("scratches")][labels.index(UNKNOWN)] == 1
    assert sum(map(sum, cm)) == 9


def test_a_truth_class_without_any_tile_is_missed():
    score = TileScore(["crazing", BACKGROUND, UNKNOWN])
    row = score.add(Result([Tile(0, 0, 100, 100, "crazing")], {"crazing": 1}),
                    [Region(0, 0, 100, 100, "crazing"), Region(500, 0, 10, 10, "inclusion")], (100, 600))
    assert row["missed"] == ["inclusion"]
    assert score.to_dict()["all_classes_found_rate"] == 0.0


def test_make_strips_and_evaluate_them_with_one_command(tmp_path, capsys):
    """`evaluate --make-strips`: strips of val images with JSON truth, tiled as the worker tiles them, scored."""
    import torch

    from steelsight.cli import main
    from steelsight.model.inference.checkpoint import CheckpointMeta, save_checkpoint
    from steelsight.model.inference.network import AttentionResNet50
    from steelsight.model.training.data import scan_folders, stratified_split

    from ..helpers import SAMPLES

    torch.manual_seed(0)
    checkpoint = tmp_path / "split.safetensors"
    split = {"seed": 0, "val_fraction": 0.4}  # 2 of each class's 5 samples: 12 val images for 16 places
    save_checkpoint(AttentionResNet50().eval(), CheckpointMeta(input_size=64, training=split), checkpoint)
    out = tmp_path / "eval"
    assert main(["evaluate", "--make-strips", "2", "--data", str(SAMPLES), "--out", str(out), "--checkpoint",
                 str(checkpoint), "--device", "cpu", "--backend", "torch", "--tile-size", "200"]) == 0
    strips = sorted((out / "strips").glob("strip_*.png"))
    assert len(strips) == 2
    _, val = stratified_split(scan_folders(SAMPLES), 0.4, 0)
    val_names = {s.path.name for s in val}
    for strip in strips:
        truth = json.loads(strip.with_suffix(".json").read_text())["tiles"]
        assert [t["x"] for t in truth] == [200 * i for i in range(8)]
        assert len({t["source"] for t in truth}) == 8 and {t["source"] for t in truth} <= val_names
    report = json.loads((out / "report.json").read_text())["tiles"]
    # 200 px tiles (NEU's images, each resized to the model's 64 px input): eight per strip, exactly on the images
    assert report["frames"] == 2 and report["tiles"] == 16
    assert report["tiling"]["tile_size"] == 200
    first = report["per_frame"]["strip_000.png"]
    assert [t["truth"] for t in first["tiles"]] == [t["label"] for t in
                                                   json.loads(strips[0].with_suffix(".json").read_text())["tiles"]]
    assert [(t["x"], t["w"]) for t in first["tiles"]] == [(200 * i, 200) for i in range(8)]
    assert 0 <= report["tile_accuracy"] <= 1 and 0 <= report["all_classes_found_rate"] <= 1
    assert (out / "tile_confusion.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "tile accuracy" in printed and "all defect classes found" in printed


def test_dashboard_boxes_defect_tiles_in_their_class_colour_and_skips_background():
    import numpy as np

    from steelsight.dashboard.tiles import CLASS_COLOURS, UNKNOWN_COLOUR, draw_tiles, summary_text

    tiles = [Tile(0, 0, 100, 100, "crazing"), Tile(100, 0, 100, 100, BACKGROUND, 1.0),
             Tile(200, 0, 100, 100, "scratches", unknown=True), Tile(300, 0, 100, 100, "scratches", 0.8)]
    drawn = draw_tiles(np.full((50, 200, 3), 128, np.uint8), tiles)  # shown at half the frame's size

    def has(block, rgb):
        return bool((np.abs(block.astype(int) - rgb).max(axis=-1) == 0).any())

    assert has(drawn[:, :50], CLASS_COLOURS["crazing"])
    assert (drawn[:, 52:98] == 128).all()  # background: no box
    assert has(drawn[:, 100:150], UNKNOWN_COLOUR) and not has(drawn[:, 100:150], CLASS_COLOURS["scratches"])
    assert has(drawn[:, 150:], CLASS_COLOURS["scratches"])
    text = summary_text(tiles, {"crazing": 1, "scratches": 1}, tiles[0])
    assert text == "4 tiles · defect tiles: crazing 1, scratches 1 · top defect: crazing 0.90 at x=0 · 1 unknown"


def test_a_frame_of_one_tile_is_scored_as_one_tile_with_its_own_verdict():
    score = TileScore(["crazing", "patches", BACKGROUND, UNKNOWN])
    truth = [Region(0, 0, 200, 200, "patches")]
    right = Result([], {}, label="patches")
    flagged = Result([], {}, label="patches", unknown=True)
    rows = [score.add(r, truth, (200, 200)) for r in (right, flagged)]
    assert [r["found_classes"] for r in rows] == [["patches"], []]
    report = score.to_dict()
    assert (report["tiles"], report["tile_accuracy"], report["all_classes_found_rate"]) == (2, 0.5, 0.5)
