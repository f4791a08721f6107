"""Tiling wide frames at the model's scale.

The network was trained on square NEU images (200 x 200, seen at the checkpoint's
input size); squashing a 1600 x 256 line-camera strip to that square distorts the
texture and gives the whole strip one label. Here a frame larger than one tile is cut into
tiles of exactly the tile size, each classified on its own, and the tile verdicts
are summarised into one frame verdict (``summarise``).

Out-of-strip regions are labelled ``background`` without running the network:
dark, flat bands along the frame's edges (the margins beside a strip, trimmed off
before the strip is tiled, so the strip's tiles start at its edge), and tiles that
are dark and flat, or saturated white and flat, as a whole. Small patches of NEU
steel are black or blown out and flat too, so the test looks at whole tiles and
whole columns/rows, never at pixels or small windows; the thresholds keep every NEU
image and its edge lines out (tests/unit/test_tiling.py checks all of them). Only
dark bands are trimmed as margins: NEU has blown-out bands along image edges.

Light on purpose (numpy and OpenCV only): ``steelsight.contract`` imports it lazily.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from steelsight.contract import FRAME_UNKNOWN_SHARE as UNKNOWN_SHARE
from steelsight.contract import UNKNOWN, Settings, unknown_kind

BACKGROUND = "background"

# background: mean <= BACKGROUND_DARK_MAX or >= BACKGROUND_BRIGHT_MIN, and std <= BACKGROUND_MAX_STD (gray levels)
BACKGROUND_DARK_MAX = 20.0
BACKGROUND_BRIGHT_MIN = 245.0
BACKGROUND_MAX_STD = 3.0
MIN_MARGIN_PX = 32  # at model scale; narrower edge bands stay part of the strip


class TooManyTiles(ValueError):
    """The frame would need more tiles than ``TilingConfig.max_tiles``: the caller rejects it."""

    def __init__(self, tiles: int, limit: int, shape: tuple[int, int]):
        super().__init__(f"a {shape[1]} x {shape[0]} frame needs {tiles} tiles at the model's scale, "
                         f"over the limit of {limit}")
        self.tiles, self.limit, self.shape = tiles, limit, shape


@dataclass(frozen=True)
class TilingConfig:
    """How frames are cut. ``tile_size`` None: the checkpoint's input size.

    With both ``frame_pixels_per_mm`` and ``model_pixels_per_mm`` set, the frame is first
    rescaled by model/frame so a tile covers the same surface area as a training image.
    ``overlap_px`` is the least overlap between neighbouring tiles; windows are spread
    evenly so the last one ends at the frame's edge, which can make the overlap larger.
    """

    tile_size: int | None = None
    overlap_px: int = 0
    frame_pixels_per_mm: float | None = None
    model_pixels_per_mm: float | None = None
    max_tiles: int | None = None  # None: no limit (the product's limit is a setting, max_tiles_per_frame)
    # a frame whose analysed tiles are at least this share unknown is unknown as a whole (summarise)
    unknown_share: float = UNKNOWN_SHARE
    background_dark_max: float = BACKGROUND_DARK_MAX
    background_bright_min: float = BACKGROUND_BRIGHT_MIN
    background_max_std: float = BACKGROUND_MAX_STD
    min_margin_px: int = MIN_MARGIN_PX

    def __post_init__(self):
        if self.tile_size is not None and self.tile_size < 8:
            raise ValueError(f"tile_size {self.tile_size} is too small")
        if self.overlap_px < 0:
            raise ValueError("overlap_px must be >= 0")
        for name in ("frame_pixels_per_mm", "model_pixels_per_mm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0")
        if (self.frame_pixels_per_mm is None) != (self.model_pixels_per_mm is None):
            raise ValueError("frame_pixels_per_mm and model_pixels_per_mm go together: set both or neither")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ValueError("max_tiles must be >= 1")
        if not 0.0 < self.unknown_share <= 1.0:
            raise ValueError("unknown_share must be in (0, 1]")

    @classmethod
    def from_settings(cls, settings: Settings) -> TilingConfig:
        """The tiling the pipeline's settings ask for (STEELSIGHT_TILE_* and the rest)."""
        return cls(tile_size=settings.tile_size, overlap_px=settings.tile_overlap_px,
                   unknown_share=settings.frame_unknown_share, frame_pixels_per_mm=settings.frame_pixels_per_mm,
                   model_pixels_per_mm=settings.model_pixels_per_mm, max_tiles=settings.max_tiles_per_frame)

    def size(self, input_size: int) -> int:
        tile = self.tile_size or input_size
        if self.overlap_px >= tile:
            raise ValueError(f"overlap_px {self.overlap_px} must be smaller than the tile size {tile}")
        return tile

    @property
    def scale(self) -> float:
        """Factor from frame pixels to model pixels (1.0 unless both resolutions are set)."""
        if self.frame_pixels_per_mm and self.model_pixels_per_mm:
            return self.model_pixels_per_mm / self.frame_pixels_per_mm
        return 1.0


