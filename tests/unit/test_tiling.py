"""Tiling wide frames at the model's scale (model/inference/tiling.py, Predictor.explain_frames)."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from steelsight.contract import FrameResult, Settings, TileVerdict
from steelsight.model.inference.tiling import (
    BACKGROUND,
    UNKNOWN,
    FramePlan,
    Tile,
    TilingConfig,
    TooManyTiles,
    Window,
    axis_starts,
    crop_tile,
    is_background,
    plan_frame,
    stitch,
    summarise,
    tile_count,
)

SIZE = 64  # the tiny checkpoint's input size


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Blurred noise: structured enough for the input-quality gate, not background."""
    rng = np.random.default_rng(seed)
    return np.clip(cv2.GaussianBlur(rng.normal(128, 40, (height, width)), (0, 0), 1.5), 0, 255).astype(np.uint8)


def test_windows_are_spread_evenly_and_end_at_the_edge():
    assert axis_starts(64, 64) == [0]
    assert axis_starts(40, 64) == [0]
    assert axis_starts(256, 64) == [0, 64, 128, 192]  # divides exactly: no overlap
    assert axis_starts(200, 64) == [0, 45, 91, 136]
    assert axis_starts(128, 64, overlap=16) == [0, 32, 64]  # at least 16 px overlap, here 32
    for length, overlap in ((1000, 0), (1000, 10), (333, 63)):
        starts = axis_starts(length, 64, overlap)
        assert starts[0] == 0 and starts[-1] + 64 == length
        assert all(0 < b - a <= 64 - overlap for a, b in itertools.pairwise(starts))


def test_layout_pads_a_short_axis_by_reflection():
    frame = texture(40, 200)
    plan = plan_frame(frame, TilingConfig(), SIZE)
    assert not plan.single
    assert [(w.x, w.y, w.w, w.h) for w in plan.windows] == [(0, 0, 64, 40), (45, 0, 64, 40), (91, 0, 64, 40),
                                                            (136, 0, 64, 40)]
    crops = plan.crops()
    assert all(c.shape == (SIZE, SIZE) for c in crops)
    np.testing.assert_array_equal(crops[1][:40], frame[:, 45:109])
    np.testing.assert_array_equal(crops[1][40:], frame[38:14:-1, 45:109])  # row 40 mirrors row 38
    assert crop_tile(frame[:1, :10], Window(0, 0, 10, 1), 16).shape == (16, 16)  # a one-pixel line


def test_overlap_and_rescaling_keep_windows_inside_the_frame():
    config = TilingConfig(overlap_px=16, frame_pixels_per_mm=20.0, model_pixels_per_mm=10.0)
    plan = plan_frame(texture(128, 512), config, SIZE)
    assert plan.scaled.shape == (64, 256)
    assert [(w.x, w.w) for w in plan.windows] == [(0, 64), (48, 64), (96, 64), (144, 64), (192, 64)]
    boxes = [plan.frame_box(w) for w in plan.windows]  # back in the frame's own pixels
    assert boxes[0] == (0, 0, 128, 128) and boxes[-1] == (384, 0, 128, 128)
    assert tile_count(128, 512, config, SIZE) == 5


def test_stitching_averages_where_tiles_overlap():
    gray = np.zeros((10, 30), np.uint8)
    plan = FramePlan(gray, gray, 20, [Window(0, 0, 20, 10), Window(10, 0, 20, 10), Window(0, 0, 5, 10, True)])
    heat = stitch(plan, [np.full((20, 20), 0.2, np.float32), np.full((20, 20), 0.6, np.float32), None])
    np.testing.assert_allclose(heat[:, :5], 0.1)  # 0.2 and a background zero
    np.testing.assert_allclose(heat[:, 5:10], 0.2)
    np.testing.assert_allclose(heat[:, 10:20], 0.4)
    np.testing.assert_allclose(heat[:, 20:], 0.6)
    assert heat.dtype == np.float32 and heat.shape == gray.shape


