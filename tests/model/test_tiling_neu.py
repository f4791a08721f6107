"""Tiling with the shipped checkpoint: NEU val images side by side must read as they do alone."""

from __future__ import annotations

import numpy as np
import pytest

from steelsight.contract import Settings
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.predictor import Predictor
from steelsight.model.inference.tiling import BACKGROUND, TilingConfig
from steelsight.model.training.data import annotation_for, box_mask, read_voc_boxes, scan_folders, training_split

PER_STRIP = 8
PER_CLASS = 4  # 24 held-out images: three 1600 x 200 strips


@pytest.fixture(scope="module")
def tiling() -> TilingConfig:
    """The product's default: frames at NEU's resolution need no setting."""
    return TilingConfig.from_settings(Settings())


@pytest.fixture(scope="module")
def shipped() -> Predictor:
    return Predictor.load(device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def val(shipped, neu_dir):
    """The first PER_CLASS images per class of the checkpoint's held-out split, interleaved by class."""
    _, held_out = training_split(scan_folders(neu_dir), shipped.meta.training)
    by_class = [[s for s in held_out if s.label == label][:PER_CLASS] for label in range(len(shipped.classes))]
    samples = [group[i] for i in range(PER_CLASS) for group in by_class]
    return samples, [read_gray(s.path) for s in samples]


def _strips(images):
    return [np.concatenate(images[i : i + PER_STRIP], axis=1) for i in range(0, len(images), PER_STRIP)]


def test_strips_read_tile_by_tile_as_the_images_alone(shipped, val, tiling, neu_dir):
    from steelsight.model.evaluation.evaluate import heatmap_peak

    samples, images = val
    size = tiling.tile_size  # NEU's own side
    assert all(img.shape == (size, size) for img in images)
    alone = shipped.explain(images)
    strips = shipped.explain_frames(_strips(images), tiling)
    tiles = [t for strip in strips for t in strip.tiles]
    assert [(t.x, t.w, t.h) for t in tiles] == [(size * (i % PER_STRIP), size, size) for i in range(len(images))]
    assert [(t.label, t.unknown) for t in tiles] == [(e.label, e.unknown) for e in alone]
    assert all(t.label != BACKGROUND for t in tiles)
    for tile, exp in zip(tiles, alone, strict=True):
        assert tile.probabilities == pytest.approx(exp.probabilities, abs=1e-4)

    hits_alone = hits_tiled = scored = 0
    for i, (sample, exp) in enumerate(zip(samples, alone, strict=True)):
        mask = box_mask(read_voc_boxes(annotation_for(sample, neu_dir / "annotations")), sample.class_name,
                        exp.heatmap.shape)
        if mask is None:
            continue
        x = size * (i % PER_STRIP)
        tile_heat = strips[i // PER_STRIP].heatmap[:, x : x + size]
        np.testing.assert_allclose(tile_heat, exp.heatmap, atol=1e-3)
        scored += 1
        hits_alone += int(mask[heatmap_peak(exp.heatmap)])
        hits_tiled += int(mask[heatmap_peak(tile_heat)])
    assert scored >= 20
    assert hits_tiled == hits_alone

    for strip, start in zip(strips, range(0, len(images), PER_STRIP), strict=True):
        group = alone[start : start + PER_STRIP]
        defects = [e for e in group if not e.unknown]
        if defects:
            top = max(defects, key=lambda e: e.confidence)
            assert (strip.label, strip.confidence) == (top.label, pytest.approx(top.confidence, abs=1e-5))
        assert sum(strip.defect_counts.values()) == len(defects)
        assert strip.heatmap.shape == (size, PER_STRIP * size) and strip.overlay.shape == (size, PER_STRIP * size, 3)


def test_dark_margins_beside_a_strip_are_background(shipped, val, tiling):
    _, images = val
    strip = _strips(images)[0]
    rng = np.random.default_rng(0)
    margin = np.clip(rng.normal(12, 2, (strip.shape[0], 100)), 0, 255).astype(np.uint8)
    framed = np.concatenate([margin, strip, margin], axis=1)
    plain, with_margins = shipped.predict_frames([strip, framed], tiling)
    tiles = with_margins.tiles
    assert (tiles[0].x, tiles[0].w, tiles[0].label) == (0, 100, BACKGROUND)
    assert (tiles[-1].x, tiles[-1].w, tiles[-1].label) == (100 + strip.shape[1], 100, BACKGROUND)
    assert [(t.label, t.unknown) for t in tiles[1:-1]] == [(t.label, t.unknown) for t in plain.tiles]
    assert with_margins.defect_counts == plain.defect_counts and with_margins.label == plain.label
