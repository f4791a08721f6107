"""Transform presets: small functions, one per use (cf. torchvision references)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

if TYPE_CHECKING:  # albumentations takes ~2 s to import; inference never needs it
    import albumentations as A

REFLECT = cv2.BORDER_REFLECT_101
AUGMENT_PRESETS = ("standard", "strong", "blur", "motion")


def train_augment(size: int, strength: str = "standard") -> A.Compose:
    """Augmentation for grayscale uint8 (H, W) surfaces.

    Steel strip has no preferred orientation, so rotations span the full
    circle; the photometric part mimics line cameras (uneven light, sensor
    noise, motion and focus blur, lossy transport). ``strong`` applies the
    photometric faults more often and harder, for a robustness fine-tune;
    ``blur`` keeps the standard faults but blurs half the images, with longer
    motion streaks, for a fine-tune aimed at motion blur alone. ``motion`` is the
    standard preset plus a motion streak of 5-11 px on a further quarter of the
    images, for whole recipes (every stage) rather than fine-tunes.
    """
    if strength == "strong":
        return _augment(size, photometric_p=0.6, light=0.35, noise_std=(0.02, 0.15), motion=(3, 15), jpeg_p=0.3)
    if strength == "blur":
        return _augment(size, photometric_p=0.3, light=0.25, noise_std=(0.02, 0.12), motion=(5, 13), jpeg_p=0.2,
                        blur_p=0.5)
    if strength == "motion":
        return _augment(size, photometric_p=0.3, light=0.25, noise_std=(0.02, 0.12), motion=(3, 9), jpeg_p=0.2,
                        extra_motion=(5, 11))
    if strength != "standard":
        raise ValueError(f"unknown augmentation strength {strength!r}: {', '.join(AUGMENT_PRESETS)}")
    return _augment(size, photometric_p=0.3, light=0.25, noise_std=(0.02, 0.12), motion=(3, 9), jpeg_p=0.2)


def _augment(size: int, photometric_p: float, light: float, noise_std, motion, jpeg_p: float,
             blur_p: float | None = None, extra_motion: tuple[int, int] | None = None) -> A.Compose:
    import albumentations as A

    streaks = [A.MotionBlur(blur_limit=extra_motion, p=0.25)] if extra_motion else []

    return A.Compose(
        [
            A.Resize(size, size, interpolation=cv2.INTER_AREA),
            A.Rotate(limit=180, border_mode=REFLECT, p=0.7),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.OneOf(
                [
                    A.ElasticTransform(alpha=20, sigma=5, border_mode=REFLECT),
                    A.OpticalDistortion(distort_limit=0.3, border_mode=REFLECT),
                ],
                p=0.3,
            ),
            A.CLAHE(clip_limit=(1, 3), p=0.2),
            A.RandomBrightnessContrast(brightness_limit=light, contrast_limit=light, p=0.5),
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


def resize_for_model(gray: np.ndarray, size: int) -> np.ndarray:
    """Square resize; INTER_AREA when shrinking avoids aliasing on fine textures."""
    if gray.shape == (size, size):
        return gray
    shrinking = gray.shape[0] > size or gray.shape[1] > size
    return cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def to_tensor(gray: np.ndarray) -> torch.Tensor:
    """(H, W) uint8 -> (1, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(gray)).float().div_(255.0).unsqueeze(0)


def eval_batch(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Decoded gray images -> (N, 1, size, size) batch."""
    return torch.stack([to_tensor(resize_for_model(img, size)) for img in images])