def test_a_frame_within_one_tile_takes_the_whole_frame_path(tiny_predictor):
    frames = [texture(64, 64, 1), texture(50, 60, 2), texture(80, 30, 3)[:64]]
    expected = tiny_predictor.explain(frames)
    got = tiny_predictor.explain_frames(frames, TilingConfig())
    for exp, frame in zip(expected, got, strict=True):
        assert frame.to_dict() == exp.to_dict() and frame.tiles == []
        np.testing.assert_array_equal(frame.heatmap, exp.heatmap)
        np.testing.assert_array_equal(frame.overlay, exp.overlay)
    preds = tiny_predictor.predict_frames(frames, TilingConfig())
    assert [p.to_dict() for p in preds] == [p.to_dict() for p in tiny_predictor.predict(frames)]


def test_too_many_tiles_are_refused_before_inference(tiny_predictor):
    config = TilingConfig(max_tiles=3)
    assert tile_count(64, 300, config, SIZE) == 5
    with pytest.raises(TooManyTiles, match="5 tiles") as info:
        tiny_predictor.explain_frames([texture(64, 64), texture(64, 300)], config)
    assert isinstance(info.value, ValueError) and info.value.tiles == 5
    assert len(tiny_predictor.predict_frames([texture(64, 192)], config)[0].tiles) == 3


def test_tile_labels_equal_explain_on_the_same_crops(tiny_predictor):
    frames = [texture(64, 256, 4), texture(100, 150, 5), texture(64, 64, 6)]
    config = TilingConfig(overlap_px=8)
    got = tiny_predictor.explain_frames(frames, config)
    for frame, result in zip(frames[:2], got[:2], strict=True):
        plan = plan_frame(frame, config, SIZE)
        alone = tiny_predictor.explain(plan.crops())
        assert [t.label for t in result.tiles] == [e.label for e in alone]
        assert [t.unknown for t in result.tiles] == [e.unknown for e in alone]
        for tile, exp in zip(result.tiles, alone, strict=True):
            assert tile.probabilities == pytest.approx(exp.probabilities, abs=1e-5)
            assert (tile.x, tile.y, tile.w, tile.h) in {(w.x, w.y, w.w, w.h) for w in plan.windows}
        assert result.heatmap.shape == frame.shape and result.overlay.shape == (*frame.shape, 3)
        assert result.label in {*tiny_predictor.classes, UNKNOWN, BACKGROUND}
    assert got[2].tiles == []


def test_dark_margins_are_background_and_the_strip_is_tiled_from_its_edge(tiny_predictor):
    strip = texture(64, 4 * SIZE, 7)
    dark = np.clip(np.random.default_rng(8).normal(10, 1.5, (64, 40)), 0, 255).astype(np.uint8)  # sensor noise
    frame = np.concatenate([dark, strip, dark], axis=1)
    result = tiny_predictor.explain_frames([frame], TilingConfig())[0]
    boxes = [(t.x, t.w, t.label) for t in result.tiles]
    assert boxes[0] == (0, 40, BACKGROUND) and boxes[-1] == (40 + 4 * SIZE, 40, BACKGROUND)
    strip_tiles = result.tiles[1:-1]
    assert [t.x for t in strip_tiles] == [40, 104, 168, 232]
    expected = tiny_predictor.explain([strip[:, i * SIZE : (i + 1) * SIZE] for i in range(4)])
    assert [t.label for t in strip_tiles] == [e.label for e in expected]
    assert not any(t.label == BACKGROUND for t in strip_tiles)
    assert sum(result.defect_counts.values()) == sum(not t.unknown for t in strip_tiles)
    assert float(result.heatmap[:, :40].max()) == 0.0  # nothing to explain on a margin
    # a margin narrower than min_margin_px stays part of the strip
    narrow = np.concatenate([dark[:, :20], strip], axis=1)
    assert all(not w.background for w in plan_frame(narrow, TilingConfig(), SIZE).windows)


