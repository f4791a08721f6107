"""Trunk backends: the same ResNet-50 trunk run by PyTorch, ONNX Runtime or OpenVINO.

Every backend returns the trunk's feature map and layer3's texture statistics
(the OOD score's second part, ood.py).

The trunk is ~99% of the compute. Attention, pooling, head and the Grad-CAM
backward stay in PyTorch (see cam.py: the trunk runs once without autograd),
so any backend that turns a gray batch into the trunk's feature map serves
both ``predict`` and ``explain``. ``tests/test_backends.py`` proves they agree.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import stat
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .network import AttentionResNet50
from .ood import TEXTURE_LAYER, texture_statistics

BACKENDS = ("torch", "torch-fp16", "onnxruntime", "openvino")
CPU_RUNTIMES = ("onnxruntime", "openvino")  # ``auto`` on CPU times those installed and keeps the faster
log = logging.getLogger("steelsight.model")
ONNX_LAYOUT = 2  # bump when the exported graph's outputs change: v2 added layer3 texture statistics


class TrunkInput(nn.Module):
    """Gray batch -> trunk feature map and layer3 texture statistics: the part a backend runs."""

    def __init__(self, net: AttentionResNet50):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.trunk_outputs(x)


class TorchTrunk:
    """PyTorch without autograd: BatchNorm folded into the convs, channels-last activations.

    Measured 1.38x eager at batch 8 on CPU with identical labels (bench/results/history-0.1.md).
    ``dtype=torch.float16`` is the GPU's tensor-core path (``torch-fp16``): weights and
    activations in half precision, features handed back in float32 so attention, head,
    Grad-CAM and the OOD score stay in float32.
    """

    name = "torch"

    def __init__(self, net: AttentionResNet50, dtype: torch.dtype = torch.float32):
        from torch.fx.experimental.optimization import fuse

        # fuse() works on a copy; the adapter stays outside the traced graph (data-dependent branch),
        # and the trunk is fused in two parts so that layer3's output can be tapped for the OOD score
        trunk = net.trunk.eval()
        self.to_layer3 = nn.Sequential(net.input_adapter, fuse(trunk[: TEXTURE_LAYER + 1])).eval()
        self.layer4 = fuse(trunk[TEXTURE_LAYER + 1 :]).eval()
        # folding happens in float32 first, so half precision rounds the folded weights once
        for part in (self.to_layer3, self.layer4):
            part.to(dtype=dtype, memory_format=torch.channels_last)
        self.dtype = dtype

    @torch.no_grad()  # not inference_mode: explain() turns the output into an autograd leaf
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature map and layer3 texture statistics, both float32."""
        layer3 = self.to_layer3(x.to(self.dtype).contiguous(memory_format=torch.channels_last))
        feats = self.layer4(layer3)
        return feats.float().contiguous(), texture_statistics(layer3.float())


