"""OOD score variants side by side on one checkpoint: what each part buys and what it costs.

    .venv/bin/python bench/ood_variants.py --data ../shared/data/neu                 # the shipped checkpoint
    .venv/bin/python bench/ood_variants.py --data ../shared/data/neu --checkpoint runs/.../model.safetensors

For the checkpoint's own train/val split, the scorer is refitted four ways: the pooled
part alone or pooled + texture (model/ood.py), each fitted on the training images or on
them plus their copies under the five moderate corruptions (``refit-ood
--with-corruptions``). Each variant's threshold is the 99.5th percentile of its val
scores, as in training. Printed per variant: AUROC against val and the share flagged by
the score, for the far-OOD set, the held-out far-OOD set and the two near-OOD sets of
``evaluate --ood``; and the share of val flagged under each moderate corruption (steel
called unknown), with how many of the model's errors under that corruption were among
the flagged. The input-quality gate is left out: this compares scores, not verdicts.
Eager PyTorch, float32; a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from steelsight.model.calibrate import ood_threshold
from steelsight.model.corruptions import CORRUPTIONS, FAR_OOD, FAR_OOD_HELD_OUT, auroc, corrupt_all, ood_sets
from steelsight.model.data import scan_folders
from steelsight.model.evaluate import select_split
from steelsight.model.imageio import read_gray
from steelsight.model.ood import MahalanobisScorer, OodScorer
from steelsight.model.predictor import Predictor
from steelsight.model.transforms import eval_batch

NEAR_OOD = ("lens_dirt", "heavy_corruption")


class Features:
    """Pooled features, texture statistics and predicted labels of a list of images."""

    def __init__(self, predictor: Predictor, images: list[np.ndarray], batch: int = 64):
        net, pooled, texture, labels = predictor.net, [], [], []
        with torch.inference_mode():
            for start in range(0, len(images), batch):
                feats, tex = net.trunk_outputs(eval_batch(images[start : start + batch], predictor.input_size))
                pool = net.pooled(feats)
                pooled.append(pool)
                texture.append(tex)
                labels.append(net.head(pool).argmax(1))
        self.pooled, self.texture, self.predicted = torch.cat(pooled), torch.cat(texture), torch.cat(labels)

    @staticmethod
    def concat(parts: list[Features]) -> Features:
        joined = object.__new__(Features)
        for name in ("pooled", "texture", "predicted"):
            setattr(joined, name, torch.cat([getattr(p, name) for p in parts]))
        return joined


def fit(kind: str, train: Features, labels: torch.Tensor, val: Features) -> OodScorer:
    if kind == "pooled":
        return OodScorer(MahalanobisScorer.fit(train.pooled, labels))
    return OodScorer.fit((train.pooled, train.texture), labels, (val.pooled, val.texture))


def score(scorer: OodScorer, feats: Features) -> np.ndarray:
    return scorer(feats.pooled, feats.texture).numpy()


def row(name: str, scorer: OodScorer, val: Features, sets: dict[str, Features], corrupted: dict[str, Features],
        truth: torch.Tensor) -> str:
    in_scores = score(scorer, val)
    threshold = ood_threshold(in_scores)
    cells = [name]
    for group in (FAR_OOD, FAR_OOD_HELD_OUT, *((n,) for n in NEAR_OOD)):
        out = np.concatenate([score(scorer, sets[n]) for n in group])
        cells.append(f"{auroc(in_scores, out):.3f} ({np.mean(out > threshold):.0%})")
    for feats in corrupted.values():
        flagged = score(scorer, feats) > threshold
        wrong = (feats.predicted != truth).numpy()
        cells.append(f"{flagged.mean():.1%} ({int((flagged & wrong).sum())}/{int(wrong.sum())})")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data the checkpoint was trained on")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    args = parser.parse_args()

    predictor = Predictor.load(args.checkpoint, device="cpu", backend="torch")
    samples = scan_folders(args.data, predictor.classes)
    train_s, val_s = select_split(samples, predictor, "train"), select_split(samples, predictor, "val")
    train_images = [read_gray(s.path) for s in tqdm(train_s, desc="decode", leave=False)]
    val_images = [read_gray(s.path) for s in val_s]
    labels, truth = torch.tensor([s.label for s in train_s]), torch.tensor([s.label for s in val_s])

    steps = tqdm(total=3 + 2 * len(CORRUPTIONS), desc="features", unit="set", leave=False)

    def features(images):
        steps.update()
        return Features(predictor, images)

    train, val = features(train_images), features(val_images)
    widened = Features.concat([train, *(features(corrupt_all(train_images, n)) for n in CORRUPTIONS)])
    corrupted = {n: features(corrupt_all(val_images, n)) for n in CORRUPTIONS}
    sets = {n: Features(predictor, images) for n, images in ood_sets(val_images[0].shape[0], val_images).items()}
    steps.update()
    steps.close()
    widened_labels = labels.repeat(1 + len(CORRUPTIONS))

    print(f"# {platform.machine()}, torch {torch.__version__}, checkpoint "
          f"{predictor.checkpoint.path.name} ({predictor.checkpoint.sha256[:12]}…), "
          f"val {len(val_s)} images; AUROC (share flagged by the score) and, under corruption, "
          "share flagged (errors among the flagged / errors)")
    header = ["scorer, fitted on", "far OOD", "held-out far OOD", *NEAR_OOD, *CORRUPTIONS]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for kind in ("pooled", "pooled+texture"):
        print(row(f"{kind}, train", fit(kind, train, labels, val), val, sets, corrupted, truth))
        print(row(f"{kind}, train + corrupted", fit(kind, widened, widened_labels, val), val, sets, corrupted, truth))


if __name__ == "__main__":
    main()
