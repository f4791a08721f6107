"""`steelsight compare` on the shipped checkpoint (A) and a copy of it whose errors are known (B: its last
layer's bias makes it answer "scratches" for everything): the printed and JSON McNemar p-value must equal
the one computed directly from both models' own predictions on the same images."""

import json
import math
import shutil

import torch

from steelsight.cli import main
from steelsight.model.evaluation.compare import A_BETTER
from steelsight.model.inference.checkpoint import SHIPPED_CHECKPOINT, load_checkpoint, save_checkpoint
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.predictor import Predictor
from steelsight.model.training.data import limit_per_class, scan_folders, training_split

PER_CLASS = 5  # 30 val images: the fewest the rule lets name a winner
ALWAYS = "scratches"


def _always_scratches(path):
    loaded = load_checkpoint(SHIPPED_CHECKPOINT)
    head = loaded.model.classifier
    with torch.no_grad():
        head.bias[loaded.meta.classes.index(ALWAYS)] += 1e4  # dwarfs every logit the weights give
    save_checkpoint(loaded.model, loaded.meta, path, half=True, ood=loaded.ood)
    return path


def _p_value(a_only: int, b_only: int) -> float:
    """Two-sided exact binomial test at 1/2, written out again here rather than imported."""
    n = a_only + b_only
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2**n) if n else 1.0


def test_compare_gives_the_p_value_of_the_models_own_predictions(tmp_path, neu_dir, capsys, monkeypatch):
    b_path = _always_scratches(tmp_path / "b.safetensors")
    # each model loaded once (a load is seconds on CPU): the command gets the same objects the test asks directly
    loaded = {path: Predictor.load(path, device="cpu", backend="torch") for path in (SHIPPED_CHECKPOINT, b_path)}
    monkeypatch.setattr(Predictor, "load", classmethod(lambda cls, path, **_: loaded[path]))
    meta = load_checkpoint(SHIPPED_CHECKPOINT).meta
    train, val = training_split(scan_folders(neu_dir, meta.classes), meta.training)
    val = limit_per_class(val, PER_CLASS)
    feedback = tmp_path / "feedback"  # images B trained on (it shares A's training split): a biased set
    for sample in limit_per_class(train, 1):
        (feedback / sample.class_name).mkdir(parents=True)
        shutil.copy(sample.path, feedback / sample.class_name)
    (feedback / "other").mkdir()
    shutil.copy(train[0].path, feedback / "other")

    report_path = tmp_path / "compare.json"
    assert main(["compare", str(SHIPPED_CHECKPOINT), str(b_path), "--data", str(neu_dir), "--feedback",
                 str(feedback), "--b-data", str(neu_dir), "--limit-per-class", str(PER_CLASS),
                 "--backend", "torch", "--device", "cpu", "--json", str(report_path)]) == 0
    out, err = capsys.readouterr()
    report = json.loads(report_path.read_text())
    val_report, feedback_report = report["sets"]

    # the same images, predicted directly by each model
    images = [read_gray(s.path) for s in val]
    truth = [meta.classes[s.label] for s in val]
    a_labels, b_labels = ([p.label for p in predictor.predict(images)] for predictor in loaded.values())
    assert set(b_labels) == {ALWAYS}
    a_only = sum(a == t != b for t, a, b in zip(truth, a_labels, b_labels, strict=True))
    b_only = sum(b == t != a for t, a, b in zip(truth, a_labels, b_labels, strict=True))
    assert [r["path"] for r in val_report["images"]] == [str(s.path) for s in val]
    assert [r["a"] for r in val_report["images"]] == a_labels and [r["b"] for r in val_report["images"]] == b_labels
    assert (val_report["a_only_right"], val_report["b_only_right"]) == (a_only, b_only)
    assert a_only >= 4 * PER_CLASS and b_only == 0  # B is right on scratches only; A on nearly everything
    p = _p_value(a_only, b_only)
    assert val_report["mcnemar_p"] == p
    (row,) = [line for line in out.splitlines() if line.startswith("val ")]
    assert f"{p:.3g}" in row and row.rstrip().endswith(A_BETTER)
    assert val_report["verdict"] == A_BETTER and val_report["n"] == 6 * PER_CLASS
    assert val_report["per_class"][ALWAYS]["recall_b"] == 1.0
    assert val_report["in_b_training"] == 0 and not val_report["biased"]

    assert feedback_report["n"] == 6 and report["feedback_skipped"] == {"other": 1}
    assert feedback_report["in_b_training"] == 6 and feedback_report["verdict"] == "no call"
    assert "BIASED feedback: B trained on 6 of its 6 images" in err
