"""int8 trunk against float32, side by side in one run: speed at batch 8 and what the verdicts keep.

    python -m bench.int8 --data NEU_DIR --ood-data OOD_DIR
    python -m bench.int8 --data NEU_DIR --quick
    ONEDNN_MAX_CPU_ISA=AVX2 python -m bench.int8 --data NEU_DIR    # as on a CPU without VNNI

Candidates: PyTorch eager fp32 (the baseline), OpenVINO fp32 and OpenVINO int8 (the model
``steelsight quantize`` wrote for the checkpoint; it is quantized here first when missing).
Timings are interleaved round-robin on random batches at the checkpoint's input size.
Parity on the checkpoint's val split of ``--data``: top-1 agreement with eager fp32, per-class
recall, unknown-verdict agreement on val plus its corrupted copies, and the Grad-CAM pointing
game on the NEU-DET boxes (the evaluation's own ``Localisation``); with ``--ood-data``, unknown
verdicts on other surfaces that no fit and no choice of the recipe saw. Records whether the CPU has
AVX-512 VNNI or AMX, where int8 convolutions are fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from bench.harness import BenchParser, describe, emit, interleaved_medians
from bench.model_throughput import BASELINE, eager
from steelsight.contract import IMAGE_EXTENSIONS, Settings
from steelsight.model.inference.backends.onnx_export import cached_onnx
from steelsight.model.inference.backends.openvino import OpenVinoTrunk
from steelsight.model.inference.backends.openvino_int8 import (
    OpenVinoInt8Trunk,
    int8_instructions,
    int8_model_path,
    parity_passed,
    read_parity,
)
from steelsight.model.inference.checkpoint import load_checkpoint
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.tiling import TilingConfig, TooManyTiles, plan_frame
from steelsight.model.training.quantize import (
    FP32_LADDER,
    compare,
    quantize,
    recall,
    reference,
    split_images,
    with_trunk,
)

NAME = "int8"
INT8 = "OpenVINO int8 (NNCF)"


def verdicts_on(folder: Path, fp32, int8) -> dict:
    """Per source (first sub-folder): how often int8's unknown verdict agrees with float32's, frame by frame
    as a worker tiles it, and what share of float32's unknowns int8 flags too."""
    tiling = TilingConfig.from_settings(Settings())
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    out = {}
    for source in sorted({p.relative_to(folder).parts[0] for p in paths if p.parent != folder}):
        plans = []
        for path in (p for p in paths if p.relative_to(folder).parts[0] == source):
            try:  # one decode at a time, and a frame over the tile limit left out, as a worker answers it
                plans.append(plan_frame(read_gray(path), tiling, fp32.input_size))
            except TooManyTiles:
                continue
        a, b = fp32.predict_plans(plans), int8.predict_plans(plans)
        flagged = [y.unknown for x, y in zip(a, b, strict=True) if x.unknown]
        out[source] = {"frames": len(plans),
                       "agreement": float(np.mean([x.unknown == y.unknown for x, y in zip(a, b, strict=True)])),
                       "fp32_flagged": float(np.mean([x.unknown for x in a])),
                       "int8_flagged": float(np.mean([y.unknown for y in b])),
                       "fp32_unknowns_also_flagged": float(np.mean(flagged)) if flagged else None}
    return out


