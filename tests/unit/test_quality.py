import numpy as np
import pytest

from steelsight.model.evaluation.corruptions import CORRUPTIONS
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.quality import quality_issue
from steelsight.model.training.data import scan_folders

from ..helpers import SAMPLES

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(("frame", "issue"), [
    (np.zeros((200, 200), np.uint8), "blank_frame"),
    (np.full((200, 200), 131, np.uint8), "blank_frame"),
    (np.where(RNG.random((200, 200)) < 0.5, 0, 255).astype(np.uint8), "saturated_frame"),
    (RNG.integers(0, 256, (200, 200), dtype=np.uint8), "no_spatial_structure"),
    (np.clip(RNG.normal(128, 40, (200, 200)), 0, 255).astype(np.uint8), "no_spatial_structure"),
])
def test_frames_no_camera_on_steel_would_produce(frame, issue):
    assert quality_issue(frame) == issue


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_real_surfaces_pass_even_when_moderately_corrupted(corruption):
    fn, _ = CORRUPTIONS[corruption]
    for i, sample in enumerate(scan_folders(SAMPLES)):
        image = read_gray(sample.path)
        assert quality_issue(image) is None, sample.path.name
        assert quality_issue(fn(image, seed=i)) is None, (sample.path.name, corruption)
