"""Build the trunk a backend name asks for; ``auto`` picks the faster CPU runtime at start-up."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time

import torch

from steelsight.model.inference.backends import BACKEND_NAMES, CPU_RUNTIMES, INT8_RUNTIME
from steelsight.model.inference.backends.base import Trunk
from steelsight.model.inference.backends.onnx_export import cache_dir, cached_onnx
from steelsight.model.inference.backends.onnxruntime import OnnxRuntimeTrunk
from steelsight.model.inference.backends.openvino import OpenVinoTrunk
from steelsight.model.inference.backends.openvino_int8 import load_int8, parity_passed
from steelsight.model.inference.backends.pytorch import TorchTrunk
from steelsight.model.inference.network import AttentionResNet50

log = logging.getLogger("steelsight.model")


def installed(runtime: str) -> bool:
    try:
        __import__(runtime)
    except ImportError:
        return False
    return True


def int8_eligible(size: int, cache_key: str) -> bool:
    """Whether ``auto`` may consider the int8 trunk: OpenVINO installed, and this checkpoint's int8 model
    written by ``steelsight quantize`` with a parity file that says it passed. Being faster is timed after."""
    return installed("openvino") and parity_passed(cache_key, size)


def _cpu_runtime(name: str, net: AttentionResNet50, size: int, cache_key: str) -> Trunk:
    if name == INT8_RUNTIME:
        return load_int8(cache_key, size)
    path = cached_onnx(net, size, cache_key)
    return OnnxRuntimeTrunk(path) if name == "onnxruntime" else OpenVinoTrunk(path, size)


def _loaded(runtime: str, net: AttentionResNet50, size: int, cache_key: str) -> Trunk | None:
    """The runtime's trunk, or None (logged) when it cannot load it, e.g. a plugin without support for this CPU."""
    try:
        return _cpu_runtime(runtime, net, size, cache_key)
    except Exception as exc:
        log.warning("%s could not load the trunk, left out: %s", runtime, exc)
        return None


def pick_cpu_runtime(net: AttentionResNet50, size: int, cache_key: str) -> Trunk:
    """The faster installed CPU runtime on this machine, timed once (best of 3 on a batch of 8) and remembered.

    Which wins depends on the CPU, so it is measured rather than assumed; the choice is
    kept per CPU, thread count, input size and checkpoint in the cache folder. The int8 trunk
    competes only where its parity file says it passed (:func:`int8_eligible`); the key then
    says so, so a choice made before quantizing is timed again.
    """
    runtimes = [r for r in CPU_RUNTIMES if installed(r)]
    int8 = int8_eligible(size, cache_key)
    if int8:
        runtimes.append(INT8_RUNTIME)
    record = cache_dir() / "fastest-runtime.json"
    key = "|".join(map(str, (platform.processor() or platform.machine(), os.cpu_count(), torch.get_num_threads(),
                             size, cache_key[:16]))) + ("|int8" if int8 else "")
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    if known.get(key) in runtimes and (trunk := _loaded(known[key], net, size, cache_key)) is not None:
        return trunk
    trunks = {r: t for r in runtimes if (t := _loaded(r, net, size, cache_key)) is not None}
    if len(trunks) < 2:
        return next(iter(trunks.values()), None) or TorchTrunk(net)
    x = torch.rand(8, 1, size, size)

    def best_of_3(trunk: Trunk) -> float:
        trunk(x)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            trunk(x)
            times.append(time.perf_counter() - start)
        return min(times)

    best = min(trunks, key=lambda r: best_of_3(trunks[r]))
    known[key] = best
    with contextlib.suppress(OSError):  # a read-only cache: measured again next time
        record.write_text(json.dumps(known, indent=1))
    return trunks[best]


def make_trunk(name: str, net: AttentionResNet50, size: int, cache_key: str) -> Trunk:
    """The trunk for backend ``name`` (see :data:`BACKENDS`).

    ``torch-fp16`` and ``torch-bf16`` run on CPU too (CI checks their parity there) but are only fast on a GPU.
    """
    on_cpu = next(net.parameters()).device.type == "cpu"
    if name == "auto":
        return pick_cpu_runtime(net, size, cache_key) if on_cpu else TorchTrunk(net)
    if name == "torch":
        return TorchTrunk(net)
    if name == "torch-fp16":
        return TorchTrunk(net, dtype=torch.float16)
    if name == "torch-bf16":
        return TorchTrunk(net, dtype=torch.bfloat16)
    if name in (*CPU_RUNTIMES, INT8_RUNTIME):
        runtime = "openvino" if name == INT8_RUNTIME else name
        if not on_cpu:
            raise ValueError(f"the {name} backend runs on CPU; use --backend torch with a GPU")
        if not installed(runtime):
            raise ValueError(f"{runtime} is not installed: pip install {runtime}, or use --backend torch")
        if name == INT8_RUNTIME and not parity_passed(cache_key, size):
            log.warning("the int8 trunk for checkpoint %s has no passing parity file: served as asked, but its "
                        "verdicts may differ from float32 (see `steelsight quantize`)", cache_key[:16])
        try:
            return _cpu_runtime(name, net, size, cache_key)
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from exc
        except Exception as exc:  # OpenVINO's and safetensors' own errors, e.g. on a truncated file
            if name != INT8_RUNTIME:
                raise
            raise ValueError(f"the int8 trunk for checkpoint {cache_key[:16]} could not be loaded ({exc}); if its "
                             "files are damaged, run `steelsight quantize` for it again") from exc
    raise ValueError(f"unknown backend {name!r}; choose {', '.join(BACKEND_NAMES)}")
