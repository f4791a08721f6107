"""`steelsight kfold`: its own file, so the test runner can give it a worker of its own (it trains 9 times)."""

import json
import shutil

from steelsight.cli import main
from steelsight.model.evaluation.corruptions import EXPOSURE_LEVELS, exposure_name


def test_kfold_scores_every_image_once_trains_in_stages_and_resumes(tmp_path, neu_dir, capsys):
    from steelsight.model.inference.checkpoint import load_checkpoint

    out = tmp_path / "staged"
    args = ["kfold", "--data", str(neu_dir), "--out", str(out), "--pretrained", "none", "--image-size", "32",
            "--batch-size", "8", "--limit-per-class", "4", "--workers", "0", "--epochs", "1", "--folds", "2",
            "--then", "--lr 1e-4 --trunk-lr-scale 0.3", "--then", "--weight-decay 0.01", "--corruptions"]
    assert main(args) == 0
    summary = json.loads((out / "kfold.json").read_text())
    assert summary["n"] == 24 and [f["n"] for f in summary["per_fold"]] == [12, 12]
    assert sum(map(sum, summary["confusion_matrix"])) == 24
    assert "| **pooled** | 24 |" in capsys.readouterr().out
    assert summary["corruptions"]["motion_blur"]["n"] == 24  # every image scored once under each corruption
    assert {exposure_name(c, b) for c, b in EXPOSURE_LEVELS} <= summary["corruptions"].keys()
    for fold in summary["per_fold"]:  # each fold's own figures stay beside the pooled ones
        assert fold["corruptions"].keys() == summary["corruptions"].keys()
    for row in summary["corruptions"].values():  # a wrong label was either flagged unknown or let through
        wrong = 1 - row["accuracy"]
        assert wrong - row["unknown_rate"] - 1e-9 <= row["wrong_not_unknown_rate"] <= wrong + 1e-9
    first, second, third = summary["recipe"]
    assert first["data"] == neu_dir.name  # the recipe, not this machine's path
    assert (first["lr"], first["trunk_lr_scale"], second["lr"], second["trunk_lr_scale"]) == (1e-3, 0.1, 1e-4, 0.3)
    assert second["image_size"] == 32 and second["epochs"] == 1  # the rest carries over from the stage before
    assert (third["lr"], third["trunk_lr_scale"], third["weight_decay"]) == (1e-4, 0.3, 0.01)
    assert second["init_from"] == third["init_from"] == "the previous stage's best.safetensors"
    for fold in ("fold0", "fold1"):
        last = load_checkpoint(out / fold / "model.safetensors").meta.training
        assert last["init_from"] == str(out / fold / "stage2" / "best.safetensors")
        assert last["fold"] == int(fold[-1]) and last["lr"] == 1e-4 and last["weight_decay"] == 0.01
        assert (out / fold / "stage1" / "best.safetensors").exists()
        assert not (out / fold / "stage1" / "model.safetensors").exists()  # no finalize fits for a mere start
    # resumable: finished folds are evaluated again, not retrained
    stamps = {f: (out / f / "model.safetensors").stat().st_mtime_ns for f in ("fold0", "fold1")}
    assert main(args) == 0
    assert {f: (out / f / "model.safetensors").stat().st_mtime_ns for f in ("fold0", "fold1")} == stamps
    # --only scores a subset (folds split across machines): it trains a missing fold, and only that one
    capsys.readouterr()
    shutil.rmtree(out / "fold1")
    assert main([*args, "--only", "1"]) == 0
    assert (out / "fold0" / "model.safetensors").stat().st_mtime_ns == stamps["fold0"]
    assert (out / "fold1" / "model.safetensors").exists()
    summary = json.loads((out / "kfold.json").read_text())
    assert summary["folds_scored"] == [1] and summary["n"] == 12
    assert "| 1 | 12 |" in capsys.readouterr().out