def test_flat_dark_or_white_tiles_inside_a_frame_are_background(tiny_predictor):
    frame = texture(64, 3 * SIZE, 9)
    frame[:, SIZE : 2 * SIZE] = 252  # a saturated, flat tile between two textured ones
    tiles = tiny_predictor.explain_frames([frame], TilingConfig())[0].tiles
    assert [t.label == BACKGROUND for t in tiles] == [False, True, False]
    blank = tiny_predictor.explain_frames([np.full((64, 200), 5, np.uint8)], TilingConfig())[0]
    assert blank.label == BACKGROUND and not blank.unknown and len(blank.tiles) == 1
    assert blank.defect_counts == {} and blank.top_defect is None
    config = TilingConfig()
    assert is_background(np.full((8, 8), 0, np.uint8), config)
    assert not is_background(np.full((8, 8), 128, np.uint8), config)  # mid-gray blank: the quality gate's call
    assert not is_background(texture(64, 64), config)


def test_the_frame_label_is_the_most_confident_defect_else_unknown_else_background():
    def tile(label, confidence, unknown=False, ood=None):
        return Tile(0, 0, 1, 1, label, confidence, unknown, "ood_score" if unknown else None, None, ood)

    summary = summarise([tile("crazing", 0.7), tile("patches", 0.9, unknown=True), tile("scratches", 0.8),
                         tile("crazing", 0.6), tile(BACKGROUND, 1.0)])
    assert summary.label == "scratches" and summary.top_defect.confidence == 0.8
    assert summary.defect_counts == {"crazing": 2, "scratches": 1}
    summary = summarise([tile("crazing", 0.7, True, 3.0), tile("patches", 0.9, True, 9.0), tile(BACKGROUND, 1.0)])
    assert summary.label == UNKNOWN and summary.representative.ood_score == 9.0 and summary.top_defect is None
    assert summarise([tile(BACKGROUND, 1.0)]).label == BACKGROUND


def test_a_frame_mostly_unknown_is_unknown_with_its_defect_tiles_still_named():
    def tile(label, confidence, unknown=False, ood=None):
        return Tile(0, 0, 1, 1, label, confidence, unknown, "ood_score" if unknown else None, None, ood)

    # 2 of 3 analysed tiles unknown (background does not count): the defect label would be a guess
    tiles = [tile("inclusion", 0.98), tile("patches", 0.6, True, 12.0), tile("crazing", 0.5, True, 20.0),
             tile(BACKGROUND, 1.0), tile(BACKGROUND, 1.0)]
    summary = summarise(tiles, 0.5)
    assert summary.label == UNKNOWN and summary.representative.ood_score == 20.0
    assert summary.top_defect.label == "inclusion" and summary.defect_counts == {"inclusion": 1}
    assert summarise(tiles, 0.7).label == "inclusion"  # 2/3 < 0.7
    assert summarise(tiles, 1.0).label == "inclusion"  # 1.0: any defect tile names the frame
    assert summarise(tiles[:2], 0.5).label == UNKNOWN  # exactly the share
    assert summarise([tiles[0], *tiles[:2]], 0.5).label == "inclusion"  # 1 of 3
    with pytest.raises(ValueError, match="unknown_share"):
        TilingConfig(unknown_share=0.0)


def test_an_unknown_frame_takes_the_reason_of_most_of_its_unknown_tiles():
    def tile(reason, ood):
        return Tile(0, 0, 1, 1, "crazing", 0.5, True, reason, None, ood)

    # the one blurred-looking tile has the highest score, but most tiles are unfamiliar
    summary = summarise([tile("ood_score", 3.0), tile("ood_score", 4.0), tile("blurred", 9.0)], 0.5)
    assert summary.representative.unknown_reason == "ood_score" and summary.representative.ood_score == 4.0
    # most are camera faults: the commonest camera reason, its most out-of-distribution tile
    summary = summarise([tile("noisy", 2.0), tile("blurred", 3.0), tile("blurred", 5.0), tile("ood_score", 9.0)])
    assert summary.representative.unknown_reason == "blurred" and summary.representative.ood_score == 5.0
    # a tie between the kinds goes to unfamiliar: "check the product" before "clean the lens"
    assert summarise([tile("blurred", 9.0), tile("ood_score", 1.0)]).representative.unknown_reason == "ood_score"


