"""Worker execution modes side by side: in-process micro-batches vs RQ's fork per job.

Starts redis-server and an S3 server on loopback, enqueues the same frames for
each mode, runs one burst worker per mode and reports steady-state frames per
second (first result to last result, so model loading is excluded) and the
ratio to fork-per-job, all measured in this one run.

    .venv/bin/python bench/worker_modes.py --frames 48
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch

from steelsight.clients import redis_client
from steelsight.contract import Settings
from steelsight.devstack import free_port, redis_server, s3_server
from steelsight.producer.service import Producer, replay

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"
MODES = {"fork": ("fork", 1), "batch-1": ("batch", 1), "batch-8": ("batch", 8)}


def run_mode(base: Settings, mode: str, frames: int, workdir: Path) -> float:
    execution, batch = MODES[mode]
    settings = base.model_copy(update={"queue_name": f"bench-{mode}", "key_prefix": f"bench-{mode}",
                                       "worker_execution": execution, "batch_size": batch,
                                       "metrics_port": free_port()})
    producer = Producer(settings, "bench", mode.replace("-", ""))
    for item in replay(SAMPLES, loop=True, limit=frames):
        producer.send_file(item)
    env = dict(os.environ) | settings.to_env()
    with open(workdir / f"{mode}.log", "wb") as log:
        subprocess.run([sys.executable, "-m", "steelsight.cli", "worker", "--burst"], env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=True)
    conn = redis_client(settings)
    finished = sorted(datetime.fromisoformat(json.loads(conn.get(k))["finished_at"])
                      for k in conn.keys(f"{settings.key_prefix}:result:*"))
    assert len(finished) == frames, f"{mode}: {len(finished)} of {frames} results"
    return (frames - 1) / (finished[-1] - finished[0]).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="steelsight-bench-"))
    redis, s3 = redis_server(workdir).start(), s3_server(workdir).start()
    try:
        base = Settings(redis_url=f"redis://127.0.0.1:{redis.port}/0", s3_endpoint=f"127.0.0.1:{s3.port}",
                        s3_access_key="bench", s3_secret_key="bench", device="cpu", checkpoint=args.checkpoint)
        rates = {mode: run_mode(base, mode, args.frames, workdir) for mode in MODES}
    finally:
        redis.stop()
        s3.stop()
    print(f"# worker modes, {args.frames} frames each, explained (predict + Grad-CAM + overlay upload)")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print("| mode | frames/s | vs fork |")
    print("|---|---:|---:|")
    for mode, rate in rates.items():
        print(f"| {mode} | {rate:.2f} | {rate / rates['fork']:.2f}x |")


if __name__ == "__main__":
    main()
