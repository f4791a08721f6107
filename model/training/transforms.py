"""Augmentation presets for training: one table of presets, one builder (cf. torchvision references)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # albumentations and cv2 are slow to import; --help needs neither
    import albumentations as A

_STANDARD = dict(photometric_p=0.3, light=0.25, noise_std=(0.02, 0.12), motion=(3, 9), jpeg_p=0.2)
# name -> (what it is for, the builder's parameters); the CLI's --augment choices and help come from here
AUGMENT_PRESETS: dict[str, tuple[str, dict]] = {
    "standard": ("line-camera faults: uneven light, sensor noise, motion and focus blur, lossy transport", _STANDARD),
    "strong": ("the same faults more often and harder, for a robustness fine-tune",
               dict(photometric_p=0.6, light=0.35, noise_std=(0.02, 0.15), motion=(3, 15), jpeg_p=0.3)),
    "blur": ("standard, with half the images blurred and longer motion streaks, for a motion-blur fine-tune",
             dict(_STANDARD, motion=(5, 13), blur_p=0.5)),
    "motion": ("standard plus a 5-11 px motion streak on a further quarter of the images, for whole recipes",
               dict(_STANDARD, extra_motion=(5, 11))),
    "motion-long": ("standard plus a 5-21 px motion streak on a further 40 % of the images, for a fine-tune "
                    "that holds under fast lines and long exposures",
                    dict(_STANDARD, extra_motion=(5, 21), extra_motion_p=0.4)),
    "motion-severe": ("standard plus a 7-25 px motion streak on half the images, for a fine-tune that holds "
                      "under streaks of a tenth of the frame",
                      dict(_STANDARD, extra_motion=(7, 25), extra_motion_p=0.5)),
    "motion-exposure": ("motion-severe plus exposure drift on half the images: gain about the frame's mean "
                        "x0.6-1.35 and an offset of -40 to +40 gray levels, as when a line's lighting or "
                        "camera gain changes (not the shipped recipe: MODEL_CARD.md says what it traded)",
                        dict(_STANDARD, extra_motion=(7, 25), extra_motion_p=0.5, exposure=((0.6, 1.35), 40.0))),
}


def train_augment(size: int, strength: str = "standard") -> A.Compose:
    """Augmentation for grayscale uint8 (H, W) surfaces with preset ``strength`` (:data:`AUGMENT_PRESETS`).

    Steel strip has no preferred orientation, so rotations span the full circle; the
    photometric part mimics line cameras.
    """
    if strength not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augmentation strength {strength!r}: {', '.join(AUGMENT_PRESETS)}")
    return _augment(size, **AUGMENT_PRESETS[strength][1])


def _augment(size: int, photometric_p: float, light: float, noise_std, motion, jpeg_p: float,
             blur_p: float | None = None, extra_motion: tuple[int, int] | None = None,
             extra_motion_p: float = 0.25, exposure: tuple[tuple[float, float], float] | None = None) -> A.Compose:
    import albumentations as A
    import cv2

    from steelsight.model.training.exposure import ExposureDrift

    reflect = cv2.BORDER_REFLECT_101
    streaks = [A.MotionBlur(blur_limit=extra_motion, p=extra_motion_p)] if extra_motion else []
    drift = [ExposureDrift(*exposure, p=0.5)] if exposure else []

    return A.Compose(
        [
            A.Resize(size, size, interpolation=cv2.INTER_AREA),
            A.Rotate(limit=180, border_mode=reflect, p=0.7),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.OneOf(
                [
                    A.ElasticTransform(alpha=20, sigma=5, border_mode=reflect),
                    A.OpticalDistortion(distort_limit=0.3, border_mode=reflect),
                ],
                p=0.3,
            ),
            A.CLAHE(clip_limit=(1, 3), p=0.2),
            A.RandomBrightnessContrast(brightness_limit=light, contrast_limit=light, p=0.5),
            *drift,
            A.GaussNoise(std_range=noise_std, p=photometric_p),
            A.OneOf(
                [
                    A.MotionBlur(blur_limit=motion),
                    A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.3, 2.0)),
                    A.MedianBlur(blur_limit=(3, 5)),
                ],
                p=photometric_p if blur_p is None else blur_p,
            ),
            *streaks,
            A.ImageCompression(quality_range=(25, 95), p=jpeg_p),
        ]
    )


def reseed(transform, seed: int) -> None:
    """Seed an albumentations pipeline with one generator that all its steps share.

    ``Compose.set_random_seed`` would give each step its own generator from the same seed, so steps that
    draw alike (the two flips, the two lighting changes) would always agree.
    """
    import random

    import numpy as np

    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def seed_augment_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reseed the dataset's augmentation from the worker's own torch seed.

    Albumentations keeps its own random state, which every worker of every epoch would otherwise copy
    unchanged from the main process: workers drew alike, and each epoch repeated the first epoch's draws.
    """
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if transform is not None:
        reseed(transform, info.seed % 2**32)
