"""Champion (A) against challenger (B) on the same images, paired per image.

Sets: A's val split as its checkpoint records it, an exported feedback folder, and the val split under each
moderate corruption of corruptions.py. Per set: each model's accuracy (Wilson 95 % interval), the paired
difference B - A (Newcombe's hybrid score interval for paired proportions), McNemar's exact test on the
images exactly one model gets right, per-class recall differences, and a verdict that stays "no call" unless
the rule below is met. docs/compare.md says how to read the output.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from steelsight.contract import (
    COMPARE_ALPHA,
    COMPARE_MIN_DISCORDANT,
    COMPARE_MIN_IMAGES,
    EXPORT_MANIFEST,
    IMAGE_EXTENSIONS,
)
from steelsight.model.evaluation.corruptions import CORRUPTIONS, corrupt_all
from steelsight.model.evaluation.metrics import wilson_interval
from steelsight.model.inference.checkpoint import CheckpointMeta
from steelsight.model.inference.imageio import ImageRejected, read_gray
from steelsight.model.inference.predictor import Predictor
from steelsight.model.inference.tiling import TilingConfig, tile_count
from steelsight.model.training.data import (
    Sample,
    class_root,
    limit_per_class,
    manifest_hash,
    scan_folders,
    training_split,
)

# the rule for calling a winner on one set (anything short of it is "no call") lives in the contract
ALPHA, MIN_IMAGES, MIN_DISCORDANT = COMPARE_ALPHA, COMPARE_MIN_IMAGES, COMPARE_MIN_DISCORDANT

B_BETTER, A_BETTER, NO_CALL = "B better", "A better", "no call"
CI_METHOD = "Newcombe's hybrid score interval for paired proportions (1998, method 10), 95 %"
CORRECT_MEANS = ("the frame's label (tiled as the worker tiles it) equals the true class; an unknown flag is "
                 "reported apart, as `evaluate` does")


# --- statistics -----------------------------------------------------------------------------------------


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of ``a_only`` against ``b_only`` at 1/2 each
    (the images where exactly one model is right; the images both get right or wrong say nothing)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integers: no underflow in the tail sum


def paired_difference_ci(both: int, a_only: int, b_only: int, neither: int, z: float = 1.96
                         ) -> tuple[float, float] | None:
    """95 % interval of accuracy(B) - accuracy(A) on the same images: Newcombe's method 10, the Wilson
    intervals of both accuracies combined with the pairs' correlation (phi, shrunk towards 0 as he gives
    it). None without images."""
    n = both + a_only + b_only + neither
    if n == 0:
        return None
    p_b, p_a = (both + b_only) / n, (both + a_only) / n
    (lb, ub), (la, ua) = wilson_interval(both + b_only, n, z), wilson_interval(both + a_only, n, z)
    margins = (both + b_only) * (a_only + neither) * (both + a_only) * (b_only + neither)
    phi = 0.0
    if margins:
        cross = both * neither - a_only * b_only
        phi = (cross - n / 2 if cross > n / 2 else min(cross, 0)) / math.sqrt(margins)
    d = p_b - p_a
    lower = d - math.sqrt(max((p_b - lb) ** 2 + (ua - p_a) ** 2 - 2 * phi * (p_b - lb) * (ua - p_a), 0.0))
    upper = d + math.sqrt(max((p_a - la) ** 2 + (ub - p_b) ** 2 - 2 * phi * (p_a - la) * (ub - p_b), 0.0))
    return max(-1.0, lower), min(1.0, upper)


def decide(n: int, a_only: int, b_only: int, p_value: float) -> tuple[str, str]:
    """The verdict on one set and why."""
    if n < MIN_IMAGES:
        return NO_CALL, f"{n} images, fewer than {MIN_IMAGES}"
    if a_only + b_only < MIN_DISCORDANT:
        return NO_CALL, (f"{a_only + b_only} images where exactly one model is right, "
                         f"fewer than {MIN_DISCORDANT}")
    if p_value >= ALPHA:
        return NO_CALL, f"McNemar p = {p_value:.3g}, not below {ALPHA}"
    return (B_BETTER if b_only > a_only else A_BETTER), f"McNemar p = {p_value:.3g} < {ALPHA}"


def paired_report(truth: Sequence[str], a_labels: Sequence[str], b_labels: Sequence[str],
                  classes: Sequence[str]) -> dict:
    """Accuracies, the paired 2x2 counts, difference, McNemar, per-class recalls and the verdict."""
    truth, a_labels, b_labels = np.asarray(truth, object), np.asarray(a_labels, object), np.asarray(b_labels, object)
    a_ok, b_ok = a_labels == truth, b_labels == truth
    n = len(truth)
    both, neither = int((a_ok & b_ok).sum()), int((~a_ok & ~b_ok).sum())
    a_only, b_only = int((a_ok & ~b_ok).sum()), int((~a_ok & b_ok).sum())
    p_value = mcnemar_exact(a_only, b_only)
    verdict, reason = decide(n, a_only, b_only, p_value)
    per_class = {}
    for name in classes:
        mine = truth == name
        support = int(mine.sum())
        recall_a = float(a_ok[mine].mean()) if support else None
        recall_b = float(b_ok[mine].mean()) if support else None
        per_class[name] = {"support": support, "recall_a": recall_a, "recall_b": recall_b,
                           "recall_difference": None if not support else recall_b - recall_a}
    return {
        "n": n,
        "a": _accuracy(int(a_ok.sum()), n), "b": _accuracy(int(b_ok.sum()), n),
        "both_right": both, "a_only_right": a_only, "b_only_right": b_only, "both_wrong": neither,
        "difference": (int(b_ok.sum()) - int(a_ok.sum())) / n if n else None,
        "difference_ci95": paired_difference_ci(both, a_only, b_only, neither),
        "mcnemar_p": p_value,
        "verdict": verdict, "reason": reason,
        "per_class": per_class,
    }


def _accuracy(correct: int, n: int) -> dict:
    return {"correct": correct, "accuracy": correct / n if n else None,
            "accuracy_ci95": wilson_interval(correct, n) if n else None}


# --- the image sets -------------------------------------------------------------------------------------


def val_split(data: Path, meta: CheckpointMeta) -> tuple[list[Sample], list[str]]:
    """A's val split rebuilt from the seed and fraction its checkpoint stores; all of ``data`` when it
    stores none. Notes say what was used and any doubt about it."""
    samples = scan_folders(data, meta.classes)
    training = meta.training or {}
    if "seed" not in training:
        return samples, [f"A records no training split: comparing on all {len(samples)} images of {data}"]
    samples = limit_per_class(samples, training.get("limit_per_class", 0))
    notes = []
    if meta.data_manifest_sha256 and manifest_hash(samples) != meta.data_manifest_sha256:
        notes.append(f"{data} differs from the data A was trained on (manifest hash): its val split may not be "
                     "the one A was validated on")
    return training_split(samples, training)[1], notes


def feedback_samples(folder: Path, classes: Sequence[str]) -> tuple[list[Sample], dict[str, int], int]:
    """Images of an exported feedback set (one folder per class): the samples, the images in folders of other
    classes (``clean``, ``other``) per class, and the base-data images the export's manifest lists (an export
    may carry the base data along; those are not feedback and are left out)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"feedback folder {folder} does not exist")
    try:
        root = class_root(folder, classes)
    except FileNotFoundError:  # nothing of the six: every folder is skipped, and counted
        root = folder
    base = _base_files(folder)
    samples = [Sample(path, label) for label, name in enumerate(classes) if (root / name).is_dir()
               for path in _images(root / name)]
    kept = [s for s in samples if s.path.resolve() not in base]
    skipped = {d.name: len(_images(d)) for d in sorted(root.iterdir())
               if d.is_dir() and d.name not in classes and not d.name.startswith(".")}
    return kept, {name: n for name, n in skipped.items() if n}, len(samples) - len(kept)