def export_onnx(net: AttentionResNet50, path: Path, size: int) -> Path:
    """Export the trunk with dynamic batch and spatial size (legacy exporter: no extra dependencies)."""
    example = torch.zeros(2, 1, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the gray-input branch is traced as taken
        torch.onnx.export(
            TrunkInput(net).eval(), (example,), str(path), input_names=["gray"],
            output_names=["features", "texture"],
            dynamic_axes={"gray": {0: "batch", 2: "height", 3: "width"}, "features": {0: "batch", 2: "h", 3: "w"},
                          "texture": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
    return path


class UntrustedCacheDir(OSError):
    """A cache folder that someone else could have written model files into."""


def private_dir(path: Path) -> Path:
    """``path`` as a folder only this user can write, created 0700 when missing.

    The ONNX files in it are loaded and run, so a folder that is a symlink, belongs to
    another user or is writable by group or others is refused, never reused.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UntrustedCacheDir(f"{path} is not a plain folder")
    if info.st_uid != os.getuid():
        raise UntrustedCacheDir(f"{path} belongs to uid {info.st_uid}, not to this user ({os.getuid()})")
    if info.st_mode & 0o022:
        raise UntrustedCacheDir(f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{path} is not writable")
    return path


@functools.lru_cache(maxsize=1)
def _process_private_dir() -> Path:
    """Last resort: a fresh, unpredictable folder for this process (the export is redone next start)."""
    return Path(tempfile.mkdtemp(prefix="steelsight-onnx-"))


def _cache_dir() -> Path:
    """$STEELSIGHT_CACHE/onnx, else a private temp folder (a container's read-only home); never a shared one."""
    root = Path(os.environ.get("STEELSIGHT_CACHE", Path.home() / ".cache" / "steelsight")) / "onnx"
    fallback = Path(tempfile.gettempdir()) / f"steelsight-onnx-{os.getuid()}"
    for candidate in (root, fallback):
        try:
            return private_dir(candidate)
        except OSError as exc:
            log.warning("ONNX cache %s not used: %s", candidate, exc)
    return _process_private_dir()


def cached_onnx(net: AttentionResNet50, size: int, cache_key: str) -> Path:
    """The trunk exported once per checkpoint into the cache folder."""
    path = _cache_dir() / f"trunk-v{ONNX_LAYOUT}-{cache_key[:16]}-{size}.onnx"
    if not path.exists():
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            export_onnx(net, tmp_path, size)
            os.replace(tmp_path, path)  # atomic: concurrent workers never read a half-written model
        finally:
            tmp_path.unlink(missing_ok=True)
        # the same checkpoint's export in the layout before versioned names (~90 MB each); a worker
        # still running it keeps its open file, since unlinking does not close it
        (path.parent / f"trunk-{cache_key[:16]}-{size}.onnx").unlink(missing_ok=True)
    return path


class OnnxRuntimeTrunk:
    """An exported trunk run by ONNX Runtime's CPU provider."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # spinning pool threads steal the cores that torch (Grad-CAM) and other workers need next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, texture = self.session.run(None, {"gray": x.detach().cpu().numpy()})
        return torch.from_numpy(features), torch.from_numpy(texture)


class OpenVinoTrunk:
    """The exported trunk compiled by OpenVINO's CPU plugin, in float32.

    The plugin would run bfloat16 on CPUs with AVX512-BF16 or AMX (probabilities off by
    up to 0.14 in bench/model_throughput.py), hence the precision hint; it would also pin
    its threads to cores, which two workers on one machine must not both do.
    """

    name = "openvino"

    def __init__(self, path: Path, size: int, threads: int | None = None, precision: str = "f32"):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        model.reshape({"gray": [-1, 1, size, size]})  # batch stays dynamic; the side is the checkpoint's
        self.model = core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision, "ENABLE_CPU_PINNING": False})
        self.path = path

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model({"gray": x.detach().cpu().numpy()})
        return torch.from_numpy(outputs[0]), torch.from_numpy(outputs[1])


def installed(runtime: str) -> bool:
    try:
        __import__(runtime)
    except ImportError:
        return False
    return True


def _cpu_runtime(name: str, net: AttentionResNet50, size: int, cache_key: str):
    path = cached_onnx(net, size, cache_key)
    return OnnxRuntimeTrunk(path) if name == "onnxruntime" else OpenVinoTrunk(path, size)


def _loaded(runtime: str, net: AttentionResNet50, size: int, cache_key: str):
    """The runtime's trunk, or None (logged) when it cannot load it, e.g. a plugin without support for this CPU."""
    try:
        return _cpu_runtime(runtime, net, size, cache_key)
    except Exception as exc:
        log.warning("%s could not load the trunk, left out: %s", runtime, exc)
        return None


def _fastest_cpu_runtime(net: AttentionResNet50, size: int, cache_key: str):
    """The faster of the installed CPU runtimes on this machine, timed once and remembered.

    Which wins depends on the CPU (bench/results/history-0.1.md: ONNX Runtime at batch 1 on an AVX2
    machine, OpenVINO on an AVX-512 EPYC), so it is measured: a batch of 8 at the checkpoint's
    size, median of 5 interleaved calls each, about a second once per machine, thread
    count and checkpoint.
    """
    runtimes = [r for r in CPU_RUNTIMES if installed(r)]
    record = _cache_dir() / "fastest-runtime.json"
    key = f"{platform.processor() or platform.machine()}|{os.cpu_count()}|{torch.get_num_threads()}|{size}|" \
          f"{cache_key[:16]}"
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
    times: dict[str, list[float]] = {r: [] for r in trunks}
    for _ in range(6):
        for runtime, trunk in trunks.items():
            start = time.perf_counter()
            trunk(x)
            times[runtime].append(time.perf_counter() - start)
    best = min(trunks, key=lambda r: statistics.median(times[r][1:]))  # the first call warms up
    known[key] = best
    with contextlib.suppress(OSError):  # a read-only cache: measured again next time
        record.write_text(json.dumps(known, indent=1))
    return trunks[best]


def make_trunk(name: str, net: AttentionResNet50, size: int, cache_key: str):
    """``auto``: the faster of ONNX Runtime and OpenVINO on CPU (measured once per machine); PyTorch on GPU.

    ``torch-fp16`` runs on CPU too (CI checks its parity there) but is only fast on a GPU.
    """
    on_cpu = next(net.parameters()).device.type == "cpu"
    if name == "auto":
        return _fastest_cpu_runtime(net, size, cache_key) if on_cpu else TorchTrunk(net)
    if name == "torch":
        return TorchTrunk(net)
    if name == "torch-fp16":
        return TorchTrunk(net, dtype=torch.float16)
    if name in CPU_RUNTIMES:
        if not on_cpu:
            raise ValueError(f"the {name} backend runs on CPU; use --backend torch with a GPU")
        if not installed(name):
            raise ValueError(f"{name} is not installed: pip install {name}, or use --backend torch")
        return _cpu_runtime(name, net, size, cache_key)
    raise ValueError(f"unknown backend {name!r}; choose auto, {', '.join(BACKENDS)}")

