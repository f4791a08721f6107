"""Explained inference vs label only, and vs the grad-cam package's plain usage, in one run.

    python -m bench.explain_overhead --batch 1 8 --repeats 15
    python -m bench.explain_overhead --quick

Times, on the same images and threads: ``predict`` (label only), the product's
``explain`` (label + Grad-CAM + overlay, trunk run once without autograd) with
each overlay encoded as the worker does (``--overlay-format``, default the product's:
JPEG), and the package's plain usage (full backward through the trunk) + the same
overlay and encoding.
Prints medians and the ratios; absolute times on shared machines are noise.
"""

from __future__ import annotations

import cv2
import numpy as np
from pytorch_grad_cam import GradCAM

from bench.harness import SAMPLES, BenchParser, describe, emit, interleaved_medians
from steelsight.contract import Settings
from steelsight.model.inference.checkpoint import load_checkpoint
from steelsight.model.inference.imageio import encode_overlay, read_gray
from steelsight.model.inference.predictor import Predictor, overlay_heatmap
from steelsight.model.training.data import scan_folders

NAME = "explain_overhead"


def plain_explain(predictor: Predictor, plain: GradCAM, images: list[np.ndarray], fmt: str):
    heatmaps = plain(input_tensor=predictor.preprocess(images), targets=None)
    return [encode_overlay(overlay_heatmap(img, cv2.resize(heat, (img.shape[1], img.shape[0]))), fmt)
            for img, heat in zip(images, heatmaps, strict=True)]


def product_explain(predictor: Predictor, images: list[np.ndarray], fmt: str):
    return [encode_overlay(e.overlay, fmt) for e in predictor.explain(images)]


def main() -> None:
    parser = BenchParser(__doc__, quick={"batch": [1, 4], "repeats": 3})
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="default: 1 8")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per path and batch (default: 10)")
    parser.add_argument("--overlay-format", choices=["jpeg", "png"], default=Settings().overlay_format,
                        help="how each overlay is encoded (default: the product's, STEELSIGHT_OVERLAY_FORMAT)")
    args = parser.parse_args()
    predictor = Predictor.load(args.checkpoint, device="cpu", batch_size=max(args.batch))
    plain_net = load_checkpoint(args.checkpoint).model  # a separate copy whose parameters require grad
    plain = GradCAM(model=plain_net, target_layers=[plain_net.last_block])
    images = [read_gray(s.path) for s in scan_folders(SAMPLES)]
    enc = args.overlay_format.upper()
    lines = [f"# {describe()}; {predictor.input_size} px input, trunk {predictor.trunk.name}, median of "
             f"{args.repeats} calls interleaved",
             f"| batch | label only (ms/img) | explain + {enc} (ms/img) | plain grad-cam + {enc} (ms/img) "
             "| explain / label | plain / label |",
             "|---:|---:|---:|---:|---:|---:|"]
    per_image = {}
    for batch in args.batch:
        chunk = images[:batch]
        times = interleaved_medians({
            "label": lambda c=chunk: predictor.predict(c),
            "explain": lambda c=chunk: product_explain(predictor, c, args.overlay_format),
            "plain": lambda c=chunk: plain_explain(predictor, plain, c, args.overlay_format)}, args.repeats)
        label, cheap, full = (times[k] / batch for k in ("label", "explain", "plain"))
        per_image[batch] = {"label_s": label, "explain_s": cheap, "plain_s": full}
        lines.append(f"| {batch} | {1000 * label:.1f} | {1000 * cheap:.1f} | {1000 * full:.1f} | "
                     f"**{cheap / label:.2f}×** | {full / label:.2f}× |")
    emit(NAME, args, lines, {"input_px": predictor.input_size, "trunk": predictor.trunk.name,
                             "overlay_format": args.overlay_format, "per_image": per_image,
                             "explain_over_label": {b: v["explain_s"] / v["label_s"] for b, v in per_image.items()}})


if __name__ == "__main__":
    main()
