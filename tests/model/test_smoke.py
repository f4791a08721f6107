"""The smoke check a checkpoint passes before a worker serves it (model/evaluation/smoke.py)."""

from __future__ import annotations

import pytest
import torch

from steelsight.contract import SAMPLE_FRAMES
from steelsight.model.evaluation.smoke import SmokeFailed, smoke_check
from steelsight.model.inference.checkpoint import SHIPPED_CHECKPOINT, load_checkpoint
from steelsight.model.inference.predictor import Predictor


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(SHIPPED_CHECKPOINT)


def test_the_shipped_checkpoint_passes(shipped):
    report = smoke_check(Predictor(shipped, torch.device("cpu"), backend="torch"), SAMPLE_FRAMES, 0.9)
    assert report.frames == 30 and report.accuracy >= 0.9


def test_a_head_stuck_on_one_class_is_refused(shipped):
    """A model that loads and gives finite outputs but reads one class for everything (a bad fine-tune)."""
    stuck = load_checkpoint(SHIPPED_CHECKPOINT)
    with torch.no_grad():
        stuck.model.head[-1].bias += torch.tensor([100.0, 0, 0, 0, 0, 0])
    with pytest.raises(SmokeFailed, match="labels 5 of 30"):
        smoke_check(Predictor(stuck, torch.device("cpu"), backend="torch"), SAMPLE_FRAMES, 0.9)


def test_classes_in_another_order_are_refused(shipped):
    swapped = load_checkpoint(SHIPPED_CHECKPOINT)
    swapped.meta.classes = list(reversed(swapped.meta.classes))
    with pytest.raises(SmokeFailed, match="classes"):
        smoke_check(Predictor(swapped, torch.device("cpu"), backend="torch"), SAMPLE_FRAMES, 0.9)