def _base_files(folder: Path) -> set[Path]:
    """Files an export's ``manifest.json`` says came from the base data (none without a readable manifest)."""
    try:
        rows = json.loads((folder / EXPORT_MANIFEST).read_text())["files"]
        return {(folder / row["path"]).resolve() for row in rows if row.get("source") == "base"}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)


def training_files(meta: CheckpointMeta, data: Path) -> tuple[list[Path], list[str]]:
    """The images a checkpoint trained on, rebuilt from ``data`` and its stored split (all of ``data``
    without one)."""
    samples = limit_per_class(scan_folders(data, meta.classes), (meta.training or {}).get("limit_per_class", 0))
    notes = []
    if meta.data_manifest_sha256 and manifest_hash(samples) != meta.data_manifest_sha256:
        notes.append(f"{data} differs from the data B was trained on (manifest hash): the count of test images "
                     "B trained on may be off")
    if "seed" not in (meta.training or {}):
        return [s.path for s in samples], notes
    return [s.path for s in training_split(samples, meta.training)[0]], notes


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- running both models --------------------------------------------------------------------------------


@dataclass
class ImageSet:
    name: str
    description: str
    samples: list[Sample]
    images: list[np.ndarray] = field(default_factory=list)
    in_b_training: int | None = None  # images of this set B trained on; None: unknown
    excluded: int = 0  # images dropped because B trained on them (exclude_overlap)
    unreadable: list[str] = field(default_factory=list)
    severity: str | None = None  # a corruption's, in words


