"""The trunk quantized to int8 by NNCF (``openvino-int8``), served by OpenVINO.

``steelsight quantize CHECKPOINT`` (model/training/quantize.py) writes the int8 IR into the
same cache folder as the ONNX export, keyed by the checkpoint's sha256 and input size, and a
parity file beside it: how far int8 moves labels, recall, OOD scores, unknown verdicts and
CAMs from float32 on the checkpoint's val split, and whether that passed. Attention, head,
Grad-CAM and the OOD score stay in float32 PyTorch, as for every backend; only the trunk's
convolutions run in int8.
"""

from __future__ import annotations

import json
from pathlib import Path

from steelsight.model.inference.backends.onnx_export import ONNX_LAYOUT, cache_dir
from steelsight.model.inference.backends.openvino import OpenVinoTrunk

INT8_LAYOUT = 1  # bump when the quantization recipe or the parity file's meaning changes: older files are ignored
PARITY_SUFFIX = ".parity.json"


def int8_model_path(cache_key: str, size: int) -> Path:
    """The int8 IR's .xml (its weights are the .bin beside it), named like the ONNX export it comes from."""
    return cache_dir() / f"trunk-v{ONNX_LAYOUT}-{cache_key[:16]}-{size}-int8v{INT8_LAYOUT}.xml"


def parity_path(model: Path) -> Path:
    return model.with_suffix(PARITY_SUFFIX)


def read_parity(cache_key: str, size: int) -> dict | None:
    """The parity file of this checkpoint's int8 trunk, or None when there is none (or not for this checkpoint)."""
    model = int8_model_path(cache_key, size)
    try:
        parity = json.loads(parity_path(model).read_text())
    except (OSError, ValueError):
        return None
    if not model.exists() or not model.with_suffix(".bin").exists():
        return None
    # the name holds only a prefix of the sha: the file itself must name the whole checkpoint
    if parity.get("checkpoint_sha256") != cache_key or parity.get("input_size") != size:
        return None
    return parity


def parity_passed(cache_key: str, size: int) -> bool:
    parity = read_parity(cache_key, size)
    return bool(parity and parity.get("passed") is True)


class OpenVinoInt8Trunk(OpenVinoTrunk):
    """The NNCF-quantized trunk: int8 convolutions, everything NNCF left alone (and the outputs) in float32.

    The precision hint stays f32, so the layers kept out of int8 run in float32, not bfloat16.
    """

    name = "openvino-int8"

    def __init__(self, path: Path, size: int, threads: int | None = None):
        if not path.exists():
            raise FileNotFoundError(f"no int8 trunk at {path}: run `steelsight quantize CHECKPOINT --data NEU_DIR`")
        super().__init__(path, size, threads)


def load_int8(cache_key: str, size: int, threads: int | None = None) -> OpenVinoInt8Trunk:
    """This checkpoint's int8 trunk from the cache folder (a clear error when it was never quantized)."""
    return OpenVinoInt8Trunk(int8_model_path(cache_key, size), size, threads)
