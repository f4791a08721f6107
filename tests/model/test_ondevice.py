"""The on-device explain path (ondevice.py) agrees with the CPU path, run here on CPU tensors.

The same tensor code runs on a GPU; CI has none, so this is where its arithmetic is held to the
CPU path's: labels, probabilities, OOD scores and verdicts, heatmaps, and overlays.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from steelsight.contract import Settings
from steelsight.model.inference.checkpoint import load_checkpoint
from steelsight.model.inference.imageio import encode_jpeg, read_gray
from steelsight.model.inference.ondevice import DeviceExplainer, area_weights, explain_plans_on_device, resize
from steelsight.model.inference.predictor import Predictor
from steelsight.model.inference.preprocess import resize_for_model
from steelsight.model.inference.tiling import TilingConfig, plan_frame

from ..helpers import SAMPLES


@pytest.fixture(scope="module")
def predictor():
    return Predictor(load_checkpoint(None), torch.device("cpu"), batch_size=8, backend="torch")


@pytest.fixture(scope="module")
def frames():
    """NEU samples at their 200 px (a non-integer shrink to the 160 px input), plus sizes that take each of
    resize's branches: the input size itself, an integer shrink, uneven sides, an enlargement, mixed sides."""
    grays = [read_gray(p) for p in sorted(SAMPLES.rglob("*.bmp"))][::3]
    extra = [(160, 160), (320, 320), (317, 263), (150, 150), (190, 150)]
    return grays + [cv2.resize(grays[i % len(grays)], size, interpolation=cv2.INTER_AREA)
                    for i, size in enumerate(extra)]


def decoded(jpeg: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


SIZES = [(200, 200), (320, 320), (480, 160), (640, 480), (317, 263), (1024, 768), (150, 150), (190, 150), (160, 90)]


@pytest.mark.parametrize("size", SIZES)
def test_device_resize_gives_the_cpu_models_input(size):
    gray = np.random.default_rng(sum(size)).integers(0, 256, size[::-1], dtype=np.uint8)
    ours = resize(torch.from_numpy(np.stack([gray, gray]))[:, None].float(), 160)[1, 0].numpy()
    theirs = resize_for_model(gray, 160).astype(np.float32)
    # both round to whole levels; a float sum taken in another order lands on the other side of a .5 rarely
    off = np.abs(ours - theirs)
    assert off.max() <= 1 and (off > 0).mean() < 1e-3, (off.max(), (off > 0).mean())


def test_area_weights_average_each_footprint():
    weights = area_weights(200, 160).double()
    assert torch.allclose(weights.sum(dim=1), torch.ones(160, dtype=torch.float64))
    assert torch.allclose(area_weights(320, 160)[0, :2], torch.tensor([0.5, 0.5]))


# (device, probabilities, OOD score, heatmap max, heatmap mean): on CPU tensors the arithmetic is the CPU path's
# own; on a GPU (run there, skipped in CI) cuDNN's float32 convolutions add their rounding, and nvJPEG encodes
DEVICES = [("cpu", 1e-5, 1e-4, 0.03, 0.005),
           pytest.param("cuda", 1e-4, 1e-2, 0.05, 0.01,
                        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize(("device", "prob_tol", "ood_tol", "heat_max", "heat_mean"), DEVICES)
def test_device_path_agrees_with_the_cpu_path(predictor, frames, device, prob_tol, ood_tol, heat_max, heat_mean):
    cpu = predictor.explain(frames)
    on = predictor if device == "cpu" else Predictor(load_checkpoint(None), torch.device(device), 8, "torch")
    dev = DeviceExplainer(on, jpeg_quality=90).explain(frames, heatmaps=True)
    for gray, a, b in zip(frames, cpu, dev, strict=True):
        assert (b.label, b.unknown, b.unknown_reason, b.cam_class) == (a.label, a.unknown, a.unknown_reason,
                                                                       a.cam_class), gray.shape
        diff = max(abs(a.probabilities[c] - b.probabilities[c]) for c in a.probabilities)
        assert diff < prob_tol and abs(a.ood_score - b.ood_score) < ood_tol, (gray.shape, diff)
        # heatmaps are rescaled to [0, 1] per image; the gradient is summed in another order than grad-cam's
        heat = np.abs(a.heatmap - b.heatmap)
        assert b.heatmap.shape == gray.shape and heat.max() < heat_max and heat.mean() < heat_mean, (
            heat.max(), heat.mean())
        assert b.overlay is None
        # the device's JPEG is as close to the CPU's overlay as the CPU's own JPEG of it is
        ours, theirs = decoded(b.overlay_bytes), decoded(encode_jpeg(a.overlay, 90))
        assert ours.shape == a.overlay.shape
        err_ours = np.abs(ours.astype(int) - a.overlay).mean()
        err_theirs = np.abs(theirs.astype(int) - a.overlay).mean()
        assert err_ours < err_theirs + 0.5, (gray.shape, err_ours, err_theirs)


def test_plans_keep_their_order_and_tiled_frames_take_the_cpu_path(predictor, frames):
    wide = np.concatenate(frames[:3], axis=1)  # 600 x 200: three tiles
    tiling = TilingConfig.from_settings(Settings())
    plans = [plan_frame(g, tiling, predictor.input_size) for g in (frames[0], wide, frames[1])]
    assert [p.single for p in plans] == [True, False, True]
    out = explain_plans_on_device(DeviceExplainer(predictor), plans)
    cpu = predictor.explain_plans(plans)
    assert [o.label for o in out] == [c.label for c in cpu]
    assert out[1].tiles and out[1].overlay is not None and out[1].overlay_bytes is None
    for single in (out[0], out[2]):
        assert single.overlay is None and single.overlay_bytes[:3] == b"\xff\xd8\xff" and not single.tiles
    assert "overlay_bytes" not in out[0].to_dict()


def test_on_needs_what_the_device_path_computes():
    with pytest.raises(ValueError, match="explain_on_device=on computes gradcam overlays as JPEG"):
        Settings(explain_on_device="on", overlay_format="png")
    with pytest.raises(ValueError, match="gradcam"):
        Settings(explain_on_device="on", cam_method="gradcam++")
    assert Settings(explain_on_device="auto", overlay_format="png").explain_on_device == "auto"
    # who takes the path: auto on a GPU only, on everywhere, never for what it does not compute, off never
    assert [Settings().explains_on_device(d) for d in ("cuda", "cpu")] == [True, False]
    assert Settings(explain_on_device="on").explains_on_device("cpu")
    assert not Settings(overlay_format="png").explains_on_device("cuda")
    assert not Settings(explain_on_device="off").explains_on_device("cuda")
