"""Evaluate the tiled path on wide frames with per-tile ground truth, and build such frames from NEU's val split.

Ground truth sits beside each frame, one file per frame (docs/tiles.md):

* ``<frame>.json``: ``{"tiles": [{"x": 0, "y": 0, "w": 200, "h": 200, "label": "crazing"}, ...]}``: labelled
  regions in frame pixels (other keys are ignored; a region labelled ``background`` is defect-free);
* ``<frame>.xml``: Pascal-VOC boxes as in NEU-DET (``<object><name>``, ``<bndbox>`` with 1-based inclusive
  ``xmin/ymin/xmax/ymax``).

A predicted tile's truth is the label of the region covering the largest part of it, when that region
covers at least ``min_cover`` of the tile; otherwise the tile is not scored. A frame that fits one tile is
scored as one tile covering it. A frame's truth classes are every
non-background class among its regions; the frame "finds all classes" when each of them has at least
one defect tile (``defect_counts``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from steelsight.contract import IMAGE_EXTENSIONS
from steelsight.model.evaluation.metrics import confusion_matrix, wilson_interval
from steelsight.model.evaluation.plots import confusion_matrix_png
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.tiling import BACKGROUND, UNKNOWN, Tile, plan_frame
from steelsight.model.training.data import read_voc_boxes, scan_folders

MIN_COVER = 0.25  # a region must cover this share of a tile to give it its label; a tile less covered is not scored
STRIP_IMAGES = 8  # NEU images side by side in one built strip
FRAMES_PER_CALL = 8  # frames handed to the predictor at once: bounds memory on long folders


@dataclass(frozen=True)
class Region:
    """A labelled rectangle of a frame's ground truth, in frame pixels (x, y: top-left; w, h: size)."""

    x: int
    y: int
    w: int
    h: int
    label: str


