"""Model throughput per CPU core: eager PyTorch against faster runtimes, with accuracy parity, in one run.

    python -m bench.model_throughput --size 200 --batch 1 8
    python -m bench.model_throughput --quick

Every candidate runs the trunk (input adapter + ResNet-50, ~99% of the FLOPs);
attention, pooling and head run in PyTorch afterwards for all of them, as in the
product. Timings are interleaved round-robin so drift hits every candidate alike.
Parity: top-1 agreement with eager and the largest probability difference on the
checkpoint's val split of ``--data`` (or the bundled samples without it), at the
checkpoint's input size. The compute bound is the model's FLOPs over the sgemm
rate measured in this run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.harness import SAMPLES, BenchParser, describe, emit, interleaved_medians
from steelsight.model.inference.backends.base import TrunkInput
from steelsight.model.inference.backends.factory import make_trunk
from steelsight.model.inference.backends.onnx_export import export_onnx
from steelsight.model.inference.backends.onnxruntime import OnnxRuntimeTrunk
from steelsight.model.inference.backends.openvino import OpenVinoTrunk
from steelsight.model.inference.backends.pytorch import TorchTrunk
from steelsight.model.inference.checkpoint import load_checkpoint
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.preprocess import eval_batch
from steelsight.model.training.data import scan_folders, training_split

NAME = "model_throughput"
BASELINE = "eager fp32 (baseline)"
Trunk = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# candidates: each returns a callable gray batch -> (trunk features, layer3 texture statistics) ---
def eager(net) -> Trunk:
    module = TrunkInput(net).eval()

    def run(x):
        with torch.no_grad():
            return module(x)
    return run


def folded_channels_last(net) -> Trunk:
    """inference_mode + the product's PyTorch trunk (BN folded into convs, channels_last)."""
    trunk = TorchTrunk(net)

    def run(x):
        with torch.inference_mode():
            return trunk(x)
    return run


def compiled(net) -> Trunk:
    trunk = TorchTrunk(net)
    trunk.to_layer3 = torch.compile(trunk.to_layer3, dynamic=False)
    trunk.layer4 = torch.compile(trunk.layer4, dynamic=False)

    def run(x):
        with torch.inference_mode():
            return trunk(x)
    return run


def onnxruntime_fp32(net, onnx_path: Path) -> Trunk:
    return OnnxRuntimeTrunk(onnx_path)


def onnxruntime_int8(net, onnx_path: Path, calibration: torch.Tensor) -> Trunk:
    """Static QDQ quantization, per-channel weights, calibrated on training images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"gray": calibration[i : i + 8].numpy()} for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    prepared, quantized = onnx_path.with_suffix(".pre.onnx"), onnx_path.with_suffix(".int8.onnx")
    quant_pre_process(str(onnx_path), str(prepared))
    quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnxruntime_fp32(net, quantized)


def openvino(net, onnx_path: Path, precision: str = "f32") -> Trunk:
    """The product's OpenVINO trunk, compiled once per input side (timings and parity use different sides)."""
    trunks: dict[int, OpenVinoTrunk] = {}

    def run(x):
        side = x.shape[-1]
        if side not in trunks:
            trunks[side] = OpenVinoTrunk(onnx_path, side, precision=precision)
        return trunks[side](x)
    return run


