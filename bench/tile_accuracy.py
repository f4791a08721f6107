"""Strips of held-out NEU images read tile by tile against the same images alone: accuracy, in one run.

    python -m bench.tile_accuracy --data /path/to/neu --strips 45
    python -m bench.tile_accuracy --quick

``steelsight evaluate --make-strips`` lays the checkpoint's own val images side by side
(8 per strip, 1600 x 200 for NEU) with per-tile truth, in a temporary folder, and scores
them tiled with the product's default tiling. The same images are then predicted one by
one, so the table sets per-tile accuracy against single-image accuracy on identical
images, both counting an unknown verdict as wrong and with the unknown flag ignored,
plus the share of strips in which every defect class present was reported.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.harness import BenchParser, describe, emit
from steelsight.contract import Settings
from steelsight.model.evaluation.metrics import wilson_interval
from steelsight.model.evaluation.tiles import evaluate_tiles, make_strips
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.predictor import Predictor
from steelsight.model.inference.tiling import TilingConfig

NAME = "tile_accuracy"


def single_image_scores(predictor: Predictor, data: Path, strips_dir: Path) -> dict:
    """Every image of every strip predicted alone: correct with unknown as wrong, and ignoring the flag."""
    manifest = json.loads((strips_dir / "strips.json").read_text())
    sources = [s for strip in manifest["strips"] for s in strip["sources"]]
    files = {(path.parent.name, path.name): path for path in data.rglob("*") if path.is_file()}
    images = [read_gray(files[tuple(name.split("/", 1))]) for name in sources]
    truth = [name.split("/", 1)[0] for name in sources]
    preds = predictor.predict(images)
    strict = sum(p.label == t and not p.unknown for p, t in zip(preds, truth, strict=True))
    label = sum(p.label == t for p, t in zip(preds, truth, strict=True))
    return {"images": len(images), "accuracy": strict / len(images), "accuracy_ci95": wilson_interval(strict,
                                                                                                       len(images)),
            "accuracy_ignoring_unknown": label / len(images)}


def main() -> None:
    parser = BenchParser(__doc__, quick={"strips": 6})
    parser.add_argument("--data", type=Path, required=True,
                        help="the NEU folder the checkpoint was trained on: one sub-folder per class")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped checkpoint")
    parser.add_argument("--strips", type=int, default=45, help="strips of 8 val images (default: 45)")
    parser.add_argument("--backend", default="auto", help="trunk runtime (default: auto)")
    args = parser.parse_args()
    predictor = Predictor.load(args.checkpoint, device="cpu", batch_size=16, backend=args.backend)
    with tempfile.TemporaryDirectory() as tmp:
        strips_dir = Path(tmp) / "strips"
        make_strips(predictor, args.data, strips_dir, args.strips)
        tiling = TilingConfig.from_settings(Settings())
        tiled = evaluate_tiles(predictor, strips_dir, Path(tmp) / "eval", tiling)["tiles"]
        alone = single_image_scores(predictor, args.data, strips_dir)
    lines = [describe(), f"checkpoint {predictor.checkpoint.path.name} ({predictor.checkpoint.sha256[:12]}), "
                         f"{args.strips} strips, {tiled['tiles']} tiles", "",
             "| | tiled strips | same images alone |", "|---|---|---|",
             f"| accuracy, unknown counted wrong | {tiled['tile_accuracy']:.4f} "
             f"({tiled['tile_accuracy_ci95'][0]:.4f}–{tiled['tile_accuracy_ci95'][1]:.4f}) | "
             f"{alone['accuracy']:.4f} ({alone['accuracy_ci95'][0]:.4f}–{alone['accuracy_ci95'][1]:.4f}) |",
             f"| accuracy, unknown flag ignored | {tiled['tile_accuracy_ignoring_unknown']:.4f} | "
             f"{alone['accuracy_ignoring_unknown']:.4f} |",
             f"| strips with every class present found | {tiled['all_classes_found_rate']:.4f} "
             f"({tiled['all_classes_found_ci95'][0]:.4f}–{tiled['all_classes_found_ci95'][1]:.4f}) | |",
             f"| tiled ÷ alone, accuracy | {tiled['tile_accuracy'] / max(alone['accuracy'], 1e-9):.4f} | |"]
    emit(NAME, args, lines, {"tiled": {k: v for k, v in tiled.items() if k not in ("per_frame",)},
                             "alone": alone, "checkpoint_sha256": predictor.checkpoint.sha256})


if __name__ == "__main__":
    main()