def read_truth_json(path: Path) -> list[Region]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("tiles"), list):
        raise ValueError(f"{path}: expected {{\"tiles\": [{{\"x\", \"y\", \"w\", \"h\", \"label\"}}, ...]}}")
    regions = []
    for i, tile in enumerate(data["tiles"]):
        try:
            region = Region(int(tile["x"]), int(tile["y"]), int(tile["w"]), int(tile["h"]), str(tile["label"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: tile {i} needs integer x, y, w, h and a label ({exc})") from exc
        if region.w <= 0 or region.h <= 0:
            raise ValueError(f"{path}: tile {i} has no area ({region.w}x{region.h})")
        regions.append(region)
    return regions


def read_truth_voc(path: Path) -> list[Region]:
    """NEU-DET boxes: 1-based, inclusive corners (the same pixels as ``training.data.box_mask``)."""
    return [Region(max(b.xmin - 1, 0), max(b.ymin - 1, 0), b.xmax - max(b.xmin - 1, 0),
                   b.ymax - max(b.ymin - 1, 0), b.name) for b in read_voc_boxes(path)]


def truth_path(frame: Path) -> Path | None:
    """``<frame>.json`` (also ``<stem>.json``), else ``<stem>.xml``, beside the frame."""
    for candidate in (frame.with_name(frame.name + ".json"), frame.with_suffix(".json"), frame.with_suffix(".xml")):
        if candidate.is_file():
            return candidate
    return None


def read_truth(path: Path) -> list[Region]:
    return read_truth_voc(path) if path.suffix.lower() == ".xml" else read_truth_json(path)


def overlap(a, b) -> int:
    """Pixels two rectangles (anything with x, y, w, h) share."""
    dx = min(a.x + a.w, b.x + b.w) - max(a.x, b.x)
    dy = min(a.y + a.h, b.y + b.h) - max(a.y, b.y)
    return max(dx, 0) * max(dy, 0)


def tile_truth(tile, regions: Sequence[Region], min_cover: float = MIN_COVER) -> str | None:
    """The label of the region covering the largest part of ``tile``, if it covers ``min_cover`` of it;
    None (not scored) otherwise: an uncovered tile may be clean steel, which the model has no class for,
    so only regions the truth names (a class, or ``background`` for off-strip) are scored."""
    best, covered = None, 0
    for region in regions:
        shared = overlap(tile, region)
        if shared > covered:
            best, covered = region.label, shared
    return best if covered >= min_cover * tile.w * tile.h else None


def truth_classes(regions: Sequence[Region]) -> set[str]:
    return {r.label for r in regions if r.label != BACKGROUND}


def found_classes(result) -> set[str]:
    """The defect classes a frame result names: those with at least one defect tile (a frame of one
    tile: its label, unless unknown)."""
    if not result.tiles:
        return set() if result.unknown or result.label in (BACKGROUND, UNKNOWN) else {result.label}
    return {c for c, n in result.defect_counts.items() if n > 0}


def scored_tiles(result, height: int, width: int) -> list:
    """The tiles to score: a frame of one tile is scored as one tile covering it, with the frame's verdict."""
    if result.tiles:
        return list(result.tiles)
    return [Tile(0, 0, width, height, result.label, result.confidence, result.unknown, result.unknown_reason)]


def tile_verdict(tile) -> str:
    """What an operator reads off a tile: unknown when flagged, else its label (a class or background)."""
    return UNKNOWN if tile.unknown else tile.label


@dataclass
class TileScore:
    """Running per-tile and per-frame counts over a set of frames."""

    labels: list[str]
    tiles: int = 0
    correct: int = 0  # verdict == truth (an unknown tile is never correct)
    correct_label: int = 0  # label == truth, the unknown flag ignored
    unknown: int = 0
    unscored: int = 0  # tiles no truth region covers enough
    frames: int = 0
    all_found: int = 0
    exact: int = 0  # found classes == truth classes: all found and nothing extra

    def __post_init__(self):
        self.truth_index: list[int] = []
        self.pred_index: list[int] = []

    def add(self, result, regions: Sequence[Region], shape: tuple[int, int], min_cover: float = MIN_COVER) -> dict:
        """Score one frame's result (``shape``: its height, width) against its truth regions; the frame's row."""
        rows = []
        for tile in scored_tiles(result, *shape):
            truth = tile_truth(tile, regions, min_cover)
            if truth is None:
                self.unscored += 1
                continue
            verdict = tile_verdict(tile)
            self.tiles += 1
            self.correct += verdict == truth
            self.correct_label += tile.label == truth
            self.unknown += bool(tile.unknown)
            self.truth_index.append(self._index(truth))
            self.pred_index.append(self._index(verdict))
            rows.append({"x": tile.x, "y": tile.y, "w": tile.w, "h": tile.h, "truth": truth, "label": tile.label,
                         "unknown": bool(tile.unknown), "confidence": tile.confidence})
        wanted, found = truth_classes(regions), found_classes(result)
        self.frames += 1
        self.all_found += wanted <= found
        self.exact += wanted == found
        return {"truth_classes": sorted(wanted), "found_classes": sorted(found),
                "missed": sorted(wanted - found), "extra": sorted(found - wanted), "tiles": rows}

    def _index(self, label: str) -> int:
        if label not in self.labels:
            self.labels.append(label)  # a label outside the model's classes still gets its own row
        return self.labels.index(label)

    def to_dict(self) -> dict:
        return {
            "tiles": self.tiles,
            "tiles_not_scored": self.unscored,
            "tile_accuracy": self.correct / max(self.tiles, 1),
            "tile_accuracy_ci95": wilson_interval(self.correct, self.tiles),
            "tile_accuracy_ignoring_unknown": self.correct_label / max(self.tiles, 1),
            "tile_accuracy_ignoring_unknown_ci95": wilson_interval(self.correct_label, self.tiles),
            "tile_unknown_rate": self.unknown / max(self.tiles, 1),
            "frames": self.frames,
            "all_classes_found_rate": self.all_found / max(self.frames, 1),
            "all_classes_found_ci95": wilson_interval(self.all_found, self.frames),
            "exact_class_set_rate": self.exact / max(self.frames, 1),
            "exact_class_set_ci95": wilson_interval(self.exact, self.frames),
            "confusion_labels": list(self.labels),
            "confusion_matrix": self.confusion().tolist(),
        }

    def confusion(self) -> np.ndarray:
        """Rows: truth; columns: verdict; over ``labels`` (the classes, background, unknown, then any other)."""
        return confusion_matrix(np.array(self.truth_index, dtype=np.int64), np.array(self.pred_index, dtype=np.int64),
                                len(self.labels))


def frames_with_truth(data: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(frame, truth file) for every image under ``data`` (recursively, sorted), and the frames without truth."""
    frames = sorted(p for p in Path(data).rglob("*")
                    if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    paired, missing = [], []
    for frame in frames:
        truth = truth_path(frame)
        (paired.append((frame, truth)) if truth else missing.append(frame))
    return paired, missing


def evaluate_tiles(predictor, data: Path, out: Path, tiling, min_cover: float = MIN_COVER) -> dict:
    """Run ``predictor.predict_frames`` over every frame with truth under ``data``; write report.json and
    tile_confusion.png to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paired, missing = frames_with_truth(data)
    if not paired:
        raise FileNotFoundError(f"no frame under {data} has a truth file beside it (<frame>.json or <stem>.xml)")
    score = TileScore([*predictor.classes, BACKGROUND, UNKNOWN])
    per_frame, errors = {}, {}
    for start in tqdm(range(0, len(paired), FRAMES_PER_CALL), desc="tiles", unit="batch", leave=False):
        chunk, plans = [], []
        for frame, truth in paired[start : start + FRAMES_PER_CALL]:
            try:  # one unreadable or oversized frame is reported, not the end of the run
                plan = plan_frame(read_gray(frame), tiling, predictor.input_size)
                regions = read_truth(truth)
            except Exception as exc:
                errors[str(frame.relative_to(data))] = f"{type(exc).__name__}: {exc}"
                continue
            chunk.append((frame, truth, regions))
            plans.append(plan)
        results = predictor.predict_plans(plans) if plans else []
        for (frame, truth, regions), plan, result in zip(chunk, plans, results, strict=True):
            height, width = plan.gray.shape[:2]
            row = score.add(result, regions, (height, width), min_cover)
            per_frame[str(frame.relative_to(data))] = {"size": [width, height], "truth_file": truth.name} | row
    report = {"tiles": score.to_dict() | {
        "data": Path(data).name, "min_cover": min_cover, "frames_without_truth": [str(p) for p in missing],
        "frames_not_read": errors,
        "tiling": _tiling_dict(tiling), "checkpoint": predictor.checkpoint.path.name,
        "checkpoint_sha256": predictor.checkpoint.sha256, "per_frame": per_frame}}
    labels = report["tiles"]["confusion_labels"]
    confusion_matrix_png(score.confusion(), labels, out / "tile_confusion.png",
                         title=f"{Path(data).name}: tiles (n={score.tiles}, {score.frames} frames)")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _tiling_dict(tiling) -> dict:
    from dataclasses import asdict, is_dataclass

    if is_dataclass(tiling):
        return asdict(tiling)
    return dict(getattr(tiling, "__dict__", {}))


def make_strips(predictor, data: Path, out: Path, count: int, per_strip: int = STRIP_IMAGES, seed: int = 0
                ) -> list[Path]:
    """``count`` strips of ``per_strip`` images of the checkpoint's held-out val split side by side (NEU: 1600x200),
    each with ``<strip>.json`` truth (one region per image, its class), in ``out``.

    Images are dealt from a seeded shuffle of val; when ``count * per_strip`` exceeds val, a fresh shuffle
    follows, so an image repeats across strips only then (never within one). ``strips.json`` lists the sources.
    """
    from steelsight.model.evaluation.evaluate import select_split

    if count < 1 or per_strip < 1:
        raise ValueError("--make-strips needs at least one strip of at least one image")
    val = select_split(scan_folders(data, predictor.classes), predictor, "val")
    if len(val) < per_strip:
        raise ValueError(f"the val split has {len(val)} images, fewer than {per_strip} per strip")
    rng = random.Random(seed)
    deck: list = []
    out.mkdir(parents=True, exist_ok=True)
    written, manifest = [], []
    for n in range(count):
        picked, deck = deck[:per_strip], deck[per_strip:]
        if len(picked) < per_strip:
            fresh = list(val)
            rng.shuffle(fresh)
            # the images already in this strip wait for the next one: never twice in a strip
            fresh = [s for s in fresh if s not in picked] + [s for s in fresh if s in picked]
            need = per_strip - len(picked)
            picked, deck = picked + fresh[:need], fresh[need:]
        images = [read_gray(s.path) for s in picked]
        side = images[0].shape[0]
        images = [img if img.shape == (side, side) else cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)
                  for img in images]
        strip = np.hstack(images)
        path = out / f"strip_{n:03d}.png"
        cv2.imwrite(str(path), strip)
        tiles = [{"x": i * side, "y": 0, "w": side, "h": side, "label": s.class_name, "source": s.path.name}
                 for i, s in enumerate(picked)]
        path.with_suffix(".json").write_text(json.dumps({"tiles": tiles}, indent=1))
        manifest.append({"strip": path.name, "sources": [f"{s.class_name}/{s.path.name}" for s in picked]})
        written.append(path)
    (out / "strips.json").write_text(json.dumps({
        "data": Path(data).name, "split": "val", "seed": seed, "per_strip": per_strip, "side": side,
        "val_images": len(val),
        "checkpoint_sha256": predictor.checkpoint.sha256, "strips": manifest}, indent=1))
    return written
