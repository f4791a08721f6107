"""The smoke check a checkpoint passes before a worker serves it: labelled sample frames, read right.

It guards the swap, not accuracy: a file that loads but is broken (weights of another
model, NaNs, classes in another order, a head trained to a constant) reads the bundled
training samples badly or not at all, and a worker keeps the model it has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.labels import CLASSES
from steelsight.model.inference.predictor import Predictor
from steelsight.model.training.data import scan_folders


class SmokeFailed(RuntimeError):
    """The checkpoint loaded but does not read the sample frames as a sound model does."""


@dataclass(frozen=True)
class SmokeReport:
    frames: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.frames


def smoke_check(predictor: Predictor, samples: Path, min_accuracy: float) -> SmokeReport:
    """Label every sample frame and explain one; raise :class:`SmokeFailed` on any sign of a broken model."""
    if list(predictor.classes) != list(CLASSES):
        raise SmokeFailed(f"its classes {predictor.classes} are not the pipeline's {list(CLASSES)}")
    found = scan_folders(samples)
    images = [read_gray(s.path) for s in found]
    predictions = predictor.predict(images)
    for sample, pred in zip(found, predictions, strict=True):
        numbers = [pred.confidence, *pred.probabilities.values()]
        if pred.ood_score is not None:
            numbers.append(pred.ood_score)
        if not all(math.isfinite(x) for x in numbers):
            raise SmokeFailed(f"non-finite output on {sample.path.name}")
    correct = sum(pred.label == CLASSES[s.label] for s, pred in zip(found, predictions, strict=True))
    report = SmokeReport(len(found), correct)
    if report.accuracy < min_accuracy:
        raise SmokeFailed(f"it labels {correct} of {len(found)} sample frames right ({report.accuracy:.0%}); at least "
                          f"{min_accuracy:.0%} is required (smoke_min_accuracy)")
    explained = predictor.explain(images[:1])[0]  # the Grad-CAM path runs too
    if explained.overlay is None or not math.isfinite(float(explained.heatmap.sum())):
        raise SmokeFailed("its Grad-CAM heatmap is not finite")
    return report
