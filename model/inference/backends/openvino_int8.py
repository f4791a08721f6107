"""The trunk quantized to int8 by NNCF (``openvino-int8``), served by OpenVINO.

``steelsight quantize CHECKPOINT`` (model/training/quantize.py) writes the int8 IR into the
same cache folder as the ONNX export, keyed by the checkpoint's sha256 and input size, and a
parity file beside it: how far int8 moves labels, recall, OOD scores, unknown verdicts and
CAMs from float32 on the checkpoint's val split, and whether that passed. Attention, head,
Grad-CAM and the OOD score stay in float32 PyTorch, as for every backend; only the trunk's
convolutions run in int8.

The OOD scorer is the exception: its Mahalanobis and ViM parts whiten the features, so int8's
rounding, small in the labels, moves the scores far. ``quantize`` fits a scorer and threshold on
the int8 trunk's own features of the training split (``*.ood.safetensors`` beside the IR), and a
predictor serving this trunk scores with it (``ood_calibration``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from steelsight.model.inference.backends import INT8_RUNTIME
from steelsight.model.inference.backends.onnx_export import ONNX_LAYOUT, cache_dir
from steelsight.model.inference.backends.openvino import OpenVinoTrunk

INT8_LAYOUT = 3  # bump when the quantization recipe or the parity file's meaning changes: older files are ignored
PARITY_SUFFIX = ".parity.json"
OOD_SUFFIX = ".ood.safetensors"


INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo flags with int8 dot products
# what oneDNN (in PyTorch and OpenVINO) may still use of those under ONEDNN_MAX_CPU_ISA (older name
# DNNL_MAX_CPU_ISA); a cap not named here leaves them all
_CAP_ALLOWS: dict[str, frozenset[str]] = {
    **dict.fromkeys(("SSE41", "AVX", "AVX2", "AVX512_CORE"), frozenset()),
    **dict.fromkeys(("AVX2_VNNI", "AVX2_VNNI_2"), frozenset({"avx_vnni"})),
    **dict.fromkeys(("AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16"), frozenset({"avx512_vnni"})),
    **dict.fromkeys(("AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16"), frozenset({"avx512_vnni", "amx_int8"})),
}


def int8_instructions(cpu_flags: set[str] | None = None) -> list[str]:
    """The int8 dot-product instruction sets oneDNN may use here: the CPU's (``cpu_flags``, else
    /proc/cpuinfo's; none where it is missing), less what ``ONEDNN_MAX_CPU_ISA`` caps away."""
    if cpu_flags is None:
        try:
            cpu_flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            return []
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    allowed = _CAP_ALLOWS.get(cap, frozenset(INT8_FLAGS))
    return [flag for flag in INT8_FLAGS if flag in cpu_flags and flag in allowed]


def int8_model_path(cache_key: str, size: int, subset: int = 0) -> Path:
    """The int8 IR's .xml (its weights are the .bin beside it), named like the ONNX export it comes from.

    ``subset``: a run on that many images per class (a smoke run) gets a name of its own, so it never
    replaces the full run's model, and nothing serves it.
    """
    variant = f"-subset{subset}" if subset else ""
    return cache_dir() / f"trunk-v{ONNX_LAYOUT}-{cache_key[:16]}-{size}-int8v{INT8_LAYOUT}{variant}.xml"


def parity_path(model: Path) -> Path:
    return model.with_suffix(PARITY_SUFFIX)


def ood_path(model: Path) -> Path:
    return model.with_suffix(OOD_SUFFIX)


def weights_sha256(model: Path) -> str:
    """The IR's weights (.bin) by content: what a scorer file says it was fitted with."""
    digest = hashlib.sha256()
    with model.with_suffix(".bin").open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_ood_calibration(path: Path, scorer, ood_meta: dict) -> None:
    """The scorer's tensors and its metadata (threshold, val scores, camera reasons, the IR's weights) in one file."""
    state = {k: v.contiguous() for k, v in scorer.prefixed_state().items()}
    save_file(state, str(path), metadata={"ood": json.dumps(ood_meta)})


def load_ood_calibration(path: Path):
    """(OodScorer, its metadata) from ``save_ood_calibration``'s file, or None when there is none."""
    from steelsight.model.inference.ood import OodScorer

    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        ood_meta = json.loads(f.metadata()["ood"])
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    scorer = OodScorer.from_prefixed_state(state, tuple(ood_meta.get("camera_reasons", ())))
    return scorer.eval(), ood_meta


def read_parity(cache_key: str, size: int, subset: int = 0) -> dict | None:
    """The parity file of this checkpoint's int8 trunk, or None when there is none, it is not for this
    checkpoint, or a file it names is missing (the IR, its weights, its OOD scorer)."""
    model = int8_model_path(cache_key, size, subset)
    try:
        parity = json.loads(parity_path(model).read_text())
    except (OSError, ValueError):
        return None
    if not model.exists() or not model.with_suffix(".bin").exists():
        return None
    if parity.get("ood") is not None and not ood_path(model).exists():
        return None
    # the name holds only a prefix of the sha: the file itself must name the whole checkpoint
    if parity.get("checkpoint_sha256") != cache_key or parity.get("input_size") != size:
        return None
    return parity


def parity_passed(cache_key: str, size: int) -> bool:
    """The parity file says it passed, on a CPU like the one it was made on: a model quantized without the
    overflow fix (for CPUs with VNNI or AMX) can saturate on one without."""
    parity = read_parity(cache_key, size)
    if not (parity and parity.get("passed") is True and not parity.get("subset")):
        return False
    return (parity.get("recipe") or {}).get("overflow_fix") != "disable" or bool(int8_instructions())


class OpenVinoInt8Trunk(OpenVinoTrunk):
    """The NNCF-quantized trunk: int8 convolutions, everything NNCF left alone (and the outputs) in float32.

    The precision hint stays f32, so the layers kept out of int8 run in float32, not bfloat16.
    """

    name = INT8_RUNTIME
    # the checkpoint's float32 scorer misreads int8 features: a predictor refuses this trunk without its own
    needs_own_ood = True

    def __init__(self, path: Path, size: int, threads: int | None = None):
        if not path.exists():
            raise FileNotFoundError(f"no int8 trunk at {path}: run `steelsight quantize CHECKPOINT --data NEU_DIR`")
        super().__init__(path, size, threads)
        own = load_ood_calibration(ood_path(path))
        # a scorer fitted with other weights (a quantize run cut short between its writes) is no scorer
        self.ood_calibration = own if own is not None and own[1].get("weights_sha256") == weights_sha256(path) \
            else None


def load_int8(cache_key: str, size: int, threads: int | None = None) -> OpenVinoInt8Trunk:
    """This checkpoint's int8 trunk from the cache folder (a clear error when it was never quantized)."""
    return OpenVinoInt8Trunk(int8_model_path(cache_key, size), size, threads)
