"""Grad-CAM localisation per target layer and input size, on the NEU-DET boxes of the val split.

    python -m bench.cam_layers --data PATH/TO/neu       # ~10 minutes on 2 cores
    python -m bench.cam_layers --data PATH/TO/neu --quick

Uses the grad-cam package's plain usage (full backward) so any layer can be the
target; scores the strict pointing game, the 15 px-tolerant one and the share
of heatmap energy inside the boxes, exactly as ``steelsight evaluate`` does. The
first row is the product's target (the trunk's output at the checkpoint's input
size); the last column is each row's energy in the box over that row's.
An experiment behind MODEL_CARD.md, not a speed benchmark.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
from pytorch_grad_cam import GradCAM, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from bench.harness import BenchParser, describe, emit
from steelsight.model.evaluation.evaluate import Localisation, select_split
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.predictor import Predictor
from steelsight.model.inference.preprocess import eval_batch
from steelsight.model.training.data import annotation_for, box_mask, read_voc_boxes, scan_folders

NAME = "cam_layers"


def boxed_val(predictor: Predictor, data: Path) -> list[tuple]:
    items = []
    for sample in select_split(scan_folders(data, predictor.classes), predictor, "val"):
        xml = annotation_for(sample, data / "annotations")
        image = read_gray(sample.path)
        mask = box_mask(read_voc_boxes(xml), sample.class_name, image.shape) if xml else None
        if mask is not None:
            items.append((sample, image, mask))
    return items


def score(net, items, layers, size: int, cam_class=GradCAM) -> Localisation:
    """Heatmaps of each target layer, multiplied together when there are several."""
    cams = [cam_class(model=net, target_layers=[layer]) for layer in layers]
    total = Localisation()
    for start in range(0, len(items), 16):
        chunk = items[start : start + 16]
        x = eval_batch([image for _, image, _ in chunk], size)
        targets = [ClassifierOutputTarget(sample.label) for sample, _, _ in chunk]
        heat = np.prod([cam(input_tensor=x, targets=targets) for cam in cams], axis=0)
        for (_, image, mask), h in zip(chunk, heat, strict=True):
            h = cv2.resize(h, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
            total.add(h / max(float(h.max()), 1e-12), mask)
    return total


def main() -> None:
    parser = BenchParser(__doc__, quick={"limit": 6, "variants": 2})
    parser.add_argument("--data", type=Path, required=True,
                        help="NEU folder with images/ and annotations/ (the checkpoint's val split is rebuilt)")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--limit", type=int, default=None,
                        help="score only every k-th boxed val image so that about this many remain (default: all)")
    parser.add_argument("--variants", type=int, default=None,
                        help="score only the first N target layers and sizes of the table (default: all 8)")
    args = parser.parse_args()
    predictor = Predictor.load(args.checkpoint, device="cpu", backend="torch")
    net = predictor.net.float().requires_grad_(True)
    items = boxed_val(predictor, args.data)
    if args.limit and len(items) > args.limit:
        items = items[:: len(items) // args.limit][: args.limit]  # spread over the classes, which come in order
    layer4, layer3 = net.trunk[-1][-1], net.trunk[-2][-1]
    size = predictor.input_size
    variants = [
        (f"last bottleneck, {size} px (product)", [layer4], size, GradCAM),
        ("last bottleneck, 224 px", [layer4], 224, GradCAM),
        ("last bottleneck, 288 px", [layer4], 288, GradCAM),
        (f"end of layer3, {size} px", [layer3], size, GradCAM),
        (f"layer4 x layer3, {size} px", [layer4, layer3], size, GradCAM),
        ("layer4 x layer3, 224 px", [layer4, layer3], 224, GradCAM),
        (f"LayerCAM on layer3, {size} px", [layer3], size, LayerCAM),
        (f"attention module's output, {size} px", [net.attention], size, GradCAM),
    ][: args.variants]
    lines = [f"# {describe()}; {len(items)} val images with boxes of their own class",
             "| target layer, input | pointing game | 15 px | energy in box | energy ÷ product's |",
             "|---|---:|---:|---:|---:|"]
    scores = {}
    for name, layers, input_size, cam_class in variants:
        scores[name] = result = score(net, items, layers, input_size, cam_class).to_dict()
        first = next(iter(scores.values()))
        lines.append(f"| {name} | {result['pointing_game']:.1%} | {result['pointing_game_15px']:.1%} | "
                     f"{result['energy_in_box']:.1%} | {result['energy_in_box'] / first['energy_in_box']:.2f}× |")
        print(lines[-1], file=sys.stderr, flush=True)  # progress: a row takes a minute or more
    emit(NAME, args, lines, {"images": len(items), "scores": scores})


if __name__ == "__main__":
    main()