def test_the_share_rule_holds_at_its_exact_boundary():
    from steelsight.model.inference.tiling import share_reached

    assert share_reached(7, 100, 0.07) and share_reached(7, 50, 0.14) and share_reached(1, 2, 0.5)
    assert not share_reached(6, 100, 0.07) and not share_reached(0, 0, 0.5)


def test_frame_fields_for_an_unknown_frame(tiny_predictor):
    frames = [np.concatenate([texture(64, 64, 10), np.full((64, 64), 128, np.uint8)], axis=1)]
    blank_half = tiny_predictor.predict_frames(frames, TilingConfig())[0]
    blank = blank_half.tiles[1]
    assert blank.unknown and blank.unknown_reason == "blank_frame" and blank.label != BACKGROUND
    # one of two tiles unknown reaches the default share: the frame is unknown, for the blank tile's reason
    assert blank_half.label == UNKNOWN and blank_half.unknown and blank_half.unknown_reason == "blank_frame"
    assert blank_half.to_dict()["unknown_kind"] == "camera"
    result = tiny_predictor.predict_frames(frames, TilingConfig(unknown_share=1.0))[0]
    if result.top_defect is None:
        assert result.label == UNKNOWN and result.unknown
    else:
        assert result.label == result.top_defect.label and not result.unknown
        assert result.probabilities == result.top_defect.probabilities
        assert result.to_dict()["unknown_kind"] is None


def test_settings_and_contract_carry_the_tiling(tiny_predictor):
    # the default tiles at NEU's 200 px, the scale the shipped model learned at; the rest are the model's defaults
    assert TilingConfig.from_settings(Settings()) == TilingConfig(
        tile_size=200, max_tiles=Settings().max_tiles_per_frame, unknown_share=Settings().frame_unknown_share)
    config = TilingConfig.from_settings(Settings(tile_size=96, tile_overlap_px=8, frame_pixels_per_mm=4.0,
                                                 model_pixels_per_mm=2.0, max_tiles_per_frame=9))
    assert (config.tile_size, config.overlap_px, config.scale, config.max_tiles) == (96, 8, 0.5, 9)
    frame = tiny_predictor.predict_frames([texture(64, 160)], TilingConfig())[0]
    fields = {"frame_id": "f", "job_id": "j", "line_id": "l", "camera_id": "c", "captured_at": "2026-01-01T00:00:00Z",
              "status": "ok", "frame_key": "k", "timings": {"queue_wait_s": 0, "inference_s": 0, "total_s": 0}}
    data = frame.to_dict()
    result = FrameResult(**fields, **{k: data[k] for k in ("label", "confidence", "tiles", "defect_counts",
                                                           "top_defect")})
    assert [t.model_dump() for t in result.tiles] == [TileVerdict.model_validate(t).model_dump()
                                                      for t in data["tiles"]]
    assert len(result.tiles) == 3
    assert FrameResult(**fields).tiles == [] and FrameResult(**fields).top_defect is None


def test_no_neu_image_is_background(neu_dir):
    """The tile-level background test must never fire on real steel, nor trim a NEU image's edge as margin."""
    from steelsight.model.inference.tiling import strip_extent

    config = TilingConfig()
    paths = sorted((neu_dir / "images").glob("*/*.bmp"))
    assert len(paths) == 1440
    fired, trimmed = 0, 0
    for path in paths:
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        fired += is_background(gray, config)
        trimmed += strip_extent(gray, config) != (0, gray.shape[1], 0, gray.shape[0])
    assert (fired, trimmed) == (0, 0)


