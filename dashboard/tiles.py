"""Tile boxes over a frame's overlay, their legend and the per-frame summary, for tiled (wide) frames.

A tile is anything with ``x, y, w, h, label, confidence, unknown`` in frame pixels: the
contract's ``TileVerdict`` (live tab) or the predictor's own tiles (upload tab). Frames
are shown at display size, so boxes are scaled from the frame's extent to the image's.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from steelsight.model.inference.labels import CLASSES
from steelsight.model.inference.tiling import BACKGROUND, UNKNOWN

# Okabe-Ito: distinguishable with the common colour-vision deficiencies, and none is a JET heatmap's pure red or blue
CLASS_COLOURS: dict[str, tuple[int, int, int]] = dict(zip(CLASSES, [
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (204, 121, 167), (213, 94, 0)], strict=True))
UNKNOWN_COLOUR = (200, 200, 200)
OUTLINE = (0, 0, 0)  # drawn under each box so it stands out on any heatmap colour
SHORT = {"crazing": "Cr", "inclusion": "In", "patches": "Pa", "pitted_surface": "PS", "rolled-in_scale": "RS",
         "scratches": "Sc"}  # NEU's own file-name prefixes
DASH_PX = 8
MIN_LABEL_PX = 24  # boxes smaller than this on screen get no short name


def colour(label: str) -> tuple[int, int, int]:
    return CLASS_COLOURS.get(label, UNKNOWN_COLOUR)


def frame_extent(tiles: Sequence) -> tuple[int, int]:
    """(width, height) the tiles' coordinates are in: tiles cover their frame, so the furthest edges are its size."""
    return max(t.x + t.w for t in tiles), max(t.y + t.h for t in tiles)


def _dashed_rect(image: np.ndarray, p0: tuple[int, int], p1: tuple[int, int], rgb, thickness: int) -> None:
    (x0, y0), (x1, y1) = p0, p1
    for a, b, fixed, horizontal in ((x0, x1, y0, True), (x0, x1, y1, True), (y0, y1, x0, False),
                                    (y0, y1, x1, False)):
        for start in range(a, b, 2 * DASH_PX):
            end = min(start + DASH_PX, b)
            q0, q1 = ((start, fixed), (end, fixed)) if horizontal else ((fixed, start), (fixed, end))
            cv2.line(image, q0, q1, rgb, thickness)


def draw_tiles(image: np.ndarray, tiles: Sequence, extent: tuple[int, int] | None = None) -> np.ndarray:
    """A copy of ``image`` (RGB) with each defect tile outlined in its class colour and named by its short
    class; unknown tiles dashed in grey; background tiles left undrawn, so the defects stand out."""
    out = np.ascontiguousarray(image[..., :3] if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)).copy()
    shown = [t for t in tiles if t.unknown or t.label != BACKGROUND]
    if not shown:
        return out
    width, height = extent or frame_extent(tiles)
    sx, sy = out.shape[1] / width, out.shape[0] / height
    thickness = max(1, round(min(out.shape[:2]) / 100))
    # boxes of neighbouring tiles share edges (or overlap): a one-pixel inset keeps both visible
    for t in sorted(shown, key=lambda t: (not t.unknown, t.confidence or 0.0)):  # surest drawn last, on top
        p0 = (round(t.x * sx) + thickness, round(t.y * sy) + thickness)
        p1 = (round((t.x + t.w) * sx) - 1 - thickness, round((t.y + t.h) * sy) - 1 - thickness)
        if t.unknown:
            _dashed_rect(out, p0, p1, OUTLINE, thickness + 2)
            _dashed_rect(out, p0, p1, UNKNOWN_COLOUR, thickness)
            name = "?"
        else:
            cv2.rectangle(out, p0, p1, OUTLINE, thickness + 2)
            cv2.rectangle(out, p0, p1, colour(t.label), thickness)
            name = SHORT.get(t.label, t.label[:2])
        side = min(p1[0] - p0[0], p1[1] - p0[1])
        if side < MIN_LABEL_PX:
            continue  # too small to name: the box's colour says it
        scale = float(np.clip(side / 110, 0.3, 0.6))  # about a fifth of the box's side
        (tw, th), _ = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        corner = (p0[0] + thickness + 1, p0[1] + thickness + 1)
        cv2.rectangle(out, corner, (corner[0] + tw + 4, corner[1] + th + 4), OUTLINE, -1)
        cv2.putText(out, name, (corner[0] + 2, corner[1] + th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    UNKNOWN_COLOUR if t.unknown else colour(t.label), 1, cv2.LINE_AA)
    return out


def _swatch(rgb: tuple[int, int, int], dashed: bool = False) -> str:
    border = f"2px {'dashed' if dashed else 'solid'} rgb{rgb}"
    return f"<span class='swatch' style='border:{border}'></span>"


def legend_html() -> str:
    """Every class's colour, fixed, so a box means the same on every frame."""
    items = [f"<span class='legend-item' data-class='{html.escape(c)}'>{_swatch(CLASS_COLOURS[c])}"
             f"{html.escape(SHORT[c])} = {html.escape(c)}</span>" for c in CLASSES]
    items.append(f"<span class='legend-item' data-class='{UNKNOWN}'>{_swatch(UNKNOWN_COLOUR, dashed=True)}"
                 f"? = {UNKNOWN}</span>")
    return "<div class='tile-legend'><b>tile boxes:</b> " + " ".join(items) + " · background tiles: no box</div>"


def summary_text(tiles: Sequence, defect_counts: Mapping[str, int], top) -> str:
    """One line: defect classes by tile count, the top defect, and how many tiles were unknown."""
    counts = ", ".join(f"{c} {n}" for c, n in sorted(defect_counts.items(), key=lambda kv: (-kv[1], kv[0])) if n)
    unknown = sum(bool(t.unknown) for t in tiles)
    parts = [f"{len(tiles)} tiles", f"defect tiles: {counts or 'none'}"]
    if top is not None:
        parts.append(f"top defect: {top.label} {top.confidence:.2f} at x={top.x}")
    if unknown:
        parts.append(f"{unknown} unknown")
    return " · ".join(parts)


def summary_html(tiles: Sequence, defect_counts: Mapping[str, int], top) -> str:
    rows = "".join(
        f"<li data-class='{html.escape(c)}'>{_swatch(colour(c))}<b>{html.escape(c)}</b>: {n} tile{'s' * (n != 1)}</li>"
        for c, n in sorted(defect_counts.items(), key=lambda kv: (-kv[1], kv[0])) if n)
    unknown = sum(bool(t.unknown) for t in tiles)
    top_line = "<p class='top-defect'>no defect tile</p>"
    if top is not None:
        top_line = (f"<p class='top-defect'>top defect: <b>{html.escape(top.label)}</b> {top.confidence:.1%} "
                    f"(tile at x={top.x}, y={top.y})</p>")
    extra = f"<p>{unknown} of {len(tiles)} tiles unknown</p>" if unknown else ""
    return (f"<div class='tile-summary'><p>{len(tiles)} tiles</p>{top_line}"
            f"<ul class='defect-counts'>{rows or '<li>no defect tiles</li>'}</ul>{extra}</div>")