@dataclass
class Tile:
    """One tile's verdict; ``x, y, w, h``: its window in the frame's own pixels (without padding)."""

    x: int
    y: int
    w: int
    h: int
    label: str  # a class, or BACKGROUND; an unknown tile keeps its most probable class, with unknown=True
    confidence: float  # 1.0 for background, which is a rule, not a probability
    unknown: bool = False
    unknown_reason: str | None = None
    probabilities: dict[str, float] | None = None
    ood_score: float | None = None

    @property
    def is_defect(self) -> bool:
        return self.label != BACKGROUND and not self.unknown

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Window:
    """A tile's window at the model's scale; ``w, h`` may be under the tile size (reflect-padded crop)."""

    x: int
    y: int
    w: int
    h: int
    background: bool = False


@dataclass
class FramePlan:
    """What to run for one frame. ``single``: the frame fits one tile and takes the whole-frame path."""

    gray: np.ndarray  # the frame as given
    scaled: np.ndarray  # at the model's scale (the same array when the scale is 1)
    tile_size: int
    windows: list[Window] = field(default_factory=list)
    single: bool = False
    unknown_share: float = UNKNOWN_SHARE  # the config's, for summarise

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Model pixels per frame pixel along x and y (exact, after rounding the scaled size)."""
        return self.scaled.shape[1] / self.gray.shape[1], self.scaled.shape[0] / self.gray.shape[0]

    def model_windows(self) -> list[Window]:
        return [w for w in self.windows if not w.background]

    def crops(self) -> list[np.ndarray]:
        """The network's inputs: the whole frame, or each non-background window at exactly the tile size."""
        if self.single:
            return [self.gray]
        return [crop_tile(self.scaled, w, self.tile_size) for w in self.model_windows()]

    def frame_box(self, window: Window) -> tuple[int, int, int, int]:
        """A window in the frame's own pixels: x, y, w, h."""
        sx, sy = self.scale_xy
        x0, y0 = round(window.x / sx), round(window.y / sy)
        x1 = min(round((window.x + window.w) / sx), self.gray.shape[1])
        y1 = min(round((window.y + window.h) / sy), self.gray.shape[0])
        return x0, y0, max(x1 - x0, 1), max(y1 - y0, 1)


# layout -----------------------------------------------------------------------------------------
def axis_starts(length: int, tile: int, overlap: int = 0) -> list[int]:
    """Window starts along one axis: one window when ``length <= tile``, else evenly spread so the first
    starts at 0, the last ends at ``length`` and neighbours overlap by at least ``overlap``."""
    if length <= tile:
        return [0]
    step = tile - overlap
    count = math.ceil((length - tile) / step) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tile_count(height: int, width: int, config: TilingConfig, input_size: int) -> int:
    """Tiles the network runs on for a frame of this size at most (1 when it fits one tile);
    from the size alone, so a caller can refuse a frame from its header before decoding it."""
    tile = config.size(input_size)
    h, w = scaled_shape(height, width, config.scale)
    if h <= tile and w <= tile:
        return 1
    return len(axis_starts(h, tile, config.overlap_px)) * len(axis_starts(w, tile, config.overlap_px))


def scaled_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    if scale == 1.0:
        return height, width
    return max(round(height * scale), 1), max(round(width * scale), 1)