def frame_labels(predictor: Predictor, images: Sequence[np.ndarray], tiling: TilingConfig | None, desc: str
                 ) -> tuple[list[str], list[bool]]:
    """Each image's label and unknown flag, frames larger than a tile tiled as the worker tiles them."""
    labels, unknown = [], []
    for start in tqdm(range(0, len(images), predictor.batch_size), desc=desc, unit="batch", leave=False):
        chunk = images[start : start + predictor.batch_size]
        preds = predictor.predict_frames(chunk, tiling) if tiling is not None else predictor.predict(chunk)
        labels += [p.label for p in preds]
        unknown += [bool(p.unknown) for p in preds]
    return labels, unknown


def _decode(image_set: ImageSet, a: Predictor, b: Predictor, tiling: TilingConfig | None) -> None:
    """Read every image once (both models see the same pixels); unreadable ones and frames over the tile
    limit for either model are left out and listed."""
    kept = []
    for sample in tqdm(image_set.samples, desc=f"{image_set.name}: decode", unit="img", leave=False):
        try:
            gray = read_gray(sample.path)
            if tiling is not None:
                for predictor in (a, b):
                    tiles = tile_count(*gray.shape, tiling, predictor.input_size)
                    if tiling.max_tiles is not None and tiles > tiling.max_tiles:
                        raise ValueError(f"needs {tiles} tiles, over the limit of {tiling.max_tiles}")
        except (ImageRejected, ValueError) as exc:
            image_set.unreadable.append(f"{sample.path}: {exc}")
            continue
        kept.append(sample)
        image_set.images.append(gray)
    image_set.samples = kept


def _score(image_set: ImageSet, a: Predictor, b: Predictor, tiling: TilingConfig | None) -> dict:
    truth = [a.classes[s.label] for s in image_set.samples]
    a_labels, a_unknown = frame_labels(a, image_set.images, tiling, f"{image_set.name}: A")
    b_labels, b_unknown = frame_labels(b, image_set.images, tiling, f"{image_set.name}: B")
    report = paired_report(truth, a_labels, b_labels, a.classes)
    n = len(truth)
    report["a"]["unknown_rate"] = float(np.mean(a_unknown)) if n else None
    report["b"]["unknown_rate"] = float(np.mean(b_unknown)) if n else None
    report = {"name": image_set.name, "description": image_set.description, **report,
              "in_b_training": image_set.in_b_training, "biased": bool(image_set.in_b_training),
              "excluded_as_in_b_training": image_set.excluded, "unreadable": image_set.unreadable}
    if image_set.severity:
        report["severity"] = image_set.severity
    report["images"] = [{"path": str(s.path), "truth": t, "a": la, "b": lb, "a_unknown": ua, "b_unknown": ub}
                        for s, t, la, lb, ua, ub in zip(image_set.samples, truth, a_labels, b_labels, a_unknown,
                                                        b_unknown, strict=True)]
    return report


