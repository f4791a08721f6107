"""Where a worker's CPU goes per frame: its model thread against everything else, from /proc.

    .venv/bin/python bench/worker_cpu.py --frames 720

One worker (1 thread) pinned to core 0 drains prefilled frames; Redis, the S3
stand-in and this script sit on core 1. Thread CPU times are read from
``/proc/<pid>/task/*/stat`` once the first results are in and again at the end, so
model loading is left out. The busiest thread is the model thread; the main thread
claims and books jobs (RQ, Redis); the rest are the S3 I/O pool (download, decode,
overlay encode, upload). Linux only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline_throughput import SAMPLES, count_results, pin_process, pinned, worker_env

from steelsight.clients import redis_client
from steelsight.contract import Settings
from steelsight.devstack import free_port, redis_server, s3_server, wait_until
from steelsight.producer.service import Producer, replay, run_producer


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) per thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=720, help="prefilled frames (default: 720)")
    parser.add_argument("--batch", type=int, default=8, help="worker micro-batch size (default: 8)")
    parser.add_argument("--stream", action="store_true",
                        help="produce the frames while the worker runs (unpaced, from this process on core 1) "
                             "instead of before it starts")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="steelsight-workercpu-"))
    redis, s3 = redis_server(workdir).start(), s3_server(workdir).start()
    for pid in (redis.proc.pid, s3.proc.pid, os.getpid()):
        pin_process(pid, {1})
    worker = None
    try:
        settings = Settings(redis_url=f"redis://127.0.0.1:{redis.port}/0", s3_endpoint=f"127.0.0.1:{s3.port}",
                            s3_access_key=s3.credentials.access_key, s3_secret_key=s3.credentials.secret_key,
                            device="cpu", batch_size=args.batch,
                            max_queue_depth=10 * args.frames)
        conn = redis_client(settings)
        warmup = 5 * args.batch
        run_producer(Producer(settings, "warmup", "cam-1"),
                     replay(SAMPLES, loop=True, limit=warmup if args.stream else args.frames))
        env = worker_env(settings.model_copy(update={"metrics_port": free_port()}), 1)
        worker = subprocess.Popen([sys.executable, "-m", "steelsight.cli", "worker", "--name", "cpu"], env=env,
                                  stdout=open(workdir / "worker.log", "wb"),  # noqa: SIM115
                                  stderr=subprocess.STDOUT, preexec_fn=pinned({0}))
        wait_until(lambda: count_results(settings, conn, "*") >= warmup, 600, "the first results")
        done0, t0, cpu0 = count_results(settings, conn, "*"), time.perf_counter(), thread_cpu(worker.pid)
        if args.stream:
            run_producer(Producer(settings, "stream", "cam-1"), replay(SAMPLES, loop=True, limit=args.frames - warmup))
        wait_until(lambda: count_results(settings, conn, "*") >= args.frames, 600, "all results", interval=0.02)
        done1, t1, cpu1 = count_results(settings, conn, "*"), time.perf_counter(), thread_cpu(worker.pid)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        redis.stop()
        s3.stop()

    frames = done1 - done0
    spent = {tid: cpu1[tid] - cpu0.get(tid, 0.0) for tid in cpu1}
    model_tid = max(spent, key=spent.get)
    main_s = spent.get(worker.pid, 0.0)
    io_s = sum(spent.values()) - spent[model_tid] - main_s
    total = sum(spent.values())
    how = "produced while the worker ran" if args.stream else "prefilled"
    print(f"# {frames} frames ({how}) in {t1 - t0:.2f} s ({frames / (t1 - t0):.1f} frames/s), worker on core 0; "
          f"logs in {workdir}")
    print("| thread | CPU per frame (ms) | share |\n|---|---:|---:|")
    for name, sec in (("model", spent[model_tid]), ("main (claim, book: RQ, Redis)", main_s),
                      ("I/O pool (S3, decode, overlay encode)", io_s)):
        print(f"| {name} | {1e3 * sec / frames:.2f} | {sec / total:.2f} |")
    print(f"| all | {1e3 * total / frames:.2f} (wall {1e3 * (t1 - t0) / frames:.2f}) | 1.00 |")


if __name__ == "__main__":
    main()
