"""OOD score variants side by side on one checkpoint: what each part buys and what it costs.

    python -m bench.ood_variants --data DATA                                  # the shipped checkpoint
    python -m bench.ood_variants --data DATA --checkpoint runs/.../model.safetensors
    python -m bench.ood_variants --data DATA --quick

DATA is the NEU folder the checkpoint was trained on (its manifest must match).

For the checkpoint's own train/val split, the scorer is refitted six ways: the pooled
part alone, pooled + texture, or pooled + texture + the classifier's unconfidence
(model/inference/ood.py), each fitted on the training images or on them plus their copies under
the five moderate corruptions (``refit-ood --with-corruptions``). Each variant's
threshold is the 99.5th percentile of its val scores, as in training. Printed per
variant: AUROC against val and the share flagged by the score, for the far-OOD set,
the held-out far-OOD set and the two near-OOD sets of ``evaluate --ood``; and the
share of val flagged under each moderate corruption (steel called unknown), with how
many of the model's errors under that corruption were among the flagged. The
input-quality gate is left out: this compares scores, not verdicts.
Eager PyTorch, float32; a few minutes on 2 cores (``--quick``: every 48th image, figures only a smoke test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from bench.harness import BenchParser, describe, emit
from steelsight.model.evaluation.corruptions import CORRUPTIONS, FAR_OOD, FAR_OOD_HELD_OUT, auroc, ood_sets
from steelsight.model.evaluation.evaluate import select_split
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.ood import MahalanobisScorer, OodScorer
from steelsight.model.inference.predictor import Predictor
from steelsight.model.inference.preprocess import eval_batch
from steelsight.model.training.calibrate import ood_threshold
from steelsight.model.training.data import scan_folders
from steelsight.model.training.train import Inferred, concat_inferred, corrupted_copies, infer

NAME = "ood_variants"
NEAR_OOD = ("lens_dirt", "heavy_corruption")


def features(predictor: Predictor, images: list[np.ndarray], labels: torch.Tensor) -> Inferred:
    batch = eval_batch(images, predictor.input_size)
    return infer(predictor.net, DataLoader(TensorDataset(batch, labels), batch_size=64), predictor.device)


def log_probs(feats: Inferred, temperature: float) -> torch.Tensor:
    return torch.log_softmax(feats.logits.float() / temperature, dim=1)


def fit(kind: str, train: Inferred, val: Inferred, temperature: float) -> OodScorer:
    if kind == "pooled":
        return OodScorer(MahalanobisScorer.fit(train.pooled, train.labels))
    confidence = log_probs(val, temperature) if kind.endswith("+unconfidence") else None
    return OodScorer.fit((train.pooled, train.texture), train.labels, (val.pooled, val.texture), confidence)


def score(scorer: OodScorer, feats: Inferred, temperature: float) -> np.ndarray:
    return scorer(feats.pooled, feats.texture, log_probs(feats, temperature)).numpy()


def row(name: str, scorer: OodScorer, val: Inferred, sets: dict[str, Inferred], corrupted: dict[str, Inferred],
        temperature: float) -> str:
    in_scores = score(scorer, val, temperature)
    threshold = ood_threshold(in_scores)
    cells = [name]
    for group in (FAR_OOD, FAR_OOD_HELD_OUT, *((n,) for n in NEAR_OOD)):
        out = np.concatenate([score(scorer, sets[n], temperature) for n in group])
        cells.append(f"{auroc(in_scores, out):.3f} ({np.mean(out > threshold):.0%})")
    for feats in corrupted.values():
        flagged = score(scorer, feats, temperature) > threshold
        wrong = (feats.logits.argmax(1) != feats.labels).numpy()
        cells.append(f"{flagged.mean():.1%} ({int((flagged & wrong).sum())}/{int(wrong.sum())})")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = BenchParser(__doc__, quick={"stride": 48})
    parser.add_argument("--data", type=Path, required=True, help="the data the checkpoint was trained on")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--stride", type=int, default=1,
                        help="use every k-th image of the train and val splits (default: 1, all of them)")
    args = parser.parse_args()

    predictor = Predictor.load(args.checkpoint, device="cpu", backend="torch")
    samples = scan_folders(args.data, predictor.classes)
    train_s = select_split(samples, predictor, "train")[:: args.stride]
    val_s = select_split(samples, predictor, "val")[:: args.stride]
    size, device = predictor.input_size, predictor.device
    val_images = [read_gray(s.path) for s in val_s]
    train = features(predictor, [read_gray(s.path) for s in train_s], torch.tensor([s.label for s in train_s]))
    val = features(predictor, val_images, torch.tensor([s.label for s in val_s]))
    widened = concat_inferred([train, *corrupted_copies(predictor.net, train_s, size, device, 64)])
    corrupted = dict(zip(CORRUPTIONS, corrupted_copies(predictor.net, val_s, size, device, 64), strict=True))
    sets = {name: features(predictor, images, torch.zeros(len(images), dtype=torch.long))  # no labels
            for name, images in tqdm(ood_sets(val_images[0].shape[0], val_images).items(), desc="OOD sets",
                                     leave=False)}

    header = ["scorer, fitted on", "far OOD", "held-out far OOD", *NEAR_OOD, *CORRUPTIONS]
    lines = [f"# {describe()}; checkpoint {predictor.checkpoint.path.name} ({predictor.checkpoint.sha256[:12]}…), "
             f"train {len(train_s)} / val {len(val_s)} images; AUROC (share flagged by the score) and, under "
             "corruption, share flagged (errors among the flagged / errors)",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    t = predictor.temperature
    for kind in ("pooled", "pooled+texture", "pooled+texture+unconfidence"):
        lines.append(row(f"{kind}, train", fit(kind, train, val, t), val, sets, corrupted, t))
        lines.append(row(f"{kind}, train + corrupted", fit(kind, widened, val, t), val, sets, corrupted, t))
    emit(NAME, args, lines, {"checkpoint_sha256": predictor.checkpoint.sha256, "train": len(train_s),
                             "val": len(val_s)})


if __name__ == "__main__":
    main()
