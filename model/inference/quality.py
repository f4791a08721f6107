"""Input-quality gate: frames no camera looking at steel would produce.

Checked on the decoded frame before the model, so the verdict does not depend
on what the network makes of them. Thresholds sit far outside every NEU image
(std >= 5.9, adjacent-pixel correlation >= 0.68, and >= 0.20 even under the
moderate Gaussian-noise corruption).
"""

from __future__ import annotations

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