def compare(a: Predictor, b: Predictor, data: Path, feedback: Path | None = None, corruptions: bool = False,
            limit: int = 0, b_data: Path | None = None, exclude_overlap: bool = False,
            tiling: TilingConfig | None = None) -> dict:
    """Score A and B on the same sets; the report holds everything, per image included.

    ``b_data``: the folder B was trained on (default: the one its checkpoint records, if it is here), to count
    the test images B trained on; ``exclude_overlap`` leaves those out instead of only counting them.
    """
    if set(a.classes) != set(b.classes):
        raise ValueError(f"A and B know different classes: A {', '.join(a.classes)}; B {', '.join(b.classes)}")
    warnings: list[str] = []
    val, notes = val_split(Path(data), a.meta)
    warnings += notes
    sets = [ImageSet("val", "A's val split" if "seed" in (a.meta.training or {}) else f"all of {Path(data).name}",
                     limit_per_class(val, limit))]
    skipped: dict[str, int] = {}
    base_left_out = 0
    if feedback is not None:
        fb, skipped, base_left_out = feedback_samples(Path(feedback), a.classes)
        sets.append(ImageSet("feedback", f"exported feedback ({Path(feedback).name})", limit_per_class(fb, limit)))
        if skipped:
            warnings.append("feedback: skipped " + ", ".join(f"{n} {name}" for name, n in skipped.items())
                            + " image(s): classes neither model knows")
        if base_left_out:
            warnings.append(f"feedback: left out {base_left_out} image(s) the export's manifest lists as base "
                            "data: the feedback set is the operators' frames only")

    b_train, where = _b_training(b.meta, b_data, warnings)
    for image_set in sets:
        if b_train is None:
            continue
        seen = [file_hash(s.path) in b_train for s in image_set.samples]
        image_set.in_b_training = sum(seen)
        if exclude_overlap and image_set.in_b_training:
            image_set.samples = [s for s, hit in zip(image_set.samples, seen, strict=True) if not hit]
            image_set.excluded, image_set.in_b_training = image_set.in_b_training, 0
    for image_set in sets:
        if image_set.in_b_training:  # counted again over the images that decode
            seen = {s.path for s in image_set.samples if file_hash(s.path) in b_train}
            _decode(image_set, a, b, tiling)
            image_set.in_b_training = sum(s.path in seen for s in image_set.samples)
        else:
            _decode(image_set, a, b, tiling)
        if image_set.unreadable:
            warnings.append(f"{image_set.name}: left out {len(image_set.unreadable)} unreadable or oversized "
                            "image(s) (listed in the JSON)")
        if image_set.in_b_training:
            warnings.append(f"BIASED {image_set.name}: B trained on {image_set.in_b_training} of its "
                            f"{len(image_set.samples)} images ({where}): B's figures there are optimistic; "
                            "--exclude-overlap leaves them out")
    if corruptions:
        base = sets[0]
        for name, (_, severity) in CORRUPTIONS.items():
            sets.append(ImageSet(f"val+{name}", f"{base.description} under {name} ({severity})", base.samples,
                                 corrupt_all(base.images, name), base.in_b_training, base.excluded,
                                 severity=severity))
    reports = [_score(image_set, a, b, tiling) for image_set in sets]
    if a.checkpoint.sha256 == b.checkpoint.sha256:
        warnings.append("A and B are the same checkpoint (same sha256): every set is a tie")
    return {
        "a": _model(a), "b": _model(b),
        "rule": {"alpha": ALPHA, "min_images": MIN_IMAGES, "min_discordant": MIN_DISCORDANT,
                 "text": rule_text()},
        "correct_means": CORRECT_MEANS,
        "difference_ci_method": CI_METHOD,
        "mcnemar": "exact two-sided binomial test on the images exactly one model gets right",
        "data": str(data), "feedback": None if feedback is None else str(feedback),
        "limit_per_class": limit, "b_training_data": where, "exclude_overlap": exclude_overlap,
        "feedback_skipped": skipped, "feedback_base_left_out": base_left_out,
        "warnings": warnings,
        "sets": reports,
    }


