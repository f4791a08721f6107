"""Train/val splits: the seeded stratified split and k-fold cross-validation."""

from pathlib import Path

import numpy as np
import pytest

from steelsight.model.training.data import Sample, stratified_split, training_split
from steelsight.model.training.kfold import pooled, pooled_robustness

SAMPLES = [Sample(Path(f"c{label}/img{i:03d}.bmp"), label) for label in range(6) for i in range(40)]


def test_default_split_is_stratified_and_seeded():
    train, val = stratified_split(SAMPLES, 0.2, seed=0)
    assert len(val) == 48 and all(sum(s.label == c for s in val) == 8 for c in range(6))
    assert not set(train) & set(val) and len(train) + len(val) == len(SAMPLES)
    assert stratified_split(SAMPLES, 0.2, seed=0) == (train, val)
    assert stratified_split(SAMPLES, 0.2, seed=1)[1] != val
    # a checkpoint without k-fold keys (every one trained before them) gets the same split back
    assert training_split(SAMPLES, {"val_fraction": 0.2, "seed": 0}) == (train, val)


def test_folds_cover_every_image_once_and_stay_stratified():
    vals = [stratified_split(SAMPLES, 0.2, seed=0, folds=5, fold=k)[1] for k in range(5)]
    assert sorted(s.path for v in vals for s in v) == sorted(s.path for s in SAMPLES)
    for k, val in enumerate(vals):
        train = stratified_split(SAMPLES, 0.2, seed=0, folds=5, fold=k)[0]
        assert not set(train) & set(val) and len(train) + len(val) == len(SAMPLES)
        assert all(sum(s.label == c for s in val) == 8 for c in range(6))
    assert training_split(SAMPLES, {"val_fraction": 0.2, "seed": 0, "folds": 5, "fold": 3})[1] == vals[3]
    with pytest.raises(ValueError, match="fold 5"):
        stratified_split(SAMPLES, 0.2, seed=0, folds=5, fold=5)


def test_pooled_kfold_figures_come_from_the_summed_confusion_matrices():
    perfect = {"n": 4, "accuracy": 1.0, "macro_f1": 1.0, "ece": 0.01, "ece_uncalibrated": 0.02,
               "checkpoint_sha256": "a", "confusion_matrix": [[2, 0], [0, 2]]}
    one_error = perfect | {"accuracy": 0.75, "confusion_matrix": [[2, 0], [1, 1]]}
    summary = pooled([perfect, one_error], ["a", "b"])
    assert "corruptions" not in summary["per_fold"][0]  # folds scored clean only
    assert summary["n"] == 8 and summary["errors"] == 1 and summary["accuracy"] == 7 / 8
    assert summary["confusion_matrix"] == [[4, 0], [1, 3]]
    f1_a, f1_b = 2 * 4 / (2 * 4 + 1), 2 * 3 / (2 * 3 + 1)  # 2TP / (2TP + FP + FN) per class
    assert summary["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)
    assert summary["fold_accuracy_mean"] == 0.875 and summary["fold_accuracy_std"] == pytest.approx(np.std([1, 0.75],
                                                                                                          ddof=1))
    lo, hi = summary["accuracy_ci95"]
    assert lo < 7 / 8 < hi


def test_pooled_robustness_weighs_each_fold_by_its_images():
    def fold(n, blur_acc, scored, pointing):
        return {"n": n, "corruptions": {"motion_blur": {"severity": "9 px", "accuracy": blur_acc,
                                                        "wrong_not_unknown_rate": 1 - blur_acc}},
                "localisation": {"images_scored": scored, "pointing_game": pointing, "pointing_game_15px": 1.0,
                                 "energy_in_box": 0.5}}

    extras = pooled_robustness([fold(4, 1.0, 2, 1.0), fold(6, 0.5, 6, 0.5)])
    assert extras["corruptions"]["motion_blur"]["accuracy"] == (4 + 3) / 10
    assert extras["corruptions"]["motion_blur"]["n"] == 10
    assert extras["corruptions"]["motion_blur"]["wrong_not_unknown_rate"] == (0 + 3) / 10
    assert "unknown_rate" not in extras["corruptions"]["motion_blur"]  # not in every fold's report
    assert extras["localisation"] == {"images_scored": 8, "pointing_game": (2 + 3) / 8, "pointing_game_15px": 1.0,
                                      "energy_in_box": 0.5}
    assert pooled_robustness([{"n": 3}]) == {}  # folds scored without corruptions or boxes add nothing
