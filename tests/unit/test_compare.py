"""`steelsight compare`: the statistics against textbook values, the no-call rule, and the command on tiny
random checkpoints (the shipped model's run is in tests/model/test_compare_cli.py)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from steelsight.cli import main
from steelsight.model.evaluation.compare import (
    A_BETTER,
    ALPHA,
    B_BETTER,
    MIN_DISCORDANT,
    MIN_IMAGES,
    NO_CALL,
    decide,
    feedback_samples,
    mcnemar_exact,
    paired_difference_ci,
    paired_report,
)
from steelsight.model.evaluation.metrics import wilson_interval
from steelsight.model.inference.checkpoint import CheckpointMeta, save_checkpoint
from steelsight.model.inference.labels import CLASSES
from steelsight.model.inference.network import AttentionResNet50
from steelsight.model.training.data import scan_folders, stratified_split


def test_mcnemar_exact_gives_the_textbook_p_values():
    assert mcnemar_exact(10, 0) == 2 * 0.5**10
    assert mcnemar_exact(0, 10) == 2 * 0.5**10
    assert mcnemar_exact(7, 7) == 1.0 and mcnemar_exact(0, 0) == 1.0
    # 3 against 12: twice the binomial tail P(X <= 3), X ~ Bin(15, 1/2) = 2 (1 + 15 + 105 + 455) / 2^15
    assert mcnemar_exact(3, 12) == pytest.approx(2 * 576 / 2**15, rel=1e-12)
    assert mcnemar_exact(5, 6) == 1.0  # the doubled tail passes 1: capped
    # large counts stay exact: no underflow or overflow in the tail
    assert mcnemar_exact(600, 700) == pytest.approx(0.0060157938610449, rel=1e-9)
    assert 0.0 <= mcnemar_exact(0, 5000) < 1e-300


def test_wilson_interval_against_newcombe_1998():
    # Newcombe (1998), Statistics in Medicine 17:857, table II: 81/263 -> 0.2553 to 0.3662, 0/20 -> 0 to 0.1611
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)


def test_paired_difference_interval_against_the_published_example():
    # Fagerland, Lydersen, Laake, "Statistical analysis of contingency tables", ch. 8 (Cavo et al., 2012):
    # 59 both, 6 first only, 16 second only, 80 neither -> -0.0621 (95% CI -0.1186 to -0.0046), Newcombe
    lo, hi = paired_difference_ci(both=59, a_only=16, b_only=6, neither=80)
    assert (lo, hi) == pytest.approx((-0.1186, -0.0046), abs=1e-4)
    # swapping A and B mirrors the interval
    assert paired_difference_ci(59, 6, 16, 80) == pytest.approx((0.0046, 0.1186), abs=1e-4)
    assert paired_difference_ci(0, 0, 0, 0) is None
    # identical and all right: phi is taken as 0 (a margin is empty), so the interval is the Wilson widths'
    lo, hi = paired_difference_ci(50, 0, 0, 0)
    assert lo == pytest.approx(-hi) and lo < 0 < hi


def test_no_call_on_too_few_samples():
    enough = max(MIN_IMAGES, 100)
    assert decide(MIN_IMAGES - 1, 0, MIN_IMAGES - 1, 1e-9)[0] == NO_CALL  # too few images, whatever p
    assert "fewer than" in decide(MIN_IMAGES - 1, 0, MIN_IMAGES - 1, 1e-9)[1]
    few = MIN_DISCORDANT - 1
    assert decide(enough, 0, few, mcnemar_exact(0, few)) == (
        NO_CALL, f"{few} images where exactly one model is right, fewer than {MIN_DISCORDANT}")
    assert mcnemar_exact(0, few) < ALPHA  # the count rule, not the p-value, said no
    assert decide(enough, 6, 14, mcnemar_exact(6, 14))[0] == NO_CALL  # p = 0.115
    assert decide(enough, 0, 10, mcnemar_exact(0, 10)) == (B_BETTER, "McNemar p = 0.00195 < 0.05")
    assert decide(enough, 10, 0, mcnemar_exact(10, 0))[0] == A_BETTER


def test_paired_report_counts_the_pairs_and_recalls():
    truth = ["crazing"] * 20 + ["patches"] * 20
    a = ["crazing"] * 20 + ["patches"] * 8 + ["crazing"] * 12  # A misses 12 patches
    b = ["crazing"] * 18 + ["patches"] * 2 + ["patches"] * 20  # B misses 2 crazing
    report = paired_report(truth, a, b, CLASSES)
    assert (report["both_right"], report["a_only_right"], report["b_only_right"], report["both_wrong"]) == (
        26, 2, 12, 0)
    assert report["a"]["accuracy"] == 28 / 40 and report["b"]["accuracy"] == 38 / 40
    assert report["difference"] == pytest.approx(10 / 40)
    assert report["mcnemar_p"] == mcnemar_exact(2, 12)
    assert report["verdict"] == B_BETTER
    assert report["per_class"]["patches"]["recall_difference"] == pytest.approx(12 / 20)
    assert report["per_class"]["crazing"]["recall_difference"] == pytest.approx(-2 / 20)
    assert report["per_class"]["scratches"] == {"support": 0, "recall_a": None, "recall_b": None,
                                                "recall_difference": None}
    lo, hi = report["difference_ci95"]
    assert lo < report["difference"] < hi


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64), dtype=np.uint8)).save(path)


def test_feedback_skips_classes_outside_the_six(tmp_path):
    for i in range(3):
        _png(tmp_path / "fb" / "scratches" / f"s{i}.png", i)
    for i in range(2):
        _png(tmp_path / "fb" / "clean" / f"c{i}.png", 10 + i)
    _png(tmp_path / "fb" / "other" / "o.png", 20)
    _png(tmp_path / "fb" / "scratches" / "base.png", 30)  # the export carried base data along
    (tmp_path / "fb" / "manifest.json").write_text(json.dumps({"files": [
        {"path": "scratches/base.png", "class": "scratches", "source": "base"},
        *({"path": f"scratches/s{i}.png", "class": "scratches", "source": "feedback"} for i in range(3))]}))
    samples, skipped, base = feedback_samples(tmp_path / "fb", CLASSES)
    assert [s.path.name for s in samples] == ["s0.png", "s1.png", "s2.png"]
    assert skipped == {"clean": 2, "other": 1} and base == 1
    (tmp_path / "fb" / "manifest.json").write_text("not json")  # no readable manifest: every image is feedback
    assert len(feedback_samples(tmp_path / "fb", CLASSES)[0]) == 4
    only_other, skipped, _ = feedback_samples(tmp_path / "fb" / "other", CLASSES)  # no class folder at all
    assert only_other == [] and skipped == {}


@pytest.fixture()
def data(tmp_path):
    for label, name in enumerate(CLASSES):
        for i in range(5):
            _png(tmp_path / "data" / name / f"{name}_{i}.png", 100 * label + i)
    return tmp_path / "data"


def _checkpoint(path, data, seed, classes=CLASSES):
    torch.manual_seed(0)
    training = {"seed": seed, "val_fraction": 0.4, "data": str(data)}
    save_checkpoint(AttentionResNet50().eval(), CheckpointMeta(classes=list(classes), input_size=64,
                                                               training=training), path)
    return path


def test_compare_warns_when_b_trained_on_a_val_and_can_leave_them_out(tmp_path, data, capsys):
    a = _checkpoint(tmp_path / "a.safetensors", data, seed=0)
    b = _checkpoint(tmp_path / "b.safetensors", data, seed=1)  # another split: its train holds some of A's val
    samples = scan_folders(data)
    a_val = {s.path for s in stratified_split(samples, 0.4, 0)[1]}
    b_train = {s.path for s in stratified_split(samples, 0.4, 1)[0]}
    overlap = len(a_val & b_train)
    assert 0 < overlap < len(a_val) == 12
    base = ["compare", str(a), str(b), "--data", str(data), "--backend", "torch", "--device", "cpu"]
    assert main([*base, "--json", str(tmp_path / "r.json")]) == 0
    out, err = capsys.readouterr()
    assert f"BIASED val: B trained on {overlap} of its 12 images" in err
    assert "no call (BIASED)" in out  # 12 images: too few to call, and biased
    report = json.loads((tmp_path / "r.json").read_text())
    (val,) = report["sets"]
    assert val["n"] == 12 and val["in_b_training"] == overlap and val["biased"]
    assert val["verdict"] == NO_CALL and val["reason"] == f"12 images, fewer than {MIN_IMAGES}"
    assert len(val["images"]) == 12 and {r["path"] for r in val["images"]} == {str(p) for p in a_val}
    a_ok = sum(r["a"] == r["truth"] for r in val["images"])
    assert val["a"]["correct"] == a_ok
    b_only = sum(r["b"] == r["truth"] != r["a"] for r in val["images"])
    a_only = sum(r["a"] == r["truth"] != r["b"] for r in val["images"])
    assert val["mcnemar_p"] == mcnemar_exact(a_only, b_only)

    assert main([*base, "--exclude-overlap", "--json", str(tmp_path / "x.json")]) == 0
    assert "BIASED" not in capsys.readouterr().err
    (val,) = json.loads((tmp_path / "x.json").read_text())["sets"]
    assert val["n"] == 12 - overlap and val["excluded_as_in_b_training"] == overlap and not val["biased"]


def test_compare_with_feedback_and_corruptions_and_the_same_model(tmp_path, data, capsys):
    a = _checkpoint(tmp_path / "a.safetensors", data, seed=0)
    for i in range(2):
        _png(tmp_path / "fb" / "inclusion" / f"f{i}.png", 5000 + i)
    _png(tmp_path / "fb" / "clean" / "c.png", 6000)
    assert main(["compare", str(a), str(a), "--data", str(data), "--feedback", str(tmp_path / "fb"),
                 "--corruptions", "--limit-per-class", "1", "--backend", "torch", "--device", "cpu",
                 "--json", str(tmp_path / "r.json")]) == 0
    out, err = capsys.readouterr()
    report = json.loads((tmp_path / "r.json").read_text())
    names = [s["name"] for s in report["sets"]]
    assert names == ["val", "feedback", "val+gaussian_noise", "val+gaussian_blur", "val+motion_blur",
                     "val+brightness_contrast", "val+jpeg"]
    assert [s["n"] for s in report["sets"]] == [6, 1, 6, 6, 6, 6, 6]  # --limit-per-class 1 applies to every set
    assert report["feedback_skipped"] == {"clean": 1}
    assert "skipped 1 clean image(s)" in err and "same checkpoint" in err
    for s in report["sets"]:  # the same model: every image a tie
        assert s["a_only_right"] == s["b_only_right"] == 0 and s["mcnemar_p"] == 1.0 and s["verdict"] == NO_CALL
        assert s["in_b_training"] == 0  # B (= A) trained on A's train split, never on its val
    for name in names:
        assert name in out
    assert math.isclose(report["rule"]["alpha"], ALPHA)


def test_compare_refuses_bad_input(tmp_path, data, capsys):
    a = _checkpoint(tmp_path / "a.safetensors", data, seed=0)
    other = _checkpoint(tmp_path / "o.safetensors", data, seed=0, classes=[*CLASSES[:5], "dents"])
    base = ["--data", str(data), "--backend", "torch", "--device", "cpu"]
    assert main(["compare", str(a), str(other), *base]) == 2
    assert "A and B know different classes" in capsys.readouterr().err
    assert main(["compare", str(a), str(tmp_path / "none.safetensors"), *base]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compare", str(a), str(a), "--data", str(tmp_path / "nothing"), "--backend", "torch"]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["compare", str(a), str(a), *base, "--feedback", str(tmp_path / "nothing")]) == 2
    assert "--feedback" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    assert main(["compare", str(a), str(tmp_path / "junk.safetensors"), *base]) == 2
    assert "junk.safetensors" in capsys.readouterr().err
