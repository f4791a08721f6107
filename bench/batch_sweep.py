"""Micro-batching sweep: frames/s at batch 1, 8, 32 and 64, label only and explained, on CPU or GPU.

    .venv/bin/python bench/batch_sweep.py                       # CUDA when present, else CPU
    .venv/bin/python bench/batch_sweep.py --device cuda --batch 1 8 32 64 128

Uses the product's Predictor (the same backend choice as the worker) on the bundled
samples at the checkpoint's input size, and reports where throughput saturates:
the first batch size whose frames/s is within 10% of the next one's.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from steelsight.model.imageio import read_gray
from steelsight.model.predictor import Predictor

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"


def frames_per_second(fn, images, repeats: int, device: torch.device) -> float:
    fn(images)  # warm-up: cuDNN autotuning, ONNX Runtime arenas
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times)


def saturation(batches: list[int], fps: list[float]) -> str:
    for (b, f), g in zip(zip(batches, fps, strict=True), fps[1:], strict=False):
        if g < 1.10 * f:
            return f"batch {b}"
    return f"not within batch {batches[-1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--backend", default="auto", help="trunk backend, as for the worker (default: auto)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    args = parser.parse_args()

    samples = [read_gray(p) for p in sorted(SAMPLES.rglob("*.bmp"))]
    rows = {"label only": [], "explained": []}
    predictor = None
    for batch in args.batch:
        predictor = Predictor.load(args.checkpoint, device=args.device, batch_size=batch, backend=args.backend)
        images = [samples[i % len(samples)] for i in range(batch)]
        rows["label only"].append(frames_per_second(predictor.predict, images, args.repeats, predictor.device))
        rows["explained"].append(frames_per_second(predictor.explain, images, args.repeats, predictor.device))
    device = predictor.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"# {name} ({device}), backend {type(predictor.trunk).__name__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, {predictor.input_size}px")
    print("| path | " + " | ".join(f"b{b} frames/s" for b in args.batch) + " | saturates at |")
    print("|---|" + "---:|" * len(args.batch) + "---|")
    for path, fps in rows.items():
        print(f"| {path} | " + " | ".join(f"{f:.1f}" for f in fps) + f" | {saturation(args.batch, fps)} |")


if __name__ == "__main__":
    main()
