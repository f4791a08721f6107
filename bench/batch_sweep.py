"""Micro-batching sweep: frames/s at batch 1, 8, 32 and 64, model only, label only and explained, on CPU or GPU.

    python -m bench.batch_sweep                       # CUDA when present, else CPU
    python -m bench.batch_sweep --device cuda --backend torch torch-fp16 --batch 1 8 32 64 128 --parity
    python -m bench.batch_sweep --quick

Rows, per trunk backend:
  model only   a pre-processed batch already on the device -> trunk, attention, pooling, head
               (what the accelerator does; no decode, resize or post-processing)
  label only   ``Predictor.predict``: resize on the CPU, copy, forward, softmax, OOD score, quality checks
  explained    ``Predictor.explain``: the same plus Grad-CAM and the overlay (not encoded to a file)
  explained on device, JPEG
               ``ondevice.DeviceExplainer``: what a worker with STEELSIGHT_EXPLAIN_ON_DEVICE runs, from
               decoded frames to JPEG bytes, every step on the device
"Saturates at" is the first batch size whose frames/s is within 10% of the next one's;
"largest ÷ first" is the frames/s at the largest batch over that at the first.

``--parity`` compares every backend with float32 eager PyTorch on the CPU on the bundled
samples and their five moderate corruptions (180 images): top-1 agreement, the largest
probability and OOD-score differences, and agreement of the ``unknown`` verdict.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.harness import SAMPLES, BenchParser, describe, emit, interleaved_medians
from steelsight.model.evaluation.corruptions import CORRUPTIONS, corrupt_all
from steelsight.model.inference.backends import BACKEND_NAMES
from steelsight.model.inference.checkpoint import load_checkpoint
from steelsight.model.inference.device import resolve_device
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.ondevice import DeviceExplainer
from steelsight.model.inference.predictor import Predictor

NAME = "batch_sweep"


def frames_per_second(fn, inputs, repeats: int, device: torch.device) -> float:
    """Frames/s of ``fn(inputs)``, the median of ``repeats`` calls after a warm-up (cuDNN algorithms, arenas)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return len(inputs) / interleaved_medians({"call": lambda: fn(inputs)}, repeats, sync)["call"]


def saturation(batches: list[int], fps: list[float]) -> str:
    for (b, f), g in zip(zip(batches, fps, strict=True), fps[1:], strict=False):
        if g < 1.10 * f:
            return f"batch {b}"
    return f"not within batch {batches[-1]}"


def model_only(predictor: Predictor):
    """Trunk + attention + pooling + head on a batch that is already on the device."""
    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            feats, _ = predictor.trunk(batch)
            feats = feats.to(predictor.device)
            return predictor.net.head(predictor.net.pooled(feats))
    return run


def sweep(checkpoint, device: str, backend: str, batches: list[int], repeats: int, samples) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {"model only": [], "label only": [], "explained": [],
                                    "explained on device, JPEG": []}
    for batch in batches:
        predictor = Predictor(checkpoint, resolve_device(device), batch_size=batch, backend=backend)
        images = [samples[i % len(samples)] for i in range(batch)]
        on_device = predictor.preprocess(images)
        rows["model only"].append(frames_per_second(model_only(predictor), on_device, repeats, predictor.device))
        rows["label only"].append(frames_per_second(predictor.predict, images, repeats, predictor.device))
        rows["explained"].append(frames_per_second(predictor.explain, images, repeats, predictor.device))
        # what a worker with STEELSIGHT_EXPLAIN_ON_DEVICE runs: decoded frames in, JPEG overlays out
        rows["explained on device, JPEG"].append(frames_per_second(DeviceExplainer(predictor).explain, images,
                                                                   repeats, predictor.device))
    return rows


def eager_cpu_predictor(path) -> Predictor:
    """The reference: the checkpoint's own float32 modules on the CPU, no folding, no other runtime."""
    checkpoint = load_checkpoint(path)  # a fresh copy, so the swept predictors' device moves do not touch it
    predictor = Predictor(checkpoint, torch.device("cpu"), batch_size=32, backend="torch")
    predictor.trunk = checkpoint.model.trunk_outputs
    return predictor


