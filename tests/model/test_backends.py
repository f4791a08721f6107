"""The trunk backends agree numerically on the shipped checkpoint: labels, probabilities, OOD scores, CAMs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from steelsight.model.inference.backends import CPU_RUNTIMES
from steelsight.model.inference.backends.factory import make_trunk
from steelsight.model.inference.backends.onnxruntime import OnnxRuntimeTrunk
from steelsight.model.inference.backends.openvino import OpenVinoTrunk
from steelsight.model.inference.backends.pytorch import TorchTrunk
from steelsight.model.inference.checkpoint import load_checkpoint
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.predictor import Predictor

from ..helpers import SAMPLES


@pytest.fixture(scope="module")
def predictors():
    ckpt = load_checkpoint(None)
    return {name: Predictor(ckpt, torch.device("cpu"), batch_size=8, backend=name)
            for name in ("torch", *CPU_RUNTIMES)}


@pytest.fixture(scope="module")
def samples():
    return [read_gray(p) for p in sorted(SAMPLES.rglob("*.bmp"))]


def test_auto_times_the_cpu_runtimes_once_and_keeps_the_faster(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("STEELSIGHT_CACHE", str(tmp_path))
    net = load_checkpoint(tiny_checkpoint).model
    chosen = make_trunk("auto", net, 64, "tiny")
    assert isinstance(chosen, OnnxRuntimeTrunk | OpenVinoTrunk)
    record = tmp_path / "onnx" / "fastest-runtime.json"
    (key, name), = json.loads(record.read_text()).items()
    assert name == chosen.name and key.endswith("|64|tiny")
    # the next start reads the choice instead of timing again
    other = next(r for r in CPU_RUNTIMES if r != name)
    record.write_text(json.dumps({key: other}))
    assert make_trunk("auto", net, 64, "tiny").name == other
    assert isinstance(make_trunk("torch", net, 64, "tiny"), TorchTrunk)
    assert make_trunk("torch-fp16", net, 64, "tiny").dtype == torch.float16
    with pytest.raises(ValueError, match="unknown backend"):
        make_trunk("tensorrt", net, 64, "tiny")


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_backends_agree_on_predictions(predictors, samples, runtime):
    ref, out = (predictors[n].predict(samples) for n in ("torch", runtime))
    assert len(samples) == 30
    assert [p.label for p in out] == [p.label for p in ref]  # top-1 agreement 100%
    diff = max(abs(a.probabilities[c] - b.probabilities[c]) for a, b in zip(ref, out, strict=True)
               for c in a.probabilities)
    assert diff < 1e-3, diff
    assert max(abs(a.ood_score - b.ood_score) for a, b in zip(ref, out, strict=True)) < 1e-3
    assert [p.unknown for p in out] == [p.unknown for p in ref]


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_backends_agree_on_gradcam(predictors, samples, runtime):
    ref, out = (predictors[n].explain(samples[::5]) for n in ("torch", runtime))
    for a, b in zip(ref, out, strict=True):
        assert a.label == b.label
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=2e-3)


# (backend, heatmap max, heatmap mean): bfloat16 keeps 8 mantissa bits to float16's 11
HALF = [("torch-fp16", 0.06, 0.015), ("torch-bf16", 0.12, 0.03)]


@pytest.mark.parametrize(("backend", "heat_max", "heat_mean"), HALF)
def test_half_precision_trunk_agrees_with_float32(predictors, samples, backend, heat_max, heat_mean):
    """The half-precision trunks are meant for GPUs; their arithmetic is checked here on the CPU (slow there)."""
    half = Predictor(predictors["torch"].checkpoint, torch.device("cpu"), batch_size=8, backend=backend)
    subset = samples[::3]
    ref, out = predictors["torch"].predict(subset), half.predict(subset)
    assert [p.label for p in out] == [p.label for p in ref]
    diff = max(abs(a.probabilities[c] - b.probabilities[c]) for a, b in zip(ref, out, strict=True)
               for c in a.probabilities)
    assert diff < 1e-3, diff  # half precision: an order of magnitude of headroom over its rounding
    # the score's val spread is ~1 and its threshold ~1.3: within 0.1, and the verdicts are compared exactly below
    assert max(abs(a.ood_score - b.ood_score) for a, b in zip(ref, out, strict=True)) < 0.1
    assert [p.unknown for p in out] == [p.unknown for p in ref]
    # heatmaps are rescaled to [0, 1] per image; bounds with headroom over half precision's rounding
    for a, b in zip(predictors["torch"].explain(samples[::10]), half.explain(samples[::10]), strict=True):
        diff = np.abs(a.heatmap - b.heatmap)
        assert diff.max() < heat_max and diff.mean() < heat_mean, (diff.max(), diff.mean())


def test_backend_names_agree_across_cli_settings_and_backends():
    from typing import get_args

    from steelsight.cli import build_parser
    from steelsight.contract import Settings
    from steelsight.model.inference.backends import BACKEND_NAMES

    assert get_args(Settings.model_fields["backend"].annotation) == BACKEND_NAMES
    worker = next(a for a in build_parser()._subparsers._group_actions[0].choices["worker"]._actions
                  if a.dest == "backend")
    assert tuple(worker.choices) == BACKEND_NAMES


def test_export_replaces_the_same_checkpoints_unversioned_file(tmp_path, monkeypatch):
    from steelsight.model.inference.backends.onnx_export import ONNX_LAYOUT, cached_onnx
    from steelsight.model.inference.network import AttentionResNet50

    monkeypatch.setenv("STEELSIGHT_CACHE", str(tmp_path))
    net = AttentionResNet50().eval()
    cache = tmp_path / "onnx"
    cache.mkdir()
    stale, other = cache / "trunk-0123456789abcdef-32.onnx", cache / "trunk-fedcba9876543210-32.onnx"
    stale.write_bytes(b"old layout")
    other.write_bytes(b"another checkpoint's")
    path = cached_onnx(net, 32, "0123456789abcdef" + "0" * 48)
    assert path.name == f"trunk-v{ONNX_LAYOUT}-0123456789abcdef-32.onnx" and path.stat().st_size > 1000
    assert not stale.exists() and other.exists()


def test_auto_leaves_out_a_runtime_that_cannot_load(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    from steelsight.model.inference.backends import factory

    def broken(*args, **kwargs):
        raise RuntimeError("no plugin for this CPU")

    monkeypatch.setenv("STEELSIGHT_CACHE", str(tmp_path))
    monkeypatch.setattr(factory, "OpenVinoTrunk", broken)
    net = load_checkpoint(tiny_checkpoint).model
    assert isinstance(make_trunk("auto", net, 64, "tiny"), OnnxRuntimeTrunk)
    assert "openvino could not load the trunk" in caplog.text
