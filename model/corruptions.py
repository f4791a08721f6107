"""Common corruptions of grayscale uint8 images, each at a stated severity, and OOD image sets.

Severities are "moderate" line-camera faults; each function is deterministic
for a given seed so every number in the model card can be reproduced.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image


def gaussian_noise(img: np.ndarray, sigma: float = 15.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def gaussian_blur(img: np.ndarray, sigma: float = 1.5, seed: int = 0) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigma)


def motion_blur(img: np.ndarray, length: int = 9, seed: int = 0) -> np.ndarray:
    angle = np.random.default_rng(seed).uniform(0, 180)
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    rot = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), angle, 1.0)
    kernel = cv2.warpAffine(kernel, rot, (length, length))
    return cv2.filter2D(img, -1, kernel / max(kernel.sum(), 1e-6), borderType=cv2.BORDER_REFLECT_101)


def brightness_contrast(img: np.ndarray, contrast: float = 0.7, brightness: float = 30.0, seed: int = 0):
    mean = img.mean()
    return np.clip((img - mean) * contrast + mean + brightness, 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int = 20, seed: int = 0) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


# name -> (function, severity stated in words)
CORRUPTIONS: dict[str, tuple[Callable[..., np.ndarray], str]] = {
    "gaussian_noise": (gaussian_noise, "sigma 15 gray levels"),
    "gaussian_blur": (gaussian_blur, "sigma 1.5 px"),
    "motion_blur": (motion_blur, "9 px streak, random angle"),
    "brightness_contrast": (brightness_contrast, "contrast x0.7, brightness +30"),
    "jpeg": (jpeg, "quality 20"),
}


def corrupt_all(images: list[np.ndarray], name: str) -> list[np.ndarray]:
    fn, _ = CORRUPTIONS[name]
    return [fn(img, seed=i) for i, img in enumerate(images)]


# --- out-of-distribution sets, from what is available offline -----------------------


def _blank_frames(size: int) -> list[np.ndarray]:
    return [np.full((size, size), v, np.uint8) for v in (0, 8, 64, 128, 192, 247, 255)]


def _noise_frames(size: int, n: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(123)
    uniform = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(n // 2)]
    gauss = [np.clip(rng.normal(128, 50, (size, size)), 0, 255).astype(np.uint8) for _ in range(n - n // 2)]
    return uniform + gauss


def _synthetic_patterns(size: int) -> list[np.ndarray]:
    ramp = np.tile(np.linspace(0, 255, size, dtype=np.float32), (size, 1)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    checker = (((yy // 16) + (xx // 16)) % 2 * 255).astype(np.uint8)
    stripes = ((np.sin(xx / 3.0) + 1) * 127).astype(np.uint8)
    rings = ((np.sin(np.hypot(yy - size / 2, xx - size / 2) / 4.0) + 1) * 127).astype(np.uint8)
    return [ramp, ramp.T.copy(), checker, stripes, rings]


def _package_photos(size: int) -> list[np.ndarray]:
    """Photos and textures shipped inside installed packages (scikit-image, matplotlib)."""
    photos = []
    try:
        import skimage.data as sk

        for name in ("camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text",
                     "clock", "horse", "brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
                     "retina", "cell", "microaneurysms", "logo", "colorwheel", "checkerboard"):
            try:
                photos.append(np.asarray(getattr(sk, name)()))
            except Exception:  # some datasets need a download; skip those
                continue
    except ImportError:
        pass
    import matplotlib.cbook

    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        try:
            with matplotlib.cbook.get_sample_data(name) as f:
                photos.append(np.asarray(Image.open(f)))
        except Exception:
            continue
    out = []
    for photo in photos:
        img = Image.fromarray(photo.astype(np.uint8) if photo.dtype == bool else photo)
        out.append(np.asarray(img.convert("L").resize((size, size), Image.BILINEAR)))
    return out


def _lens_dirt(images: list[np.ndarray]) -> list[np.ndarray]:
    """Dark, soft blobs covering most of the frame: dirt on the lens."""
    out = []
    rng = np.random.default_rng(7)
    for img in images:
        mask = np.zeros(img.shape, np.float32)
        for _ in range(6):
            centre = tuple(int(c) for c in rng.integers(0, img.shape[0], 2))
            cv2.circle(mask, centre, int(rng.integers(30, 70)), 1.0, -1)
        mask = cv2.GaussianBlur(mask, (0, 0), 12)
        out.append(np.clip(img * (1 - 0.9 * np.clip(mask, 0, 1)), 0, 255).astype(np.uint8))
    return out


def _heavy(images: list[np.ndarray]) -> list[np.ndarray]:
    heavy = [gaussian_noise(img, 80, seed=i) for i, img in enumerate(images[::2])]
    heavy += [gaussian_blur(img, 8.0) for img in images[1::2]]
    return heavy


def ood_sets(size: int, val_images: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Far OOD (blanks, noise, patterns, photos/textures) and near OOD built from val images."""
    subset = val_images[:: max(len(val_images) // 24, 1)][:24]
    return {
        "blank_or_saturated": _blank_frames(size),
        "noise": _noise_frames(size),
        "synthetic_patterns": _synthetic_patterns(size),
        "photos_and_textures": _package_photos(size),
        "lens_dirt": _lens_dirt(subset),
        "heavy_corruption": _heavy(subset),
    }


FAR_OOD = ("blank_or_saturated", "noise", "synthetic_patterns", "photos_and_textures")


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(score_out > score_in), ties counted half: the Mann-Whitney statistic."""
    in_scores, out_scores = np.asarray(in_scores), np.asarray(out_scores)
    greater = (out_scores[:, None] > in_scores[None, :]).sum()
    ties = (out_scores[:, None] == in_scores[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(in_scores) * len(out_scores)))
