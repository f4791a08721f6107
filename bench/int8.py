"""int8 trunk against float32, side by side in one run: speed at batch 8 and what the verdicts keep.

    python -m bench.int8 --data NEU_DIR
    python -m bench.int8 --data NEU_DIR --quick
    ONEDNN_MAX_CPU_ISA=AVX2 python -m bench.int8 --data NEU_DIR    # as on a CPU without VNNI

Candidates: PyTorch eager fp32 (the baseline), OpenVINO fp32 and OpenVINO int8 (the model
``steelsight quantize`` wrote for the checkpoint; it is quantized here first when missing).
Timings are interleaved round-robin on random batches at the checkpoint's input size.
Parity on the checkpoint's val split of ``--data``: top-1 agreement with eager fp32, per-class
recall, unknown-verdict agreement on val plus its corrupted copies, and the Grad-CAM pointing
game on the NEU-DET boxes (the evaluation's own ``Localisation``). Records whether the CPU has
AVX-512 VNNI or AMX, where int8 convolutions are fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from bench.harness import BenchParser, describe, emit, interleaved_medians
from bench.model_throughput import BASELINE, eager
from steelsight.model.inference.backends.onnx_export import cached_onnx
from steelsight.model.inference.backends.openvino import OpenVinoTrunk
from steelsight.model.inference.backends.openvino_int8 import (
    OpenVinoInt8Trunk,
    int8_instructions,
    int8_model_path,
    read_parity,
)
from steelsight.model.inference.checkpoint import load_checkpoint
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


def main() -> None:
    parser = BenchParser(__doc__, quick={"repeats": 4, "limit_per_class": 8})
    parser.add_argument("--data", type=Path, required=True, help="the NEU folder the checkpoint was trained on")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--batch", type=int, default=8, help="batch size for the timings (default: 8)")
    parser.add_argument("--repeats", type=int, default=12, help="timed calls per candidate (default: 12)")
    parser.add_argument("--limit-per-class", type=int, default=0,
                        help="val images per class for parity (default: 0 = the whole val split)")
    args = parser.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    size = int(ckpt.meta.input_size)
    net = ckpt.model.eval()
    if read_parity(ckpt.sha256, size) is None:
        print("no int8 model for this checkpoint yet: quantizing (steelsight quantize; --quick: one try, on the "
              "--limit-per-class subset)")
        quantize(args.checkpoint, args.data, per_class=args.limit_per_class if args.quick else 0,
                 max_attempts=1 if args.quick else len(FP32_LADDER))
    parity_file = read_parity(ckpt.sha256, size)
    candidates = {BASELINE: eager(net),
                  "OpenVINO fp32": OpenVinoTrunk(cached_onnx(net, size, ckpt.sha256), size),
                  INT8: OpenVinoInt8Trunk(int8_model_path(ckpt.sha256, size), size)}
    x = torch.rand(args.batch, 1, size, size)
    speed = interleaved_medians({name: lambda t=trunk: t(x) for name, trunk in candidates.items()}, args.repeats)

    train, val = split_images(ckpt, args.data, args.limit_per_class)
    annotations = args.data / "annotations" if (args.data / "annotations").is_dir() else None
    fp32, ref = reference(ckpt, val, annotations, progress=True, refit_on=train if args.limit_per_class else None)
    figures = compare(ref, with_trunk(fp32, candidates[INT8]), list(ckpt.meta.classes), progress=True, full=True)
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
             f"{parity_file['fp32_layers'] if parity_file else '?'}",
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
    emit(NAME, args, lines, {
        "batch": args.batch, "size": size, "threads": threads, "int8_instructions": flags,
        "onednn_max_cpu_isa": isa_cap,
        "seconds_per_batch": speed, "speedup_over_eager": {n: base / t for n, t in speed.items()},
        "parity": figures, "parity_file": parity_file,
        "fp32_recall": dict(zip(ckpt.meta.classes, map(float, np.asarray(fp32_recall)), strict=True))})


if __name__ == "__main__":
    main()
