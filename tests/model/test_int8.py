"""The int8 trunk (``steelsight quantize``, ``--backend openvino-int8``): files, parity with PyTorch, ``auto``'s rule.

One quantization of the shipped checkpoint on a subset (12 train and 12 val images per class, one
try, at the float32 step the full run passes with) serves every test here; it needs the NEU data
(the calibration is the checkpoint's own training split) and NNCF.
"""

from __future__ import annotations

import json
import shutil

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
from steelsight.model.training.quantize import CAM_MIN_CORRELATION

from ..helpers import SAMPLES

pytest.importorskip("nncf")
pytest.importorskip("openvino")

# unknown verdicts on the subset's val + corrupted copies (432 images), both OOD scorers fitted on its 72 training
# images. The full run's criterion is 99 % (docs/int8.md); this bound sits between what the `stem+layer3` step
# and one step fewer in float32 (`stem`) reach on this subset, so `stem` fails it
SUBSET_MIN_UNKNOWN_AGREEMENT = 0.985


@pytest.fixture(scope="module")
def quantized(neu_dir, tmp_path_factory):
    from steelsight.cli import main

    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEELSIGHT_CACHE", str(cache))
        ckpt = load_checkpoint(None)
        size = int(ckpt.meta.input_size)
        full = int8_model_path(ckpt.sha256, size)
        full.parent.mkdir(parents=True, exist_ok=True)
        parity_path(full).write_text('{"a full run": true}')  # a smoke run must leave the full run's files alone
        code = main(["quantize", "--data", str(neu_dir), "--limit-per-class", "12", "--max-attempts", "1",
                     "--calibration-images", "72", "--from-step", "stem+layer3", "--no-progress"])
        full_run_kept = parity_path(full).read_text() == '{"a full run": true}'
        model = int8_model_path(ckpt.sha256, size, subset=12)
        parity = read_parity(ckpt.sha256, size, subset=12)
        # the same files under the full run's name, as `steelsight quantize --data NEU_DIR` writes them: what
        # serving and `auto` read
        for suffix in (".xml", ".bin", ".ood.safetensors"):
            shutil.copyfile(model.with_suffix(suffix), full.with_suffix(suffix))
        parity_path(full).write_text(json.dumps(parity | {"subset": None, "passed": True}))
        yield {"code": code, "ckpt": ckpt, "size": size, "model": model, "parity": parity, "full": full,
               "cache": cache, "full_run_kept": full_run_kept}


@pytest.fixture(scope="module")
def samples():
    return [read_gray(p) for p in sorted(SAMPLES.rglob("*.bmp"))]


def test_quantize_writes_the_int8_model_and_its_parity_file_beside_the_export(quantized):
    model, parity = quantized["model"], quantized["parity"]
    assert model.exists() and model.with_suffix(".bin").stat().st_size > 1_000_000
    assert parity_path(model).exists() and parity is not None
    assert model.parent == next(quantized["cache"].glob("onnx/trunk-v*-160.onnx")).parent  # the export's folder
    assert parity["checkpoint_sha256"] == quantized["ckpt"].sha256
    assert parity["calibration"]["images"] == 72 and parity["calibration"]["also_in_val"] == 0
    assert parity["evaluated_on"]["val"] == 72
    # a subset run has a name of its own, left the full run's files alone, and nothing serves it whatever it says
    assert model.name.endswith("-subset12.xml") and parity["subset"]["limit_per_class"] == 12
    assert quantized["full_run_kept"]
    full = parity_path(quantized["full"])
    served = full.read_text()
    try:
        full.write_text(json.dumps(parity | {"passed": True}))
        assert not parity_passed(quantized["ckpt"].sha256, quantized["size"])
    finally:
        full.write_text(served)
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
    # float32's scorer was fitted on the same 72 images as int8's, not taken from the checkpoint
    assert parity["ood"]["fp32_threshold"] != parity["ood"]["checkpoint_threshold"]
    assert parity["top1_agreement"] == 1.0 and parity["worst_recall_drop"] == 0.0
    assert parity["unknown_agreement"]["all"] >= SUBSET_MIN_UNKNOWN_AGREEMENT, parity["unknown_agreement"]
    assert parity["unknown_agreement_images"] == 72 * 6
    assert parity["cam"]["within_tolerance"] and parity["cam"]["mean_correlation"] >= CAM_MIN_CORRELATION
    assert abs(parity["cam"]["pointing_game"]["change"]) <= 0.03, parity["cam"]["pointing_game"]


def test_int8_trunk_agrees_with_pytorch_on_the_bundled_samples(quantized, samples):
    ckpt = quantized["ckpt"]
    ref = Predictor(ckpt, torch.device("cpu"), batch_size=8, backend="torch")
    int8 = Predictor(ckpt, torch.device("cpu"), batch_size=8, backend="torch")
    int8.use_trunk(OpenVinoInt8Trunk(quantized["model"], quantized["size"]))
    a, b = ref.predict(samples), int8.predict(samples)
    assert len(samples) == 30
    assert [p.label for p in b] == [p.label for p in a]  # top-1 agreement 100%
    corr = []
    for x, y in zip(ref.explain(samples[::5]), int8.explain(samples[::5]), strict=True):
        assert x.label == y.label
        hx, hy = x.heatmap.ravel() - x.heatmap.mean(), y.heatmap.ravel() - y.heatmap.mean()
        corr.append(float(hx @ hy / (np.linalg.norm(hx) * np.linalg.norm(hy))))
    assert np.mean(corr) >= CAM_MIN_CORRELATION, corr