def rescale(gray: np.ndarray, scale: float) -> np.ndarray:
    """The frame at the model's scale; INTER_AREA when shrinking, as ``resize_for_model``."""
    h, w = scaled_shape(*gray.shape[:2], scale)
    if (h, w) == gray.shape[:2]:
        return gray
    return cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def crop_tile(gray: np.ndarray, window: Window, tile: int) -> np.ndarray:
    """The window's pixels, reflect-padded at the bottom and right up to ``tile`` x ``tile``."""
    crop = gray[window.y : window.y + window.h, window.x : window.x + window.w]
    pad_h, pad_w = tile - crop.shape[0], tile - crop.shape[1]
    if pad_h or pad_w:
        # reflect needs two pixels along an axis; a one-pixel line repeats instead
        mode = "reflect" if min(crop.shape) > 1 else "edge"
        return np.pad(crop, ((0, pad_h), (0, pad_w)), mode=mode)
    return crop.copy()  # a writable array of its own, not a view into a (possibly read-only) frame


# background -------------------------------------------------------------------------------------
def _background_stats(mean, std, config: TilingConfig):
    flat = std <= config.background_max_std
    return flat & ((mean <= config.background_dark_max) | (mean >= config.background_bright_min))


def is_background(pixels: np.ndarray, config: TilingConfig) -> bool:
    """A region that cannot be strip surface: dark and flat, or saturated white and flat, as a whole."""
    values = pixels.astype(np.float32)
    return bool(_background_stats(float(values.mean()), float(values.std()), config))


def _margin(flags: np.ndarray, minimum: int) -> int:
    """Length of the run of True at the start of ``flags`` when at least ``minimum``, else 0."""
    run = len(flags) if flags.all() else int(np.argmin(flags))
    return run if run >= minimum else 0


def strip_extent(gray: np.ndarray, config: TilingConfig) -> tuple[int, int, int, int]:
    """(x0, x1, y0, y1): the frame without its dark margins, i.e. bands along the edges at least
    ``min_margin_px`` wide whose every column (row) is dark and flat. Empty (x0 == x1) for a frame
    that is margin throughout."""
    values = gray.astype(np.float32)
    dark = config.background_dark_max
    flat = config.background_max_std

    def lines(block: np.ndarray, axis: int) -> np.ndarray:
        return (block.mean(axis) <= dark) & (block.std(axis) <= flat)

    cols = lines(values, 0)
    x0 = _margin(cols, config.min_margin_px)
    if x0 == len(cols):
        return 0, 0, 0, 0
    x1 = len(cols) - _margin(cols[::-1], config.min_margin_px)
    rows = lines(values[:, x0:x1], 1)
    y0 = _margin(rows, config.min_margin_px)
    if y0 == len(rows):  # every row dark and flat, though the columns are not (e.g. a dark vertical gradient)
        return 0, 0, 0, 0
    y1 = len(rows) - _margin(rows[::-1], config.min_margin_px)
    return x0, x1, y0, y1


def layout(gray: np.ndarray, config: TilingConfig, tile: int) -> list[Window]:
    """The strip's tiles and one background window per dark margin, in reading order (top to bottom, left to right)."""
    height, width = gray.shape
    x0, x1, y0, y1 = strip_extent(gray, config)
    if x0 >= x1 or y0 >= y1:
        return [Window(0, 0, width, height, background=True)]
    windows = []
    if x0:
        windows.append(Window(0, 0, x0, height, background=True))
    if x1 < width:
        windows.append(Window(x1, 0, width - x1, height, background=True))
    if y0:
        windows.append(Window(x0, 0, x1 - x0, y0, background=True))
    if y1 < height:
        windows.append(Window(x0, y1, x1 - x0, height - y1, background=True))
    for y in axis_starts(y1 - y0, tile, config.overlap_px):
        for x in axis_starts(x1 - x0, tile, config.overlap_px):
            w, h = min(tile, x1 - x0), min(tile, y1 - y0)
            crop = gray[y0 + y : y0 + y + h, x0 + x : x0 + x + w]
            windows.append(Window(x0 + x, y0 + y, w, h, background=is_background(crop, config)))
    return sorted(windows, key=lambda w: (w.y, w.x))


