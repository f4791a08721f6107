"""Tiled wide frames against the same images one by one: model throughput, in one run.

    python -m bench.tile_throughput --batch 8 16 --repeats 5
    python -m bench.tile_throughput --quick

The bundled NEU samples (200 x 200) are laid side by side into 1600 x 200 strips of 8.
``explain_frames`` on the strips, tiled at NEU's resolution so each tile is exactly one
sample, is timed against ``explain`` on the samples themselves, with the same batch size,
in one process, interleaved. Both include the Grad-CAM and the overlay (per image for
``explain``, one stitched full-size overlay per strip for ``explain_frames``). Prints
tiles/s, images/s and their ratio; absolute rates on shared machines are noise. Also times
the tiling's own work outside the network (plan, crops, stitching, the full-size overlay)
against the whole ``explain_frames`` call: the part of the ratio's gap tiling itself causes.
"""

from __future__ import annotations

import numpy as np

from bench.harness import SAMPLES, BenchParser, describe, emit, interleaved_medians
from steelsight.contract import Settings
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.predictor import Predictor, overlay_heatmap
from steelsight.model.inference.tiling import TilingConfig, plan_frame, stitch
from steelsight.model.training.data import scan_folders

NAME = "tile_throughput"
PER_STRIP = 8


def tiling_work(strips: list[np.ndarray], tiling: TilingConfig, input_size: int) -> None:
    """Everything explain_frames does besides the network, with flat maps standing in for the CAMs."""
    for strip in strips:
        plan = plan_frame(strip, tiling, input_size)
        crops = plan.crops()
        flat = np.full((plan.tile_size, plan.tile_size), 0.5, np.float32)
        heat = stitch(plan, [None if w.background else flat for w in plan.windows])
        overlay_heatmap(strip, heat)
        del crops


def main() -> None:
    parser = BenchParser(__doc__, quick={"batch": [8], "repeats": 7, "strips": 2})
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--backend", default="auto", help="trunk runtime (default: auto)")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16], help="batch sizes (default: 8 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per path and batch (default: 5)")
    parser.add_argument("--strips", type=int, default=3,
                        help=f"strips of {PER_STRIP} samples each (default: 3, at most the samples allow)")
    args = parser.parse_args()
    samples = scan_folders(SAMPLES)
    strips_n = min(args.strips, len(samples) // PER_STRIP)
    images = [read_gray(s.path) for s in samples[: strips_n * PER_STRIP]]
    side = Settings().tile_size
    if any(img.shape != (side, side) for img in images):
        raise SystemExit(f"the samples must be {side} x {side}, one tile each")
    strips = [np.concatenate(images[i : i + PER_STRIP], axis=1) for i in range(0, len(images), PER_STRIP)]

    lines, figures = [], {}
    for batch in args.batch:
        predictor = Predictor.load(args.checkpoint, device=args.device, batch_size=batch, backend=args.backend)
        tiling = TilingConfig.from_settings(Settings())  # the product's default: tiles of NEU's own side
        tiles = sum(len(f.tiles) for f in predictor.predict_frames(strips, tiling))
        assert tiles == len(images), (tiles, len(images))
        times = interleaved_medians({
            "images": lambda p=predictor: p.explain(images),
            "strips": lambda p=predictor, t=tiling: p.explain_frames(strips, t),
            "tiling": lambda p=predictor, t=tiling: tiling_work(strips, t, p.input_size),
        }, args.repeats)
        images_per_s, tiles_per_s = len(images) / times["images"], tiles / times["strips"]
        figures[batch] = {"images_per_s": images_per_s, "tiles_per_s": tiles_per_s,
                          "ratio": tiles_per_s / images_per_s, "tiling_work_s": times["tiling"],
                          "tiling_share": times["tiling"] / times["strips"]}
        if not lines:
            lines = [f"# {describe()}; {predictor.input_size} px input, trunk {predictor.trunk.name}, "
                     f"{len(images)} images = {len(strips)} strips of {PER_STRIP}, median of {args.repeats} "
                     "calls interleaved",
                     "| batch | explain, images (img/s) | explain_frames, strips (tiles/s) | tiles/s ÷ img/s "
                     "| tiling's own work, share of explain_frames |",
                     "|---:|---:|---:|---:|---:|"]
        lines.append(f"| {batch} | {images_per_s:.1f} | {tiles_per_s:.1f} | **{tiles_per_s / images_per_s:.2f}** "
                     f"| {100 * times['tiling'] / times['strips']:.1f}% |")
    emit(NAME, args, lines, {"images": len(images), "strips": len(strips), "per_batch": figures})


if __name__ == "__main__":
    main()