@pytest.fixture
def small_tile_budget(monkeypatch):
    """The CLI reads the limit from the settings: 16 tiles make the huge test image too many."""
    from steelsight import contract

    contract.get_settings.cache_clear()
    monkeypatch.setenv("STEELSIGHT_MAX_TILES_PER_FRAME", "16")
    yield
    contract.get_settings.cache_clear()


def test_predict_command_reports_tiles_and_writes_the_full_size_overlay(tmp_path, tiny_checkpoint, capsys,
                                                                         small_tile_budget):
    import json

    from PIL import Image

    from steelsight.cli import EXIT_SOME_REJECTED, main

    dark = np.full((64, 40), 6, np.uint8)
    wide, small, huge = tmp_path / "wide.png", tmp_path / "small.png", tmp_path / "huge.png"
    cv2.imwrite(str(wide), np.concatenate([dark, texture(64, 4 * SIZE), dark], axis=1))
    cv2.imwrite(str(small), texture(64, 64))
    cv2.imwrite(str(huge), texture(64, 64 * 20))
    rc = main(["predict", str(wide), str(small), str(huge), "--json", "--checkpoint", str(tiny_checkpoint),
               "--backend", "torch", "--cam-out", str(tmp_path / "cams"), "--tile-size", str(SIZE),
               "--tile-overlap", "8"])
    rows = json.loads(capsys.readouterr().out)
    assert rc == EXIT_SOME_REJECTED  # the huge one, under a limit of 16 tiles below
    assert [t["label"] for t in (rows[0]["tiles"][0], rows[0]["tiles"][-1])] == [BACKGROUND, BACKGROUND]
    assert len(rows[0]["tiles"]) == 2 + 5  # 256 px of strip in 64 px tiles overlapping by >= 8 px
    assert set(rows[0]) >= {"defect_counts", "top_defect", "overlay"}
    with Image.open(rows[0]["overlay"]) as overlay:
        assert overlay.size == (4 * SIZE + 80, 64)
    assert "tiles" not in rows[1] and rows[1]["label"]
    assert rows[2]["error"]["reason"] == "too_many_tiles"



def test_a_dark_frame_whose_rows_are_flat_but_columns_are_not_is_background(tiny_predictor):
    # each row flat and dark, a gradient down the columns: a lens-capped camera's vignetting
    frame = np.repeat((np.arange(256, dtype=np.float32) * 20 / 256).astype(np.uint8)[:, None], 400, axis=1)
    good = texture(256, 400)
    out = tiny_predictor.predict_frames([good, frame], TilingConfig(tile_size=200))  # the product's tile
    assert out[1].label == BACKGROUND and [t.label for t in out[1].tiles] == [BACKGROUND]
    assert out[0].tiles and all(t.label != BACKGROUND for t in out[0].tiles)


def test_a_tiling_that_cannot_work_is_refused_where_it_is_configured():
    with pytest.raises(ValueError, match="tile_overlap_px"):
        Settings(tile_size=100, tile_overlap_px=100)
    with pytest.raises(ValueError, match="go together"):
        Settings(frame_pixels_per_mm=20.0)
    with pytest.raises(ValueError, match="go together"):  # the CLI's options build a TilingConfig directly
        TilingConfig(tile_size=200, frame_pixels_per_mm=20.0)


def test_a_batch_of_wide_frames_gets_time_for_its_tiles():
    from concurrent.futures import Future

    from steelsight.worker.engine import Loaded, tiles_in

    def done(value=None, error=None) -> Future:
        future = Future()
        future.set_exception(error) if error else future.set_result(value)
        return future

    gray = np.zeros((1, 1), np.uint8)
    loads = {"a": done(Loaded(gray, 16)), "b": done(Loaded(gray, 1)), "c": done(error=OSError("gone")),
             "d": Future()}  # still loading
    assert tiles_in(loads) == 16 + 1 + 1 + 1