def test_the_int8_trunk_scores_with_the_ood_scorer_fitted_on_its_own_features(quantized, samples, tmp_path,
                                                                             monkeypatch):
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
    # with its scorer file gone, the trunk is refused rather than read with float32's scorer; auto leaves it out
    full = quantized["full"]
    moved = ood_path(full).rename(full.with_suffix(".moved"))
    try:
        plain = Predictor(ckpt, torch.device("cpu"), batch_size=8, backend="torch")
        with pytest.raises(ValueError, match="no OOD scorer fitted on its features"):
            plain.use_trunk(OpenVinoInt8Trunk(full, quantized["size"]))
        assert not parity_passed(ckpt.sha256, quantized["size"])
    finally:
        moved.rename(ood_path(full))
    # weights other than the scorer was fitted with (a run cut short between its writes): no scorer, refused
    other = tmp_path / "onnx" / full.name
    other.parent.mkdir()
    for suffix in (".xml", ".bin", ".ood.safetensors"):
        shutil.copyfile(full.with_suffix(suffix), other.with_suffix(suffix))
    weights = other.with_suffix(".bin").read_bytes()
    other.with_suffix(".bin").write_bytes(weights[:-4] + bytes(4))
    assert OpenVinoInt8Trunk(other, quantized["size"]).ood_calibration is None
    # a truncated IR is a clear start-up error, not a traceback from OpenVINO
    other.with_suffix(".bin").write_bytes(weights[: len(weights) // 2])
    monkeypatch.setenv("STEELSIGHT_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="could not be loaded"):
        make_trunk("openvino-int8", ckpt.model, quantized["size"], ckpt.sha256)


def test_auto_picks_int8_only_with_a_passing_parity_file(quantized, monkeypatch):
    from steelsight.model.inference.backends import factory

    ckpt, size = quantized["ckpt"], quantized["size"]
    monkeypatch.setenv("STEELSIGHT_CACHE", str(quantized["cache"]))
    record = quantized["cache"] / "onnx" / "fastest-runtime.json"
    path = parity_path(quantized["full"])
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
        loads = []
        real = factory._loaded
        monkeypatch.setattr(factory, "_loaded", lambda runtime, *a: loads.append(runtime) or real(runtime, *a))
        assert make_trunk("auto", ckpt.model, size, ckpt.sha256).name == "openvino-int8"
        assert loads == ["openvino-int8"]  # nothing else loaded, so nothing timed
        monkeypatch.setattr(factory, "_loaded", real)
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
    path = parity_path(quantized["full"])
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


def test_the_int8_instructions_are_the_cpus_less_what_onednn_is_capped_to(monkeypatch):
    from steelsight.model.inference.backends.openvino_int8 import int8_instructions

    amx = {"avx512_vnni", "avx_vnni", "amx_int8", "avx512f"}
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert int8_instructions(amx) == ["avx512_vnni", "avx_vnni", "amx_int8"]
    assert int8_instructions({"avx2", "avx512f"}) == []
    for cap, left in [("AVX2", []), ("avx512_core", []), ("AVX512_CORE_VNNI", ["avx512_vnni"]),
                      ("AVX2_VNNI", ["avx_vnni"]), ("AVX512_CORE_AMX", ["avx512_vnni", "amx_int8"])]:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert int8_instructions(amx) == left, cap
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")  # oneDNN's older name for the same cap
    assert int8_instructions(amx) == []


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


class _Serving:
    """What load_checked reads of a serving worker: its predictor, and a way to run between its batches."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.built_between_batches = False

    def between_batches(self, build):
        self.built_between_batches = True
        return build()


def test_a_worker_serving_int8_reloads_into_int8_only_where_the_new_checkpoint_passed(quantized):
    from steelsight.contract import Settings
    from steelsight.worker.models import load_checked

    ckpt = quantized["ckpt"]
    serving = Predictor(ckpt, torch.device("cpu"), batch_size=8, backend="openvino-int8")
    engine = _Serving(serving)
    settings = Settings(backend="auto", smoke_min_accuracy=0.0)
    reloaded = load_checked(ckpt.path, settings, engine)
    # no runtime is timed beside a serving worker, and nothing waits for a batch
    assert reloaded.trunk.name == "openvino-int8" and not engine.built_between_batches
    path = parity_path(quantized["full"])
    original = path.read_text()
    try:
        path.write_text(json.dumps(json.loads(original) | {"passed": False}))
        assert load_checked(ckpt.path, settings, engine).trunk.name == "openvino"
    finally:
        path.write_text(original)
