"""Worker execution modes side by side: in-process micro-batches against RQ's fork per job.

    python -m bench.worker_modes --frames 48
    python -m bench.worker_modes --quick

Starts redis-server and an S3 server on loopback, enqueues the same frames for
each mode, runs one burst worker per mode and reports steady-state frames per
second (from the end of the first batch to the last result, so model loading is
excluded) and the ratio to batch size 1, all measured in this one run. The fork mode
(``python -m bench.fork_worker``) gets a short job timeout, so a hung horse shows up as
failed jobs instead of stalling the run; each mode is stopped after ``--timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import (
    ROOT,
    SAMPLES,
    BenchParser,
    describe,
    emit,
    finish_times,
    local_stack,
    rate_after_first_batch,
    results,
)
from steelsight.clients import redis_client
from steelsight.contract import Settings
from steelsight.devstack import free_port
from steelsight.producer.service import Producer, replay

NAME = "worker_modes"
MODES = {  # name -> (command, batch size)
    "fork per job": ([sys.executable, "-m", "bench.fork_worker"], 1),
    "in-process, batch 1": ([sys.executable, "-m", "steelsight.cli", "worker", "--burst"], 1),
    "in-process, batch 8": ([sys.executable, "-m", "steelsight.cli", "worker", "--burst"], 8),
}
BASELINE = "in-process, batch 1"


def run_mode(base: Settings, index: int, mode: str, frames: int, timeout: float, workdir: Path) -> dict:
    """Frames/s after the first batch, or how many results came before the mode was stopped."""
    command, batch = MODES[mode]
    settings = base.model_copy(update={"queue_name": f"bench-{index}", "key_prefix": f"bench-{index}",
                                       "batch_size": batch, "metrics_port": free_port(), "job_timeout_s": 20,
                                       "job_retries": 0})
    producer = Producer(settings, "bench", f"mode{index}")
    for item in replay(SAMPLES, loop=True, limit=frames):
        producer.send_file(item)
    env = dict(os.environ) | settings.to_env()
    started = time.monotonic()
    # a hung worker is stopped and reported, not waited for
    with open(workdir / f"mode{index}.log", "wb") as log, contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=timeout)
    finished = finish_times(results(settings, redis_client(settings)))
    if len(finished) < frames:
        return {"results": len(finished), "seconds": time.monotonic() - started, "fps": None}
    return {"results": len(finished), "seconds": time.monotonic() - started,
            "fps": rate_after_first_batch(finished, batch)}


def main() -> None:
    parser = BenchParser(__doc__, quick={"frames": 16, "timeout": 25})
    parser.add_argument("--frames", type=int, default=48, help="frames per mode (default: 48)")
    parser.add_argument("--timeout", type=float, default=150,
                        help="seconds after which a mode's worker is stopped (default: 150)")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="steelsight-bench-"))
    with local_stack(workdir, device="cpu", checkpoint=args.checkpoint) as (base, _):
        rates = {mode: run_mode(base, i, mode, args.frames, args.timeout, workdir) for i, mode in enumerate(MODES)}
    baseline = rates[BASELINE]["fps"]
    lines = [f"# {describe()}; {args.frames} frames per mode, explained (predict + Grad-CAM + overlay upload)",
             "| mode | frames/s | vs in-process batch 1 |", "|---|---:|---:|"]
    for mode, rate in rates.items():
        if rate["fps"] is None:
            lines.append(f"| {mode} | {rate['results']} of {args.frames} results in {rate['seconds']:.0f} s | – |")
        else:
            vs = f"{rate['fps'] / baseline:.2f}×" if baseline else "–"
            lines.append(f"| {mode} | {rate['fps']:.2f} | {vs} |")
    print(f"# logs in {workdir}", file=sys.stderr)
    emit(NAME, args, lines, {"frames": args.frames, "modes": rates})


if __name__ == "__main__":
    main()
