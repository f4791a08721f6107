"""Input-quality gate: frames no camera looking at steel would produce.

Checked on the decoded frame before the model, so the verdict does not depend
on what the network makes of them. Thresholds sit far outside every NEU image
(std >= 5.9, adjacent-pixel correlation >= 0.68, and >= 0.20 even under the
moderate Gaussian-noise corruption).
"""

from __future__ import annotations

import cv2
import numpy as np

MIN_STD = 2.0  # gray levels: a blank (uniform) frame
MAX_CLIPPED = 0.95  # share of pixels at 0-2 or 253-255: a black or blown-out frame
MIN_NEIGHBOUR_CORRELATION = 0.1  # optics correlate neighbouring pixels; sensor noise does not


def neighbour_correlation(gray: np.ndarray) -> float:
    g = gray.astype(np.float32)
    pairs = ((g[:, :-1], g[:, 1:]), (g[:-1, :], g[1:, :]))
    values = []
    for a, b in pairs:
        a, b = a - a.mean(), b - b.mean()
        denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
        values.append(float((a * b).sum()) / denom if denom > 0 else 1.0)
    return min(values)


def quality_issue(gray: np.ndarray) -> str | None:
    """A short reason when the frame cannot show a steel surface, else None."""
    if float(gray.std()) < MIN_STD:
        return "blank_frame"
    if float(np.mean((gray <= 2) | (gray >= 253))) > MAX_CLIPPED:
        return "saturated_frame"
    if neighbour_correlation(gray) < MIN_NEIGHBOUR_CORRELATION:
        return "no_spatial_structure"
    return None


def input_statistics(gray: np.ndarray) -> dict[str, float]:
    """What a camera changes: brightness (mean gray level), contrast (their std) and sharpness (the std of the
    Laplacian over the std of the image, so contrast alone does not move it). Drift compares them with the
    training images' (``CheckpointMeta.input_stats``)."""
    g = gray.astype(np.float32)
    contrast = float(g.std())
    laplacian = float(cv2.Laplacian(g, cv2.CV_32F).std())
    return {"brightness": float(g.mean()), "contrast": contrast, "sharpness": laplacian / max(contrast, 1e-6)}


def summarise_inputs(grays) -> dict[str, dict[str, float]]:
    """Mean and std of each :func:`input_statistics` over a set of images."""
    rows = [input_statistics(g) for g in grays]
    return {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
            for k in rows[0]} if rows else {}


FAULT_Z = 1.0  # how many training standard deviations a statistic must be off for its camera fault to show


def fault_shows(reason: str, stats: dict[str, float], reference: dict[str, dict[str, float]]) -> bool:
    """Whether a frame's own statistics show the camera fault its features look like (``ood.CameraBank``):
    blurred = less sharp, noisy = sharper (noise raises the Laplacian), bad exposure = brightness off or
    contrast low, each by more than ``FAULT_Z`` standard deviations of the training images' (``reference``,
    ``CheckpointMeta.input_stats``). A drawing or another material can look like a fault to the features;
    a frame that shows none is not called one. Without a reference, the features decide alone."""
    if not reference:
        return True

    def z(name: str) -> float:
        return (stats[name] - reference[name]["mean"]) / max(reference[name]["std"], 1e-6)

    if reason == "blurred":
        return z("sharpness") < -FAULT_Z
    if reason == "noisy":
        return z("sharpness") > FAULT_Z
    if reason == "bad_exposure":
        return abs(z("brightness")) > FAULT_Z or z("contrast") < -FAULT_Z
    return True
