"""Worker execution modes side by side: in-process micro-batches vs RQ's fork per job.

Starts redis-server and an S3 server on loopback, enqueues the same frames for
each mode, runs one burst worker per mode and reports steady-state frames per
second (from the end of the first batch to the last result, so model loading is
excluded) and the ratio to batch size 1, all measured in this one run. The fork mode
(bench/fork_worker.py) gets a short job timeout, so a hung horse shows up as
failed jobs instead of stalling the run.

    .venv/bin/python bench/worker_modes.py --frames 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from pipeline_throughput import rate_after_first_batch

from steelsight.clients import redis_client
from steelsight.contract import Settings
from steelsight.devstack import free_port, redis_server, s3_server
from steelsight.producer.service import Producer, replay

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"
BENCH = Path(__file__).resolve().parent
MODES = {  # name -> (command, batch size)
    "fork per job": ([sys.executable, str(BENCH / "fork_worker.py")], 1),
    "in-process, batch 1": ([sys.executable, "-m", "steelsight.cli", "worker", "--burst"], 1),
    "in-process, batch 8": ([sys.executable, "-m", "steelsight.cli", "worker", "--burst"], 8),
}


def run_mode(base: Settings, index: int, mode: str, frames: int, workdir: Path) -> str:
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
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=150)
    conn = redis_client(settings)
    finished = sorted(datetime.fromisoformat(json.loads(conn.get(k))["finished_at"])
                      for k in conn.keys(f"{settings.key_prefix}:result:*"))
    if len(finished) < frames:
        return f"{len(finished)} of {frames} results in {time.monotonic() - started:.0f}s (see mode{index}.log)"
    return f"{rate_after_first_batch(finished, batch):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="steelsight-bench-"))
    redis, s3 = redis_server(workdir).start(), s3_server(workdir).start()
    try:
        base = Settings(redis_url=f"redis://127.0.0.1:{redis.port}/0", s3_endpoint=f"127.0.0.1:{s3.port}",
                        s3_access_key=s3.credentials.access_key, s3_secret_key=s3.credentials.secret_key,
                        device="cpu", checkpoint=args.checkpoint)
        rates = {mode: run_mode(base, i, mode, args.frames, workdir) for i, mode in enumerate(MODES)}
    finally:
        redis.stop()
        s3.stop()
    print(f"# worker modes, {args.frames} frames each, explained (predict + Grad-CAM + overlay upload)")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    baseline = float(rates["in-process, batch 1"])
    print(f"# logs in {workdir}")
    print("| mode | frames/s | vs in-process batch 1 |")
    print("|---|---:|---:|")
    for mode, rate in rates.items():
        ratio = f"{float(rate) / baseline:.2f}x" if rate.replace(".", "").isdigit() else "-"
        print(f"| {mode} | {rate} | {ratio} |")


if __name__ == "__main__":
    main()