def _b_training(meta: CheckpointMeta, b_data: Path | None, warnings: list[str]) -> tuple[set[str] | None, str]:
    """sha256 of each image B trained on, or None (with a warning) when its training data is not at hand."""
    recorded = (meta.training or {}).get("data")
    folder = Path(b_data) if b_data is not None else Path(recorded) if recorded else None
    if folder is None or not folder.is_dir():
        if b_data is not None:
            raise FileNotFoundError(f"--b-data {b_data} does not exist")
        warnings.append(f"cannot check whether B trained on the test images: its training data "
                        f"({recorded or 'not recorded'}) is not here; pass --b-data")
        return None, "unknown"
    try:
        paths, notes = training_files(meta, folder)
    except FileNotFoundError as exc:
        warnings.append(f"cannot check whether B trained on the test images: {exc}")
        return None, "unknown"
    warnings += notes
    return {file_hash(p) for p in paths}, str(folder)


def _model(predictor: Predictor) -> dict:
    return {"path": str(predictor.checkpoint.path), "sha256": predictor.checkpoint.sha256,
            "classes": list(predictor.classes), "val_metrics": predictor.meta.val_metrics}


def rule_text() -> str:
    return (f"a set names a winner only with at least {MIN_IMAGES} images, at least {MIN_DISCORDANT} images "
            f"exactly one model gets right, and McNemar's exact p below {ALPHA}; otherwise \"no call\"")


# --- the table ------------------------------------------------------------------------------------------


def _ci(pair, signed: bool = False) -> str:
    if pair is None:
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(pair[0])}..{fmt.format(pair[1])}"


def format_table(report: dict) -> str:
    """The comparison for a terminal: one row per set, per-class recall differences, the rule."""
    lines = [f"A (champion)   {Path(report['a']['path']).name}  sha256 {report['a']['sha256'][:12]}",
             f"B (challenger) {Path(report['b']['path']).name}  sha256 {report['b']['sha256'][:12]}", ""]
    head = (f"{'set':<26} {'n':>5}  {'A acc (95% CI)':<22} {'B acc (95% CI)':<22} {'B-A (95% CI)':<24} "
            f"{'A only':>6} {'B only':>6} {'McNemar p':>9}  verdict")
    lines += [head, "-" * len(head)]
    for s in report["sets"]:
        if s["n"]:
            a, b = s["a"], s["b"]
            cells = (f"{a['accuracy']:.3f} ({_ci(a['accuracy_ci95'])})", f"{b['accuracy']:.3f} "
                     f"({_ci(b['accuracy_ci95'])})", f"{s['difference']:+.3f} ({_ci(s['difference_ci95'], True)})")
        else:
            cells = ("-", "-", "-")
        verdict = s["verdict"] + (" (BIASED)" if s["biased"] else "")
        lines.append(f"{s['name']:<26} {s['n']:>5}  {cells[0]:<22} {cells[1]:<22} {cells[2]:<24} "
                     f"{s['a_only_right']:>6} {s['b_only_right']:>6} {s['mcnemar_p']:>9.3g}  {verdict}")
    lines += ["", "why (and the unknown flag's rate, counted apart):"]
    for s in report["sets"]:
        bias = f"; BIASED: B trained on {s['in_b_training']} of these images" if s["biased"] else ""
        unknown = (f"; unknown A {s['a']['unknown_rate']:.3f}, B {s['b']['unknown_rate']:.3f}" if s["n"] else "")
        lines.append(f"  {s['name']}: {s['verdict']}: {s['reason']}{unknown}{bias}")
    names = [s["name"] for s in report["sets"]]
    lines += ["", "recall B-A per class (support in brackets):"]
    width = max(14, *(len(n) for n in names))
    lines.append(f"  {'class':<16}" + "".join(f"{n:>{width + 2}}" for n in names))
    for cls in report["a"]["classes"]:
        cells = []
        for s in report["sets"]:
            row = s["per_class"][cls]
            cells.append("-" if row["recall_difference"] is None
                         else f"{row['recall_difference']:+.3f} ({row['support']})")
        lines.append(f"  {cls:<16}" + "".join(f"{c:>{width + 2}}" for c in cells))
    lines += ["", f"rule: {report['rule']['text']}.", f"B-A interval: {report['difference_ci_method']}.",
              f"correct: {report['correct_means']}."]
    for warning in report["warnings"]:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)
