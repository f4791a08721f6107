"""Exposure drift: a line camera's gain or lighting changing, as a training augmentation."""

from __future__ import annotations

import albumentations as A
import numpy as np

from steelsight.model.evaluation.corruptions import brightness_contrast


class ExposureDrift(A.ImageOnlyTransform):
    """Gain about the frame's own mean, then an offset in gray levels (uint8 in, uint8 out).

    Albumentations' RandomBrightnessContrast scales about zero, so a lower contrast there also
    darkens the frame; a drifting camera keeps its mean level and shifts it separately.
    """

    def __init__(self, gain: tuple[float, float] = (0.6, 1.35), offset: float = 40.0, p: float = 0.5):
        super().__init__(p=p)
        self.gain, self.offset = tuple(gain), float(offset)

    def get_params(self) -> dict:
        return {"gain": self.py_random.uniform(*self.gain),
                "shift": self.py_random.uniform(-self.offset, self.offset)}

    def apply(self, img: np.ndarray, gain: float = 1.0, shift: float = 0.0, **params) -> np.ndarray:
        return brightness_contrast(img, gain, shift)  # the scored corruption's arithmetic, at a drawn setting

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("gain", "offset")
