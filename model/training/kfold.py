"""k-fold cross-validation of a training recipe.

Trains one model per fold, in one or more stages (val = that fold's part of every class), evaluates each
on its own val part, and pools the folds' confusion matrices: every image is
scored once by a model that never trained on it. Resumable: a fold whose
model.safetensors exists is only re-evaluated, one with last_state.pt resumes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from steelsight.model.evaluation.evaluate import evaluate
from steelsight.model.evaluation.metrics import per_class_prf, wilson_interval
from steelsight.model.inference.predictor import Predictor
from steelsight.model.training.train import TrainConfig, train

STAGE_DONE = "stage.done"  # an intermediate stage's marker: its epochs ran and best.safetensors is final


def train_fold(stages: list[TrainConfig], folds: int, fold: int, out: Path) -> Path:
    """Train the fold's stages in turn, each from the previous one's best epoch; the last one's model."""
    fold_dir = out / f"fold{fold}"
    init_from = stages[0].init_from
    for number, stage in enumerate(stages, start=1):
        last = number == len(stages)
        stage_dir = fold_dir if last else fold_dir / f"stage{number}"
        # an earlier stage is only the next one's start: its best epoch, without the finalize fits
        done = stage_dir / ("model.safetensors" if last else STAGE_DONE)
        if not (done.exists() or (stage_dir / "model.safetensors").exists()):
            resume = (stage_dir / "last_state.pt").exists()
            train(replace(stage, folds=folds, fold=fold, out=str(stage_dir), resume=resume, init_from=init_from,
                          finalize=last))
            if not last:
                done.touch()
        init_from = str(stage_dir / "best.safetensors")
    return fold_dir / "model.safetensors"


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
                     | ({"corruptions": {name: {k: v for k, v in row.items() if k != "accuracy_ci95"}
                                         for name, row in r["corruptions"].items()}} if "corruptions" in r else {})
                     for r in reports],
    }


def pooled_robustness(reports: list[dict]) -> dict:
    """Corruption accuracy and Grad-CAM localisation over all folds' val images, when the folds scored them."""
    extras = {}
    if all("corruptions" in r for r in reports):
        n = sum(r["n"] for r in reports)
        extras["corruptions"] = {}
        for name, row in reports[0]["corruptions"].items():
            correct = sum(round(r["corruptions"][name]["accuracy"] * r["n"]) for r in reports)
            extras["corruptions"][name] = {"severity": row["severity"], "accuracy": correct / n,
                                           "accuracy_ci95": wilson_interval(correct, n), "n": n}
            for rate in ("unknown_rate", "wrong_not_unknown_rate"):  # reports from before these lack them
                if all(rate in r["corruptions"][name] for r in reports):
                    extras["corruptions"][name][rate] = sum(r["corruptions"][name][rate] * r["n"] for r in reports) / n
    if all("localisation" in r for r in reports):
        scored = [r["localisation"]["images_scored"] for r in reports]
        extras["localisation"] = {"images_scored": sum(scored)} | {
            key: sum(r["localisation"][key] * k for r, k in zip(reports, scored, strict=True)) / max(sum(scored), 1)
            for key in ("pointing_game", "pointing_game_15px", "energy_in_box")}
    return extras


def run_kfold(stages: list[TrainConfig], folds: int, out: Path, corruptions: bool = False,
              only: list[int] | None = None) -> dict:
    """Cross-validate a recipe of one or more training stages (see :func:`train_fold`).

    Each fold's model is scored on its val part; with the last stage's ``annotations``
    also for Grad-CAM localisation, and with ``corruptions`` under the five corruptions.
    """
    if folds < 2:
        raise ValueError("k-fold needs --folds of at least 2")
    last = stages[-1]
    annotations = Path(last.annotations) if last.annotations else None
    reports, classes = [], []
    for fold in only if only is not None else range(folds):
        print(f"== fold {fold} (of 0..{folds - 1})", flush=True)
        predictor = Predictor.load(train_fold(stages, folds, fold, out), device=last.device)
        reports.append(evaluate(predictor, Path(last.data), out / f"fold{fold}" / "eval", annotations, split="val",
                                corruptions=corruptions))
        classes = predictor.classes
    summary = pooled(reports, classes) | pooled_robustness(reports) | {"folds_scored": list(only or range(folds))}
    summary["recipe"] = [shareable(cfg, n) for n, cfg in enumerate(stages, 1)]
    (out / "kfold.json").write_text(json.dumps(summary, indent=2))
    return summary


def shareable(cfg: TrainConfig, stage: int) -> dict:
    """A stage's options without this machine's paths: kfold.json is meant to be shared."""
    recipe = {k: v for k, v in vars(cfg).items() if k not in ("fold", "out", "data", "annotations", "init_from")}
    start = "the previous stage's best.safetensors" if stage > 1 else (Path(cfg.init_from).name if cfg.init_from
                                                                       else None)
    return recipe | {"data": Path(cfg.data).name, "annotations": cfg.annotations is not None, "init_from": start}


def summary_table(summary: dict) -> str:
    lo, hi = summary["accuracy_ci95"]
    lines = ["| fold | val images | accuracy | macro-F1 | ECE after temperature |", "|---:|---:|---:|---:|---:|"]
    folds = summary.get("folds_scored", range(len(summary["per_fold"])))
    for fold, row in zip(folds, summary["per_fold"], strict=True):
        lines.append(f"| {fold} | {row['n']} | {100 * row['accuracy']:.2f} % | {row['macro_f1']:.4f} | "
                     f"{100 * row['ece']:.2f} % |")
    lines.append(f"| **pooled** | {summary['n']} | **{100 * summary['accuracy']:.2f} %** "
                 f"(95 % CI {100 * lo:.2f}–{100 * hi:.2f}; {summary['errors']} errors) | "
                 f"**{summary['macro_f1']:.4f}** | |")
    for name, row in summary.get("corruptions", {}).items():
        lo, hi = row["accuracy_ci95"]
        lines.append(f"{name} ({row['severity']}): {100 * row['accuracy']:.2f} % (95 % CI {100 * lo:.2f}–"
                     f"{100 * hi:.2f}) of {row['n']}")
    if "localisation" in summary:
        loc = summary["localisation"]
        lines.append(f"Grad-CAM on {loc['images_scored']} images with boxes: pointing game "
                     f"{100 * loc['pointing_game']:.1f} % (15 px: {100 * loc['pointing_game_15px']:.1f} %), "
                     f"energy in box {100 * loc['energy_in_box']:.1f} %")
    return "\n".join(lines)
