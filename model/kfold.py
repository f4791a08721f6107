"""k-fold cross-validation of a training recipe.

Trains one model per fold (val = that fold's part of every class), evaluates each
on its own val part, and pools the folds' confusion matrices: every image is
scored once by a model that never trained on it. Resumable: a fold whose
model.safetensors exists is only re-evaluated, one with last_state.pt resumes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from .evaluate import evaluate
from .metrics import per_class_prf, wilson_interval
from .predictor import Predictor
from .train import TrainConfig, train


def train_fold(cfg: TrainConfig, folds: int, fold: int, out: Path) -> Path:
    fold_dir = out / f"fold{fold}"
    model_path = fold_dir / "model.safetensors"
    if not model_path.exists():
        resume = (fold_dir / "last_state.pt").exists()
        train(replace(cfg, folds=folds, fold=fold, out=str(fold_dir), resume=resume))
    return model_path


def pooled(reports: list[dict], classes: list[str]) -> dict:
    """Accuracy (Wilson 95% CI) and macro-F1 over the summed confusion matrices, plus per-fold spread."""
    cm = sum(np.array(r["confusion_matrix"]) for r in reports)
    correct, total = int(np.trace(cm)), int(cm.sum())
    accs = np.array([r["accuracy"] for r in reports])
    return {
        "folds": len(reports),
        "n": total,
        "errors": total - correct,
        "accuracy": correct / total,
        "accuracy_ci95": wilson_interval(correct, total),
        "macro_f1": float(per_class_prf(cm)["f1"].mean()),
        "fold_accuracy_mean": float(accs.mean()),
        "fold_accuracy_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
        "fold_ece_after_temperature": [r["ece"] for r in reports],
        "classes": classes,
        "confusion_matrix": cm.tolist(),
        "per_fold": [{k: r[k] for k in ("n", "accuracy", "macro_f1", "ece", "ece_uncalibrated", "checkpoint_sha256")}
                     for r in reports],
    }


def run_kfold(cfg: TrainConfig, folds: int, out: Path) -> dict:
    if folds < 2:
        raise ValueError("k-fold needs --folds of at least 2")
    reports, classes = [], []
    for fold in range(folds):
        print(f"== fold {fold + 1}/{folds}", flush=True)
        predictor = Predictor.load(train_fold(cfg, folds, fold, out), device=cfg.device)
        reports.append(evaluate(predictor, Path(cfg.data), out / f"fold{fold}" / "eval", split="val"))
        classes = predictor.classes
    # the recipe, not where this machine keeps the data: kfold.json is meant to be shared
    recipe = {k: v for k, v in vars(cfg).items() if k not in ("fold", "out", "data", "annotations")}
    summary = pooled(reports, classes) | {"recipe": recipe | {"data": Path(cfg.data).name}}
    (out / "kfold.json").write_text(json.dumps(summary, indent=2))
    return summary


def summary_table(summary: dict) -> str:
    lo, hi = summary["accuracy_ci95"]
    lines = ["| fold | val images | accuracy | macro-F1 | ECE after temperature |", "|---:|---:|---:|---:|---:|"]
    for i, row in enumerate(summary["per_fold"]):
        lines.append(f"| {i} | {row['n']} | {100 * row['accuracy']:.2f} % | {row['macro_f1']:.4f} | "
                     f"{100 * row['ece']:.2f} % |")
    lines.append(f"| **pooled** | {summary['n']} | **{100 * summary['accuracy']:.2f} %** "
                 f"(95 % CI {100 * lo:.2f}–{100 * hi:.2f}; {summary['errors']} errors) | "
                 f"**{summary['macro_f1']:.4f}** | |")
    return "\n".join(lines)
