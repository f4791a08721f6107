"""The int8 trunk (``steelsight quantize``, ``--backend openvino-int8``): files, parity with PyTorch, ``auto``'s rule.

One quantization of the shipped checkpoint on a subset (12 train and 12 val images per class, one
try, at the float32 step the full run passes with) serves every test here; it needs the NEU data
(the calibration is the checkpoint's own training split) and NNCF.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from steelsight.model.inference.backends.factory import int8_eligible, make_trunk
from steelsight.model.inference.backends.openvino_int8 import (
    OpenVinoInt8Trunk,
    int8_model_path,
    load_ood_calibration,
    ood_path,
    parity_passed,
    parity_path,
    read_parity,
)
from steelsight.model.inference.checkpoint import load_checkpoint
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.predictor import Predictor

from ..helpers import SAMPLES

pytest.importorskip("nncf")
pytest.importorskip("openvino")

# stated tolerance for the int8 trunk on the bundled samples (docs/int8.md): labels must not move and the
# heatmaps stay close; the OOD score is int8's own (fitted on its features), so it is checked for being that
CAM_MIN_MEAN_CORRELATION = 0.9
# unknown verdicts on the subset's val + corrupted copies (432 images), both OOD scorers fitted on its 72 training
# images: the full run's criterion is 99 % (docs/int8.md); here one step fewer in float32 (`stem`) agrees on 98.4 %
SUBSET_MIN_UNKNOWN_AGREEMENT = 0.985


@pytest.fixture(scope="module")
def quantized(neu_dir, tmp_path_factory):
    from steelsight.cli import main

    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEELSIGHT_CACHE", str(cache))
        code = main(["quantize", "--data", str(neu_dir), "--limit-per-class", "12", "--max-attempts", "1",
                     "--calibration-images", "72", "--from-step", "stem+layer3", "--no-progress"])
        ckpt = load_checkpoint(None)
        size = int(ckpt.meta.input_size)
        yield {"code": code, "ckpt": ckpt, "size": size, "model": int8_model_path(ckpt.sha256, size),
               "parity": read_parity(ckpt.sha256, size), "cache": cache}


@pytest.fixture(scope="module")
def samples():
    return [read_gray(p) for p in sorted(SAMPLES.rglob("*.bmp"))]


def test_quantize_writes_the_int8_model_and_its_parity_file_beside_the_export(quantized):
    model, parity = quantized["model"], quantized["parity"]
    assert model.exists() and model.with_suffix(".bin").stat().st_size > 1_000_000
    assert parity_path(model).exists() and parity is not None
    assert model.parent == next(quantized["cache"].glob("onnx/trunk-v*-160.onnx")).parent  # the export's folder
    assert parity["checkpoint_sha256"] == quantized["ckpt"].sha256
    assert parity["calibration"]["split"] == "train" and parity["calibration"]["images"] == 72
    assert parity["evaluated_on"]["val"] == 72
    assert ood_path(model).exists() and parity["ood"]["file"] == ood_path(model).name
    for key in ("top1_agreement", "recall", "worst_recall_drop", "criteria", "fp32_layers", "attempts", "passed"):
        assert key in parity, key
    assert set(parity["recall"]) == set(quantized["ckpt"].meta.classes)
    # exit status and the file agree, and "passed" is exactly the criteria
    assert quantized["code"] == (0 if parity["passed"] else 1)
    crit = parity["criteria"]
    labels_hold = (parity["top1_agreement"] >= crit["min_top1_agreement"]
                   and parity["worst_recall_drop"] <= crit["max_recall_drop"])
    if labels_hold:
        assert {"unknown_agreement", "ood_score_abs_diff", "cam"} <= set(parity)
        assert parity["passed"] == (parity["unknown_agreement"]["all"] >= crit["min_unknown_agreement"])
        assert "pointing_game" in parity["cam"]  # the NEU folder carries the NEU-DET boxes
    else:
        assert parity["passed"] is False


def test_int8_holds_float32s_labels_verdicts_and_heatmaps_on_the_subset(quantized):
    parity = quantized["parity"]
    assert parity["subset"]["fp32_ood"] == "fitted on the same subset"
    assert parity["top1_agreement"] == 1.0 and parity["worst_recall_drop"] == 0.0
    assert parity["unknown_agreement"]["all"] >= SUBSET_MIN_UNKNOWN_AGREEMENT, parity["unknown_agreement"]
    assert parity["unknown_agreement_images"] == 72 * 6
    assert parity["cam"]["within_tolerance"] and parity["cam"]["mean_correlation"] >= CAM_MIN_MEAN_CORRELATION
    assert abs(parity["cam"]["pointing_game"]["change"]) <= 0.03, parity["cam"]["pointing_game"]


def test_int8_trunk_agrees_with_pytorch_on_the_bundled_samples(quantized, samples):
    ckpt = quantized["ckpt"]
    ref = Predictor(ckpt, torch.device("cpu"), batch_size=8, backend="torch")
    int8 = Predictor(ckpt, torch.device("cpu"), batch_size=8, backend="torch")
    int8.use_trunk(OpenVinoInt8Trunk(quantized["model"], quantized["size"]))
    a, b = ref.predict(samples), int8.predict(samples)
    assert len(samples) == 30
    assert [p.label for p in b] == [p.label for p in a]  # top-1 agreement 100%
    assert [p.unknown for p in b] == [p.unknown for p in a]
    corr = []
    for x, y in zip(ref.explain(samples[::5]), int8.explain(samples[::5]), strict=True):
        assert x.label == y.label
        hx, hy = x.heatmap.ravel() - x.heatmap.mean(), y.heatmap.ravel() - y.heatmap.mean()
        corr.append(float(hx @ hy / (np.linalg.norm(hx) * np.linalg.norm(hy))))
    assert np.mean(corr) >= CAM_MIN_MEAN_CORRELATION, corr


def test_the_int8_trunk_scores_with_the_ood_scorer_fitted_on_its_own_features(quantized, samples):
    ckpt, parity = quantized["ckpt"], quantized["parity"]
    scorer, meta = load_ood_calibration(ood_path(quantized["model"]))
    assert parity["ood"]["threshold"] == meta["threshold"] and "int8" in meta["fitted_on"]
    int8 = Predictor(ckpt, torch.device("cpu"), batch_size=8, backend="torch")
    int8.use_trunk(OpenVinoInt8Trunk(quantized["model"], quantized["size"]))
    assert int8.ood_threshold == meta["threshold"] != ckpt.meta.ood["threshold"]
    # the served score is the file's scorer on the int8 features, and the verdict its threshold's
    with torch.inference_mode():
        feats, texture = int8.trunk(int8.preprocess(samples[:8]))
        pooled = int8.net.pooled(feats)
        logits = int8.net.head(pooled)
        direct = scorer(pooled, texture, torch.log_softmax(logits / int8.temperature, dim=1),
                        int8.net.hidden(pooled), logits)
    served = int8.predict(samples[:8])
    assert np.allclose([p.ood_score for p in served], direct.tolist(), atol=1e-4)
    # with its scorer file gone, the trunk falls back to the checkpoint's own
    moved = ood_path(quantized["model"]).rename(quantized["model"].with_suffix(".moved"))
    try:
        plain = Predictor(ckpt, torch.device("cpu"), batch_size=8, backend="torch")
        plain.use_trunk(OpenVinoInt8Trunk(quantized["model"], quantized["size"]))
        assert plain.ood_threshold == ckpt.meta.ood["threshold"]
    finally:
        moved.rename(ood_path(quantized["model"]))


def test_auto_picks_int8_only_with_a_passing_parity_file(quantized, monkeypatch):
    ckpt, size = quantized["ckpt"], quantized["size"]
    monkeypatch.setenv("STEELSIGHT_CACHE", str(quantized["cache"]))
    record = quantized["cache"] / "onnx" / "fastest-runtime.json"
    path = parity_path(quantized["model"])
    original = path.read_text()
    try:
        path.write_text(json.dumps(json.loads(original) | {"passed": False}))
        assert not int8_eligible(size, ckpt.sha256)
        assert make_trunk("auto", ckpt.model, size, ckpt.sha256).name != "openvino-int8"
        assert not any(k.endswith("|int8") for k in json.loads(record.read_text()))
        # a parity file for another checkpoint (the name holds a prefix of the sha only) does not count either
        path.write_text(json.dumps(json.loads(original) | {"passed": True, "checkpoint_sha256": "0" * 64}))
        assert not parity_passed(ckpt.sha256, size)
        # passing: int8 is timed against the others, under a key of its own; what wins depends on the machine
        path.write_text(json.dumps(json.loads(original) | {"passed": True}))
        assert int8_eligible(size, ckpt.sha256)
        chosen = make_trunk("auto", ckpt.model, size, ckpt.sha256)
        (key, name), = [(k, v) for k, v in json.loads(record.read_text()).items() if k.endswith("|int8")]
        assert name == chosen.name
        # a remembered int8 win is served again without timing, while the parity file still passes
        record.write_text(json.dumps({key: "openvino-int8"}))
        assert make_trunk("auto", ckpt.model, size, ckpt.sha256).name == "openvino-int8"
        path.unlink()
        assert make_trunk("auto", ckpt.model, size, ckpt.sha256).name != "openvino-int8"
    finally:
        path.write_text(original)


def test_the_float32_step_is_recorded_and_a_model_without_the_overflow_fix_needs_vnni(quantized, monkeypatch):
    from steelsight.model.inference.backends import openvino_int8

    parity, ckpt, size = quantized["parity"], quantized["ckpt"], quantized["size"]
    assert parity["fp32_layers"] == "texture tap + first conv + layer3"
    assert [a["fp32_layers"] for a in parity["attempts"]] == [parity["fp32_layers"]]
    assert parity["recipe"]["activations_range"] == "minmax"
    path = parity_path(quantized["model"])
    original = path.read_text()
    try:
        path.write_text(json.dumps(json.loads(original) | {"passed": True, "recipe": {"overflow_fix": "disable"}}))
        monkeypatch.setattr(openvino_int8, "int8_instructions", lambda: ["avx512_vnni"])
        assert parity_passed(ckpt.sha256, size)
        monkeypatch.setattr(openvino_int8, "int8_instructions", lambda: [])
        assert not parity_passed(ckpt.sha256, size)  # would saturate without VNNI: auto leaves it alone
        path.write_text(json.dumps(json.loads(original) | {"passed": True, "recipe": {"overflow_fix": "first_layer"}}))
        assert parity_passed(ckpt.sha256, size)
    finally:
        path.write_text(original)


def test_quantize_names_its_float32_steps(capsys):
    from steelsight.cli import build_parser, main
    from steelsight.model.training.quantize import FP32_STEPS

    with pytest.raises(SystemExit, match="--from-step must be one of tap, stem"):
        main(["quantize", "--data", "x", "--from-step", "layer9"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(step in help_text for step in FP32_STEPS), help_text


def test_the_int8_backend_without_a_quantized_model_is_a_clear_error(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("STEELSIGHT_CACHE", str(tmp_path))
    net = load_checkpoint(tiny_checkpoint).model
    with pytest.raises(ValueError, match="steelsight quantize"):
        make_trunk("openvino-int8", net, 64, "tiny")