def plan_frame(gray: np.ndarray, config: TilingConfig, input_size: int) -> FramePlan:
    """Rescale, check the tile budget, find the margins and lay out the windows.

    A frame that fits one tile at the model's scale is planned whole (``single``): the network gets it
    as given, resized to its input size, exactly as :meth:`Predictor.predict` does.
    Raises :class:`TooManyTiles` (a ValueError) before any pixel is copied when the frame is too large.
    """
    tile = config.size(input_size)
    height, width = gray.shape[:2]
    count = tile_count(height, width, config, input_size)
    if config.max_tiles is not None and count > config.max_tiles:
        raise TooManyTiles(count, config.max_tiles, (height, width))
    if count == 1:
        return FramePlan(gray, gray, tile, single=True, unknown_share=config.unknown_share)
    scaled = rescale(gray, config.scale)
    return FramePlan(gray, scaled, tile, layout(scaled, config, tile), unknown_share=config.unknown_share)


# stitching and summary --------------------------------------------------------------------------
def stitch(plan: FramePlan, heatmaps: Sequence[np.ndarray | None]) -> np.ndarray:
    """One heatmap at the frame's own size: each window's map (tile size, padding dropped) resized into the
    window's box in frame pixels, averaged where windows overlap; background windows (``None``) count as zero.
    A tile's part is then exactly what ``Predictor.explain`` gives for its crop at the crop's size."""
    height, width = plan.gray.shape[:2]
    total = np.zeros((height, width), np.float32)
    count = np.zeros((height, width), np.float32)
    for window, heat in zip(plan.windows, heatmaps, strict=True):
        x, y, w, h = plan.frame_box(window)
        if heat is not None:
            heat = heat[: window.h, : window.w]
            if heat.shape != (h, w):
                heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
            total[y : y + h, x : x + w] += heat
        count[y : y + h, x : x + w] += 1.0
    return np.clip(total / np.maximum(count, 1.0), 0.0, 1.0).astype(np.float32)


@dataclass
class FrameSummary:
    label: str
    representative: Tile | None
    top_defect: Tile | None
    defect_counts: dict[str, int]


def share_reached(count: int, total: int, share: float) -> bool:
    """``count / total >= share``, true at the exact boundary whatever the float rounding (7 of 100 at 0.07)."""
    return total > 0 and count >= share * total - 1e-9


def summarise(tiles: Sequence[Tile], unknown_share: float = UNKNOWN_SHARE) -> FrameSummary:
    """The frame's single label.

    ``unknown`` when at least ``unknown_share`` of the analysed (not background) tiles are unknown: most of
    the frame is not what the model knows (another material, a blinded camera), so a defect label on the
    rest would be a guess; ``top_defect`` and the counts still name the defect tiles. The frame's reason is
    that of most of its unknown tiles: the kind (camera fault or unfamiliar; unfamiliar on a tie), then its
    commonest reason, represented by that reason's most out-of-distribution tile (highest OOD score, first
    on ties). Else the most confident defect tile's class; else ``background`` (represented by no tile).
    ``unknown_share`` 1.0: any defect tile wins.
    """
    counts: dict[str, int] = {}
    for tile in tiles:
        if tile.is_defect:
            counts[tile.label] = counts.get(tile.label, 0) + 1
    defects = [t for t in tiles if t.is_defect]
    unknowns = [t for t in tiles if t.unknown]
    top = max(defects, key=lambda t: t.confidence) if defects else None
    if unknowns and share_reached(len(unknowns), len(unknowns) + len(defects), unknown_share):
        camera = [t for t in unknowns if unknown_kind(t.unknown_reason) == "camera"]
        unfamiliar = [t for t in unknowns if unknown_kind(t.unknown_reason) != "camera"]
        kind = camera if len(camera) > len(unfamiliar) else unfamiliar
        reasons = [t.unknown_reason for t in kind]
        reason = max(dict.fromkeys(reasons), key=reasons.count)  # commonest; the first seen on a tie
        worst = max((t for t in kind if t.unknown_reason == reason),
                    key=lambda t: -math.inf if t.ood_score is None else t.ood_score)
        return FrameSummary(UNKNOWN, worst, top, counts)
    if top is not None:
        return FrameSummary(top.label, top, top, counts)
    return FrameSummary(BACKGROUND, None, None, counts)