def main() -> None:
    parser = BenchParser(__doc__, quick={"repeats": 4, "limit_per_class": 8})
    parser.add_argument("--data", type=Path, required=True, help="the NEU folder the checkpoint was trained on")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--batch", type=int, default=8, help="batch size for the timings (default: 8)")
    parser.add_argument("--repeats", type=int, default=12, help="timed calls per candidate (default: 12)")
    parser.add_argument("--limit-per-class", type=int, default=0,
                        help="val images per class for parity (default: 0 = the whole val split)")
    parser.add_argument("--ood-data", type=Path, default=None,
                        help="a folder of other surfaces (one sub-folder per source): unknown verdicts of int8 and "
                             "float32 compared on frames that neither scorer nor the quantization recipe saw")
    args = parser.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    size = int(ckpt.meta.input_size)
    net = ckpt.model.eval()
    subset = args.limit_per_class if args.quick else 0  # --quick: its own quantization on the subset
    if read_parity(ckpt.sha256, size, subset) is None:
        print("no int8 model for this checkpoint yet: quantizing (steelsight quantize; --quick: one try, on the "
              "--limit-per-class subset)")
        quantize(args.checkpoint, args.data, per_class=subset, max_attempts=1 if args.quick else len(FP32_LADDER))
    parity_file = read_parity(ckpt.sha256, size, subset)
    candidates = {BASELINE: eager(net),
                  "OpenVINO fp32": OpenVinoTrunk(cached_onnx(net, size, ckpt.sha256), size),
                  INT8: OpenVinoInt8Trunk(int8_model_path(ckpt.sha256, size, subset), size)}
    x = torch.rand(args.batch, 1, size, size)
    speed = interleaved_medians({name: lambda t=trunk: t(x) for name, trunk in candidates.items()}, args.repeats)

    train, val = split_images(ckpt, args.data, args.limit_per_class)
    annotations = args.data / "annotations" if (args.data / "annotations").is_dir() else None
    # both OOD scorers fitted on the same images: float32's refitted only where int8's was fitted on the subset
    fp32, ref = reference(ckpt, val, annotations, progress=True, refit_on=train if subset else None)
    int8 = with_trunk(fp32, candidates[INT8])
    figures = compare(ref, int8, list(ckpt.meta.classes), progress=True, full=True)
    unseen = verdicts_on(args.ood_data, fp32, int8) if args.ood_data else None
    # compare() holds int8 to the product's fp32 trunk; eager's own recall is the same network's
    fp32_recall = recall(ref.val, ref.labels, list(ckpt.meta.classes))

    threads, flags = torch.get_num_threads(), int8_instructions()
    base = speed[BASELINE]
    # ONEDNN_MAX_CPU_ISA=AVX2 (or AVX512_CORE) caps what oneDNN uses, in PyTorch and OpenVINO alike: int8
    # without VNNI on a CPU that has it
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    lines = [f"# {describe()}; int8 instructions: {', '.join(flags) or 'none'}"
             + (f"; capped at ONEDNN_MAX_CPU_ISA={isa_cap}" if isa_cap else ""),
             f"# batch {args.batch} at {size}px, {threads} threads; parity on {len(val)} val images "
             f"(+ {len(val) * len(ref.corrupted)} corrupted copies); int8 keeps in fp32: "
             f"{parity_file['fp32_layers'] if parity_file else '?'}; overflow fix "
             f"{(parity_file or {}).get('recipe', {}).get('overflow_fix', '?')}",
             "| candidate | img/s | × eager fp32 |", "|---|---|---|"]
    for name, seconds in speed.items():
        lines.append(f"| {name} | {args.batch / seconds:.1f} | {base / seconds:.2f} |")
    pg = figures.get("cam", {}).get("pointing_game")
    lines += ["", f"top-1 agreement int8 vs fp32: {100 * figures['top1_agreement']:.2f}%; worst recall drop "
                  f"{100 * figures['worst_recall_drop']:.2f} points; fp32 recall "
                  f"{', '.join(f'{c} {r:.3f}' for c, r in zip(ckpt.meta.classes, fp32_recall, strict=True))}"]
    if "unknown_agreement" in figures:
        lines.append(f"unknown-verdict agreement, val + corrupted: {100 * figures['unknown_agreement']['all']:.2f}%; "
                     f"OOD score less its threshold, |int8 - fp32| mean {figures['ood_score_abs_diff']['mean']:.3f}, "
                     f"p99 {figures['ood_score_abs_diff']['p99']:.3f}")
    if pg:
        lines.append(f"pointing game fp32 {pg['fp32']:.3f} -> int8 {pg['int8']:.3f} ({pg['images']} boxed images)")
    for source, cell in (unseen or {}).items():
        kept = cell["fp32_unknowns_also_flagged"]
        lines.append(f"{source} ({cell['frames']} frames, unseen): unknown verdicts agree on "
                     f"{100 * cell['agreement']:.1f}%; flagged fp32 {100 * cell['fp32_flagged']:.1f}%, int8 "
                     f"{100 * cell['int8_flagged']:.1f}%; of fp32's unknowns int8 flags "
                     + ("-" if kept is None else f"{100 * kept:.1f}%"))
    emit(NAME, args, lines, {
        "batch": args.batch, "size": size, "threads": threads, "int8_instructions": flags,
        "onednn_max_cpu_isa": isa_cap,
        "seconds_per_batch": speed, "speedup_over_eager": {n: base / t for n, t in speed.items()},
        "parity": figures, "parity_file": parity_file, "unseen_sources": unseen,
        # whether `auto` would serve this model on this CPU (with the cap, as oneDNN sees it)
        "served_by_auto_here": bool(not subset and parity_passed(ckpt.sha256, size)),
        "fp32_recall": dict(zip(ckpt.meta.classes, map(float, np.asarray(fp32_recall)), strict=True))})


if __name__ == "__main__":
    main()