# measurement -------------------------------------------------------------------------------------
def parity_images(ckpt, data: Path | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(val batch, calibration batch from train, description)."""
    size = int(ckpt.meta.input_size)
    training = ckpt.meta.training
    if data is not None and "seed" in training:
        train, val = training_split(scan_folders(data, ckpt.meta.classes), training)
        calib = eval_batch([read_gray(s.path) for s in train[::36]], size)
        return eval_batch([read_gray(s.path) for s in val], size), calib, f"NEU val split ({len(val)} images)"
    samples = scan_folders(SAMPLES, ckpt.meta.classes)
    images = eval_batch([read_gray(s.path) for s in samples], size)
    return images, images, f"bundled samples ({len(samples)} images; no --data given)"


def probabilities(net, trunk: Trunk, images: torch.Tensor, temperature: float) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 16):
            features, _ = trunk(images[i : i + 16])
            logits = net.classify(features.float())
            out.append(torch.softmax(logits / temperature, dim=1).numpy())
    return np.concatenate(out)


def sgemm_gflops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def model_gflops(net, size: int) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, 1, size, size))
    return counter.get_total_flops() / 1e9


def interleaved_times(candidates: dict[str, Trunk], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per call; the warm-up call also triggers shape-specialised compilation."""
    return interleaved_medians({name: lambda t=trunk: t(x) for name, trunk in candidates.items()}, repeats)


def build_candidates(net, onnx_path: Path, calibration: torch.Tensor, skip: set[str]) -> dict[str, Trunk]:
    builders = {
        BASELINE: lambda: eager(net),
        "inference_mode + channels_last + BN fold": lambda: folded_channels_last(net),
        "torch.compile (inductor)": lambda: compiled(net),
        "ONNX Runtime fp32": lambda: onnxruntime_fp32(net, onnx_path),
        "ONNX Runtime int8 (static QDQ)": lambda: onnxruntime_int8(net, onnx_path, calibration),
        "OpenVINO fp32": lambda: openvino(net, onnx_path),
        # the plugin's own default on CPUs with AVX512-BF16 or AMX; the product asks for f32
        "OpenVINO bf16": lambda: openvino(net, onnx_path, "bf16"),
    }
    candidates = {}
    for name, build in builders.items():
        if any(s in name.lower() for s in skip):
            continue
        start = time.perf_counter()
        try:
            candidates[name] = build()
        except Exception as exc:  # a runtime that is missing or fails is reported, not fatal
            print(f"  {name}: unavailable ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        print(f"  built {name} in {time.perf_counter() - start:.1f}s")
    return candidates


def main() -> None:
    parser = BenchParser(__doc__, quick={"batch": [1], "repeats": 3, "skip": ["compile", "int8", "bf16"]})
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--data", type=Path, default=None,
                        help="NEU folder for parity on the checkpoint's val split (default: the bundled samples)")
    parser.add_argument("--size", type=int, default=200, help="input side for the timings (default: 200)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="default: 1 8")
    parser.add_argument("--repeats", type=int, default=12, help="timed calls per candidate and batch (default: 12)")
    parser.add_argument("--skip", nargs="*", default=[], help="skip candidates whose name contains these words")
    args = parser.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    net = ckpt.model.eval()
    threads = torch.get_num_threads()
    val, calibration, described = parity_images(ckpt, args.data)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(net, Path(tmp) / "trunk.onnx", int(ckpt.meta.input_size))
        print(f"building candidates ({threads} threads)")
        candidates = build_candidates(net, onnx_path, calibration, {s.lower() for s in args.skip})
        temperature = float(ckpt.meta.temperature or 1.0)
        reference = probabilities(net, candidates[BASELINE], val, temperature)
        parity = {}
        for name, trunk in candidates.items():
            probs = probabilities(net, trunk, val, temperature)
            parity[name] = (float(np.mean(probs.argmax(1) == reference.argmax(1))),
                            float(np.abs(probs - reference).max()))
        speed = {b: interleaved_times(candidates, torch.rand(b, 1, args.size, args.size),
                                      args.repeats if b > 1 else args.repeats * 2) for b in args.batch}
    # what `--backend auto` runs here: the faster CPU runtime, timed at the checkpoint's size on first use
    chosen = make_trunk("auto", net, int(ckpt.meta.input_size), ckpt.sha256).name

    gflops, sgemm = model_gflops(net, args.size), sgemm_gflops()
    bound = sgemm / gflops
    header = "| candidate | top-1 agreement | max prob diff |" + "".join(
        f" b{b} img/s/core | b{b} × eager | b{b} % of bound |" for b in args.batch)
    lines = [f"# {describe()}; {_versions()}",
             f"# model: {gflops:.2f} GFLOP per {args.size}px image; sgemm {sgemm:.0f} GFLOP/s in this run "
             f"-> compute bound {bound:.1f} img/s ({bound / threads:.1f} per core)",
             f"# parity on {described} at {ckpt.meta.input_size}px, against eager; "
             f"product default here (--backend auto): {chosen}",
             header, "|" + "---|" * (header.count("|") - 1)]
    for name in candidates:
        agree, diff = parity[name]
        cells = "".join(
            f" {b / speed[b][name] / threads:.2f} | {speed[b][BASELINE] / speed[b][name]:.2f} | "
            f"{100 * b / speed[b][name] / bound:.0f}% |" for b in args.batch)
        lines.append(f"| {name} | {100 * agree:.2f}% | {diff:.1e} |{cells}")
    emit(NAME, args, lines, {
        "size": args.size, "threads": threads, "gflops_per_image": gflops, "sgemm_gflops": sgemm,
        "parity_on": described, "auto_backend": chosen,
        "parity": {name: {"top1_agreement": a, "max_prob_diff": d} for name, (a, d) in parity.items()},
        "seconds_per_batch": speed,
        "speedup_over_eager": {b: {n: t[BASELINE] / t[n] for n in t} for b, t in speed.items()}})


def _versions() -> str:
    found = []
    for module in ("onnxruntime", "openvino"):
        try:
            found.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            found.append(f"{module} not installed")
    return ", ".join(found)


if __name__ == "__main__":
    main()
