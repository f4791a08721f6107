import argparse
import json

import pytest
import torch

from steelsight.cli import build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "kfold", "evaluate", "predict"):
        assert command in out


def test_every_command_prints_its_help(capsys):
    """argparse expands %-formats in help text: a preset described as "40 % of the images" crashed
    ``train --help`` and ``kfold --help`` with a TypeError."""
    def commands(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield [*path, name]
                    yield from commands(sub, [*path, name])

    parser = build_parser()
    found = list(commands(parser, []))
    assert ["model", "promote"] in found and ["dataset", "export"] in found
    for path in found:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([*path, "--help"])
        assert exit_.value.code == 0, path
        assert "usage: steelsight " + " ".join(path) in capsys.readouterr().out, path


def test_train_evaluate_predict_round_trip(tmp_path, neu_dir, capsys):
    run = tmp_path / "run"
    tiny = ["--data", str(neu_dir), "--out", str(run), "--pretrained", "none", "--image-size", "64",
            "--batch-size", "8", "--limit-per-class", "5", "--workers", "0",
            "--annotations", str(neu_dir / "annotations"), "--loc-weight", "0.5"]
    assert main(["train", *tiny, "--epochs", "1"]) == 0
    assert "training images have boxes of their class" in capsys.readouterr().out
    for name in ("best.safetensors", "model.safetensors", "last_state.pt", "history.json", "training_curves.png"):
        assert (run / name).exists(), name
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]

    # resume: a second epoch continues from the saved state rather than starting over
    assert main(["train", *tiny, "--epochs", "2", "--resume"]) == 0
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1, 2]
    assert "resumed after epoch 1" in capsys.readouterr().out

    ckpt = str(run / "model.safetensors")
    assert main(["evaluate", "--data", str(neu_dir / "images"), "--annotations", str(neu_dir / "annotations"),
                 "--checkpoint", ckpt, "--out", str(tmp_path / "eval"), "--split", "val"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert (tmp_path / "eval" / "confusion_matrix.png").exists()
    assert (tmp_path / "eval" / "gradcam_grid.png").exists()
    assert report["n"] == 6  # 1 of 5 per class in val
    assert sum(map(sum, report["confusion_matrix"])) == 6
    for key in ("accuracy", "macro_f1", "ece", "ece_uncalibrated", "mean_latency_ms_per_image", "per_class"):
        assert key in report
    loc = report["localisation"]
    assert loc["images_scored"] == 6 and 0 <= loc["pointing_game"] <= 1 and 0 <= loc["energy_in_box"] <= 1

    capsys.readouterr()
    image = next((neu_dir / "images" / "scratches").iterdir())
    assert main(["predict", str(image), "--json", "--checkpoint", ckpt]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert set(row) >= {"label", "confidence", "probabilities", "ood_score", "unknown"}
    assert isinstance(row["ood_score"], float)

    # refit-ood rebuilds the checkpoint's own split and fits what train's finalize fitted
    from steelsight.model.inference.checkpoint import load_checkpoint

    refit = tmp_path / "refit.safetensors"
    assert main(["refit-ood", "--data", str(neu_dir), "--checkpoint", ckpt, "--out", str(refit)]) == 0
    before, after = load_checkpoint(ckpt), load_checkpoint(refit)
    # 24 training images span at most 24 of ViM's 64 directions: it keeps only those (the rest would be
    # arbitrary picks that float rounding moves), so the refit lands on the same threshold
    method, spanned = after.meta.ood["method"].rsplit("+vim", 1)
    assert method == "mahalanobis_pooled2048+layer3_std1024+unconfidence" and 0 < int(spanned) <= 24
    assert after.meta.ood["method"] == before.meta.ood["method"]
    assert after.meta.ood["threshold"] == pytest.approx(before.meta.ood["threshold"], rel=1e-3)
    assert after.meta.ood["camera_reasons"] == ["blurred", "noisy", "bad_exposure"]
    assert after.ood.camera is not None and after.meta.input_stats["sharpness"]["mean"] > 0
    # the threshold is a setting: a deployment's false-unknown rate picks it from the stored val scores
    from steelsight.model.inference.predictor import Predictor

    val_scores = after.meta.ood["val_scores"]
    assert val_scores == sorted(val_scores) and len(val_scores) == 6
    strict, lax = (Predictor.load(refit, device="cpu", backend="torch", unknown_false_rate=r) for r in (0.0, 0.5))
    from steelsight.model.inference.ood import THRESHOLD_MARGIN

    assert strict.ood_threshold == pytest.approx(max(val_scores) + THRESHOLD_MARGIN)
    assert lax.ood_threshold < strict.ood_threshold
    assert lax.val_share_below(max(val_scores) + 1) == 1.0
    with pytest.raises(ValueError, match="unknown_false_rate"):
        Predictor.load(refit, device="cpu", backend="torch", unknown_false_rate=1.0)
    assert after.meta.temperature == before.meta.temperature
    for key, value in before.model.state_dict().items():
        assert torch.equal(value, after.model.state_dict()[key]), key
    assert after.meta.ood["fitted_on"] == "train"
    widened = tmp_path / "widened.safetensors"
    assert main(["refit-ood", "--data", str(neu_dir), "--checkpoint", ckpt, "--out", str(widened),
                 "--with-corruptions"]) == 0
    wide = load_checkpoint(widened)
    assert wide.meta.ood["fitted_on"] == "train + train under the 5 moderate corruptions"
    assert not torch.equal(wide.ood.pooled.means, after.ood.pooled.means)  # six times the images, other means
    capsys.readouterr()
    other = tmp_path / "other"
    for name in ("crazing", "scratches"):  # not the data it was trained on
        (other / name).mkdir(parents=True)
        (other / name / "a.png").write_bytes(image.read_bytes())
    assert main(["refit-ood", "--data", str(other), "--checkpoint", ckpt, "--out", str(tmp_path / "x")]) == 2
    assert "not the data" in capsys.readouterr().err


def test_box_loss_without_boxes_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--annotations"):
        main(["train", "--data", str(tmp_path), "--loc-weight", "1"])


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["predict", "x.png", "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
