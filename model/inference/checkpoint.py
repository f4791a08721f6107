"""Checkpoints: one safetensors file, weights plus JSON metadata.

safetensors stores raw tensors and a string->string header, so loading a
checkpoint never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from steelsight.model.inference.labels import CLASSES
from steelsight.model.inference.network import ArchConfig, AttentionResNet50
from steelsight.model.inference.ood import OOD_PREFIX, OodScorer

FORMAT_VERSION = 1
METADATA_KEY = "steelsight"
SHIPPED_CHECKPOINT = Path(__file__).parents[1] / "checkpoints" / "steelsight-neu.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, malformed or from an incompatible format."""


@dataclass
class CheckpointMeta:
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    input_size: int = 160
    arch: dict = field(default_factory=lambda: ArchConfig().to_dict())
    training: dict = field(default_factory=dict)
    val_metrics: dict = field(default_factory=dict)
    data_manifest_sha256: str = ""
    temperature: float = 1.0
    ood: dict = field(default_factory=dict)
    # the training images' input statistics (quality.input_statistics): {name: {"mean", "std"}}, for drift
    input_stats: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def normalisation(self) -> dict:
        return {"mean": self.arch["mean"], "std": self.arch["std"], "input": "gray [0,1] repeated to 3 channels"}

    def to_json(self) -> str:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["normalisation"] = self.normalisation
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint format {data.get('format_version')} != {FORMAT_VERSION}")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class LoadedCheckpoint:
    model: AttentionResNet50
    meta: CheckpointMeta
    ood: OodScorer | None
    path: Path
    sha256: str


def save_checkpoint(
    model: AttentionResNet50,
    meta: CheckpointMeta,
    path: Path,
    half: bool = False,
    ood: OodScorer | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta.arch = model.arch.to_dict()
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        # half precision for conv/linear weights only: BatchNorm statistics hold folded conv biases
        # (large means, small variances) that fp16 rounding would wreck
        if half and tensor.is_floating_point() and tensor.ndim >= 2:
            tensor = tensor.half()
        state[key] = tensor.contiguous()
    if ood is not None:
        state.update(ood.prefixed_state())
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={METADATA_KEY: meta.to_json()})
    tmp.replace(path)  # atomic: a crash never leaves half a checkpoint behind
    return path


def read_meta(path: Path) -> CheckpointMeta:
    with safe_open(str(path), framework="pt") as f:
        header = (f.metadata() or {}).get(METADATA_KEY)
    if header is None:
        raise CheckpointError(f"{path} is not a steelsight checkpoint (no '{METADATA_KEY}' metadata)")
    return CheckpointMeta.from_json(header)


def load_checkpoint(path: Path | str | None = None, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the network (in eval mode) and the OOD scorer from a checkpoint."""
    path = resolve_checkpoint(path)
    try:
        meta = read_meta(path)
        model = AttentionResNet50(ArchConfig.from_dict(meta.arch))
        state = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                state[key] = f.get_tensor(key).float()
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    try:
        ood = OodScorer.from_prefixed_state(state, tuple((meta.ood or {}).get("camera_reasons", ())))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has a broken OOD scorer: {exc}") from exc
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(OOD_PREFIX)})
    if ood is not None:
        ood = ood.to(device)
    return LoadedCheckpoint(model.to(device).eval(), meta, ood, path, file_sha256(path))


def resolve_checkpoint(path: Path | str | None) -> Path:
    if path is None:
        if not SHIPPED_CHECKPOINT.exists():
            raise CheckpointError(
                "no checkpoint given and none is shipped yet: train one with "
                "`steelsight train --data DIR` and pass --checkpoint"
            )
        return SHIPPED_CHECKPOINT
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
