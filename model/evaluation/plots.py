"""PNG figures: training curves, confusion matrix, overlay grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def training_curves(history: list[dict], path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train (focal)")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val (focal)")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val accuracy")
    ax_acc.plot(epochs, [h["val_macro_f1"] for h in history], "s--", label="val macro-F1")
    ax_acc.set(xlabel="epoch", ylabel="score", title="Validation", ylim=(0, 1.01))
    ax_acc.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix_png(cm: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> Path:
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=40, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title or "Confusion matrix")
    threshold = cm.max() / 2 if cm.size else 0
    for (i, j), value in np.ndenumerate(cm):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def overlay_grid(overlays: Sequence[np.ndarray], captions: Sequence[str], path: Path, cols: int = 6) -> Path:
    rows = max(1, int(np.ceil(len(overlays) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, overlays, captions, strict=False):
        ax.imshow(image)
        ax.set_title(caption, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ood_histogram(in_scores: np.ndarray, out_sets: dict[str, np.ndarray], threshold: float | None, path: Path):
    fig, ax = plt.subplots(figsize=(8, 4))
    everything = np.concatenate([in_scores, *out_sets.values()])
    bins = np.logspace(np.log10(max(everything.min(), 1e-3)), np.log10(everything.max() + 1e-3), 40)
    ax.hist(in_scores, bins=bins, alpha=0.7, label="in-distribution (eval data)", color="tab:green")
    for name, scores in out_sets.items():
        ax.hist(scores, bins=bins, alpha=0.45, label=name, histtype="stepfilled")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label="unknown threshold")
    ax.set(xscale="log", xlabel="OOD score (model/inference/ood.py)",
           ylabel="images", title="OOD score by image set")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
