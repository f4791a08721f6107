"""Explained inference vs label only, and vs the grad-cam package's plain usage, in one run.

    .venv/bin/python bench/explain_overhead.py --batch 1 8 --repeats 10

Times, on the same images and threads: ``predict`` (label only), the product's
``explain`` (label + Grad-CAM + overlay, trunk run once without autograd) with
each overlay encoded as the worker does (``--overlay-format``, default the product's:
JPEG), and the package's plain usage (full backward through the trunk) + the same
overlay and encoding.
Prints medians and the ratios; absolute times on shared machines are noise.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM

from steelsight.contract import Settings
from steelsight.model.inference.checkpoint import load_checkpoint
from steelsight.model.inference.imageio import encode_overlay, read_gray
from steelsight.model.inference.predictor import Predictor, overlay_heatmap
from steelsight.model.training.data import scan_folders

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"


def median_times(fns: list, repeats: int) -> list[float]:
    """Median seconds per call, the calls interleaved round-robin so machine drift hits all alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def plain_explain(predictor: Predictor, plain: GradCAM, images: list[np.ndarray], fmt: str):
    heatmaps = plain(input_tensor=predictor.preprocess(images), targets=None)
    return [encode_overlay(overlay_heatmap(img, cv2.resize(heat, (img.shape[1], img.shape[0]))), fmt)
            for img, heat in zip(images, heatmaps, strict=True)]


def product_explain(predictor: Predictor, images: list[np.ndarray], fmt: str):
    return [encode_overlay(e.overlay, fmt) for e in predictor.explain(images)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--overlay-format", choices=["jpeg", "png"], default=Settings().overlay_format,
                        help="how each overlay is encoded (default: the product's, STEELSIGHT_OVERLAY_FORMAT)")
    args = parser.parse_args()
    predictor = Predictor.load(args.checkpoint, device="cpu", batch_size=max(args.batch))
    plain_net = load_checkpoint(args.checkpoint).model  # a separate copy whose parameters require grad
    plain = GradCAM(model=plain_net, target_layers=[plain_net.last_block])
    images = [read_gray(s.path) for s in scan_folders(SAMPLES)]
    print(f"# explain overhead, {predictor.input_size}px input, {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    enc = args.overlay_format.upper()
    print(f"| batch | label only (ms/img) | explain + {enc} (ms/img) | plain grad-cam + {enc} (ms/img) "
          "| explain / label | plain / label |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in args.batch:
        chunk = images[:batch]
        label, cheap, full = (t / batch for t in median_times(
            [lambda c=chunk: predictor.predict(c), lambda c=chunk: product_explain(predictor, c, args.overlay_format),
             lambda c=chunk: plain_explain(predictor, plain, c, args.overlay_format)], args.repeats))
        print(f"| {batch} | {1000 * label:.1f} | {1000 * cheap:.1f} | {1000 * full:.1f} | {cheap / label:.2f}x | "
              f"{full / label:.2f}x |")


if __name__ == "__main__":
    main()
