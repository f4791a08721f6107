import albumentations as A
import numpy as np
import pytest

from steelsight.model.inference.preprocess import eval_batch
from steelsight.model.training.transforms import train_augment


def _names(transform) -> set[str]:
    names = {type(transform).__name__}
    for child in getattr(transform, "transforms", []):
        names |= _names(child)
    return names


def test_pipeline_holds_every_named_augmentation():
    names = _names(train_augment(64))
    for required in ("Rotate", "ElasticTransform", "OpticalDistortion", "CLAHE", "GaussNoise",
                     "MotionBlur", "GaussianBlur", "MedianBlur"):
        assert required in names
    rotate = next(t for t in train_augment(64).transforms if isinstance(t, A.Rotate))
    assert tuple(rotate.limit) == (-180, 180)


@pytest.mark.parametrize("strength", ["standard", "strong", "blur", "motion"])
def test_augmentation_keeps_grayscale_uint8_and_size(strength):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (200, 200), dtype=np.uint8)
    augment = train_augment(96, strength)
    outputs = [augment(image=image)["image"] for _ in range(25)]
    for out in outputs:
        assert out.shape == (96, 96) and out.dtype == np.uint8
    assert len({o.tobytes() for o in outputs}) > 20  # random, not a fixed transform


def test_every_member_runs_on_grayscale():
    image = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    for transform in train_augment(64).transforms:
        members = getattr(transform, "transforms", [transform])
        for member in members:
            member.p = 1.0
            out = member(image=image)["image"]
            assert out.ndim == 2 and out.dtype == np.uint8, type(member).__name__


def test_eval_batch_scales_to_unit_range():
    batch = eval_batch([np.full((50, 70), 255, np.uint8), np.zeros((200, 200), np.uint8)], 32)
    assert batch.shape == (2, 1, 32, 32)
    assert float(batch[0].min()) == 1.0 and float(batch[1].max()) == 0.0


def test_unknown_strength_is_refused():
    with pytest.raises(ValueError, match="standard, strong, blur, motion"):
        train_augment(64, "extreme")


def test_motion_preset_adds_a_streak_on_top_of_the_standard_faults():
    standard, motion = train_augment(64).transforms, train_augment(64, "motion").transforms
    assert len(motion) == len(standard) + 1
    streak = [t for t in motion if isinstance(t, A.MotionBlur)]
    assert len(streak) == 1 and streak[0].p == 0.25 and tuple(streak[0].blur_limit) == (5, 11)
