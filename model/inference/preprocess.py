"""Pre-processing for the network: decoded gray surfaces to a float batch at the checkpoint's size."""

from __future__ import annotations

import cv2
import numpy as np
import torch


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