def parity_set(samples: list[np.ndarray]) -> list[np.ndarray]:
    images = list(samples)
    for name in CORRUPTIONS:
        images += corrupt_all(samples, name)
    return images


def parity(checkpoint, device: str, backend: str, images, reference) -> dict[str, float]:
    predictor = Predictor(checkpoint, resolve_device(device), batch_size=32, backend=backend)
    preds = predictor.predict(images)
    prob = np.array([list(p.probabilities.values()) for p in preds])
    ref_prob = np.array([list(p.probabilities.values()) for p in reference])
    return {
        "top1_agreement": float(np.mean(prob.argmax(1) == ref_prob.argmax(1))),
        "max_prob_diff": float(np.abs(prob - ref_prob).max()),
        "max_ood_diff": max(abs(p.ood_score - r.ood_score) for p, r in zip(preds, reference, strict=True)),
        "unknown_agreement": float(np.mean([p.unknown == r.unknown for p, r in zip(preds, reference, strict=True)])),
    }


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"{describe()}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                f"cudnn.benchmark={torch.backends.cudnn.benchmark}, "
                f"TF32 convolutions {'on' if torch.backends.cudnn.allow_tf32 else 'off'}")
    return describe()


def main() -> None:
    parser = BenchParser(__doc__, quick={"device": "cpu", "batch": [1, 8], "repeats": 2})
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--backend", nargs="+", default=["auto"], choices=BACKEND_NAMES, metavar="NAME",
                        help=f"trunk backends to sweep, as for the worker: {', '.join(BACKEND_NAMES)} (default: auto)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64], help="default: 1 8 32 64")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per cell (default: 5)")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its algorithms per batch shape (first call per shape is slower)")
    parser.add_argument("--parity", action="store_true", help="check each backend against CPU float32 eager")
    parser.add_argument("--parity-images", type=int, default=None, metavar="N",
                        help="check parity on the first N of the parity images only (default: all)")
    args = parser.parse_args()

    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    checkpoint = load_checkpoint(args.checkpoint)
    samples = [read_gray(p) for p in sorted(SAMPLES.rglob("*.bmp"))]
    device = resolve_device(args.device)
    figures = {"input_px": int(checkpoint.meta.input_size), "batches": args.batch, "sweep": {}, "parity": {}}
    for backend in args.backend:
        figures["sweep"][backend] = sweep(checkpoint, args.device, backend, args.batch, args.repeats, samples)
    figures["device"] = device_description(device)  # after the sweep: Predictor sets the CUDA numerics it runs with
    if args.parity:
        images = parity_set(samples)[: args.parity_images]
        reference = eager_cpu_predictor(args.checkpoint).predict(images)
        for backend in args.backend:
            figures["parity"][backend] = parity(checkpoint, args.device, backend, images, reference)

    lines = [f"# {figures['device']}; {figures['input_px']} px, median of {args.repeats}",
             "| backend | path | " + " | ".join(f"b{b} frames/s" for b in args.batch)
             + f" | b{args.batch[-1]} ÷ b{args.batch[0]} | saturates at |",
             "|---|---|" + "---:|" * len(args.batch) + "---:|---|"]
    for backend, rows in figures["sweep"].items():
        for path, fps in rows.items():
            cells = " | ".join(f"{f:.1f}" for f in fps)
            lines.append(f"| {backend} | {path} | {cells} | {fps[-1] / fps[0]:.2f}× | "
                         f"{saturation(args.batch, fps)} |")
    if figures["parity"]:
        lines += ["", f"parity against float32 eager on the CPU, {len(images)} images (samples + 5 corruptions)",
                  "| backend | top-1 agreement | max prob diff | max OOD-score diff | unknown agreement |",
                  "|---|---:|---:|---:|---:|"]
        for backend, p in figures["parity"].items():
            lines.append(f"| {backend} | {100 * p['top1_agreement']:.2f}% | {p['max_prob_diff']:.1e} | "
                         f"{p['max_ood_diff']:.1e} | {100 * p['unknown_agreement']:.2f}% |")
    emit(NAME, args, lines, figures)


if __name__ == "__main__":
    main()
