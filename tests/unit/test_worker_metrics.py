"""The worker's metric labels stay bounded, and its drift metrics carry what the InputDrift rule reads."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import REGISTRY

from steelsight.worker import metrics


@pytest.fixture()
def fresh_labels(monkeypatch):
    monkeypatch.setattr(metrics, "_labelled_lines", set())
    monkeypatch.setattr(metrics, "_labelled_cameras", set())
    monkeypatch.setattr(metrics, "MAX_LINES", 2)
    monkeypatch.setattr(metrics, "MAX_CAMERAS", 3)


def test_lines_and_cameras_past_the_cap_are_labelled_other(fresh_labels):
    assert metrics.line_camera("L1", "c1") == ("L1", "c1")
    assert metrics.line_camera("L1", "c2") == ("L1", "c2")
    assert metrics.line_camera("L2", "c1") == ("L2", "c1")
    assert metrics.line_camera("L2", "c9") == ("L2", "other")  # a fourth camera
    assert metrics.line_camera("L3", "c1") == ("other", "other")  # a third line
    assert metrics.line_label("L3") == "other" and metrics.line_label("L2") == "L2"
    assert metrics.line_camera("L1", "c2") == ("L1", "c2"), "those labelled first keep their names"


def test_a_frames_input_statistics_go_to_its_lines_summaries(fresh_labels):
    def count(stat: str) -> float:
        return REGISTRY.get_sample_value("steelsight_input_stat_count", {"line": "L1", "stat": stat}) or 0.0

    before = {stat: count(stat) for stat in ("brightness", "contrast", "sharpness")}
    gray = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    metrics.observe_input("L1", gray)
    assert {stat: count(stat) - n for stat, n in before.items()} == {"brightness": 1, "contrast": 1, "sharpness": 1}


def test_the_training_reference_comes_from_the_checkpoint():
    stats = {"brightness": {"mean": 121.5, "std": 18.0}, "sharpness": {"mean": 0.7, "std": 0.1}}
    assert metrics.export_training_inputs(stats)
    assert REGISTRY.get_sample_value("steelsight_training_input_stat",
                                     {"stat": "brightness", "quantity": "std"}) == 18.0
    assert REGISTRY.get_sample_value("steelsight_training_input_stat",
                                     {"stat": "sharpness", "quantity": "mean"}) == 0.7
    assert not metrics.export_training_inputs({}), "an older checkpoint has no reference"
