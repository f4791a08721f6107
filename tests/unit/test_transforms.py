import albumentations as A
import numpy as np
import pytest

from steelsight.model.evaluation.corruptions import EXPOSURE_LEVELS
from steelsight.model.inference.preprocess import eval_batch
from steelsight.model.training.exposure import ExposureDrift
from steelsight.model.training.transforms import reseed, train_augment


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


@pytest.mark.parametrize("strength", ["standard", "strong", "blur", "motion", "motion-exposure"])
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


def test_exposure_drift_scales_about_the_frames_own_mean_then_shifts():
    image = np.tile(np.arange(60, 200, dtype=np.uint8), (8, 1))  # mean 129.5, nothing clipped below
    flat = ExposureDrift(gain=(0.5, 0.5), offset=0.0, p=1.0)(image=image)["image"]
    assert abs(float(flat.mean()) - float(image.mean())) < 1.0  # unlike albumentations' contrast, about 0
    assert np.ptp(flat) == pytest.approx(np.ptp(image) * 0.5, abs=1)
    shift = A.Compose([ExposureDrift(gain=(1.0, 1.0), offset=40.0, p=1.0)], seed=0)
    shifted = [shift(image=image)["image"] for _ in range(40)]
    offsets = [float(out.mean()) - float(image.mean()) for out in shifted]
    assert max(offsets) > 20 and min(offsets) < -20 and max(map(abs, offsets)) <= 40.5
    bright = ExposureDrift(gain=(1.35, 1.35), offset=0.0, p=1.0)(image=np.full((4, 4), 250, np.uint8))["image"]
    assert bright.dtype == np.uint8 and int(bright.max()) == 250  # a flat frame stays flat
    ends = np.array([[0, 10, 245, 255]], np.uint8)  # mean 127.5: x1.35 takes both ends past the uint8 range
    harsh = ExposureDrift(gain=(1.35, 1.35), offset=0.0, p=1.0)(image=ends)["image"]
    assert harsh.tolist() == [[0, 0, 255, 255]]  # clipped, not wrapped round


def test_exposure_preset_is_motion_severe_plus_one_drift():
    severe, drift = train_augment(64, "motion-severe").transforms, train_augment(64, "motion-exposure").transforms
    assert [type(t).__name__ for t in drift if not isinstance(t, ExposureDrift)] == [type(t).__name__ for t in severe]
    (exposure,) = [t for t in drift if isinstance(t, ExposureDrift)]
    assert exposure.p == 0.5 and exposure.gain == (0.6, 1.35) and exposure.offset == 40.0


def test_exposure_levels_scored_reach_past_the_trained_drift():
    """The brightness/contrast sweep is not the exposure drift's own range: it scores gains and offsets outside
    it. (RandomBrightnessContrast, about zero, still runs beside it.)"""
    (exposure,) = [t for t in train_augment(64, "motion-exposure").transforms if isinstance(t, ExposureDrift)]
    assert any(not exposure.gain[0] <= c <= exposure.gain[1] for c, _ in EXPOSURE_LEVELS)
    assert any(abs(b) > exposure.offset for _, b in EXPOSURE_LEVELS)


# run in a process of its own: forking loader workers from inside a long-lived test worker (with servers' threads
# and handlers) is not what training does
_LOADER_DRAWS = """
import albumentations as A, numpy as np, torch
from torch.utils.data import DataLoader, Dataset
from steelsight.model.training.exposure import ExposureDrift
from steelsight.model.training.transforms import seed_augment_worker

class Draws(Dataset):  # every item is the augmentation's draw on one fixed frame
    transform = A.Compose([ExposureDrift(p=1.0)])
    frame = np.tile(np.arange(60, 200, dtype=np.uint8), (8, 1))
    def __len__(self):
        return 8
    def __getitem__(self, index):
        return torch.from_numpy(self.transform(image=self.frame)["image"])

batches = []
for epoch in range(2):  # as training builds one loader per epoch, its generator seeded by the epoch
    loader = DataLoader(Draws(), batch_size=4, num_workers=2, worker_init_fn=seed_augment_worker,
                        generator=torch.Generator().manual_seed(epoch))
    batches += [batch.numpy().tobytes() for batch in loader]  # batch 0 from worker 0, batch 1 from worker 1
print(len(batches), len(set(batches)))
"""


def test_every_loader_worker_and_every_epoch_draws_its_own_augmentations():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _LOADER_DRAWS], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["4", "4"]  # 4 batches, all different


def test_a_reseeded_pipeline_draws_each_step_apart():
    """One seed for every step would make the two flips always agree: never a mirror image, only 180 degrees."""
    flips = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    reseed(flips, 0)
    frame = np.array([[0, 1], [2, 3]], np.uint8)
    draws = [flips(image=frame)["image"].tobytes() for _ in range(64)]
    assert len(set(draws)) == 4  # as is, mirrored either way, and turned
    reseed(flips, 0)
    assert [flips(image=frame)["image"].tobytes() for _ in range(64)] == draws  # the same seed, the same draws
