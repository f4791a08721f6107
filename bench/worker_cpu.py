"""Where a worker's CPU goes per frame: its model thread against everything else, from /proc.

    python -m bench.worker_cpu --frames 960
    python -m bench.worker_cpu --quick

One worker (1 thread) pinned to core 0 drains prefilled frames; Redis, the S3
server (SeaweedFS) and this script sit on core 1. Thread CPU times are read from
``/proc/<pid>/task/*/stat`` once the first results are in and again at the end, so
model loading is left out. The busiest thread is the model thread; the main thread
claims and books jobs (RQ, Redis); the rest are the S3 I/O pool (download, decode,
overlay encode, upload). The shares are the ratios to compare between runs. Linux only.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from bench.harness import SAMPLES, BenchParser, count_results, describe, emit, local_stack, start_worker, thread_cpu
from steelsight.clients import redis_client
from steelsight.devstack import free_port, wait_until
from steelsight.producer.service import Producer, replay, run_producer

NAME = "worker_cpu"


def main() -> None:
    parser = BenchParser(__doc__, quick={"frames": 96})
    parser.add_argument("--frames", type=int, default=720, help="prefilled frames (default: 720)")
    parser.add_argument("--batch", type=int, default=8, help="worker micro-batch size (default: 8)")
    parser.add_argument("--stream", action="store_true",
                        help="produce the frames while the worker runs (unpaced, from this process on core 1) "
                             "instead of before it starts")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="steelsight-workercpu-"))
    worker = None
    with local_stack(workdir, {1}, device="cpu", batch_size=args.batch, max_queue_depth=10 * args.frames
                     ) as (settings, _):
        try:
            conn = redis_client(settings)
            warmup = 5 * args.batch
            run_producer(Producer(settings, "warmup", "cam-1"),
                         replay(SAMPLES, loop=True, limit=warmup if args.stream else args.frames))
            worker = start_worker(settings.model_copy(update={"metrics_port": free_port()}), "cpu", 1, {0},
                                  workdir / "worker.log")
            wait_until(lambda: count_results(settings, conn) >= warmup, 600, "the first results")
            done0, t0, cpu0 = count_results(settings, conn), time.perf_counter(), thread_cpu(worker.pid)
            if args.stream:
                run_producer(Producer(settings, "stream", "cam-1"),
                             replay(SAMPLES, loop=True, limit=args.frames - warmup))
            wait_until(lambda: count_results(settings, conn) >= args.frames, 600, "all results", interval=0.02)
            done1, t1, cpu1 = count_results(settings, conn), time.perf_counter(), thread_cpu(worker.pid)
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(timeout=30)

    frames = done1 - done0
    spent = {tid: cpu1[tid] - cpu0.get(tid, 0.0) for tid in cpu1}
    model_tid = max(spent, key=spent.get)
    main_s = spent.get(worker.pid, 0.0)
    io_s = sum(spent.values()) - spent[model_tid] - main_s
    total = sum(spent.values())
    how = "produced while the worker ran" if args.stream else "prefilled"
    threads = {"model": spent[model_tid], "main (claim, book: RQ, Redis)": main_s,
               "I/O pool (S3, decode, overlay encode)": io_s}
    lines = [f"# {describe()}; {frames} frames ({how}), batch {args.batch}, in {t1 - t0:.2f} s "
             f"({frames / (t1 - t0):.1f} frames/s), worker (1 thread) on core 0, services on core 1",
             "| thread | CPU per frame (ms) | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {1e3 * sec / frames:.2f} | {sec / total:.2f} |" for name, sec in threads.items()]
    lines.append(f"| all | {1e3 * total / frames:.2f} (wall {1e3 * (t1 - t0) / frames:.2f}) | 1.00 |")
    print(f"# worker log in {workdir}", file=sys.stderr)
    emit(NAME, args, lines, {"frames": frames, "wall_s": t1 - t0, "stream": args.stream, "batch": args.batch,
                             "cpu_ms_per_frame": {name: 1e3 * sec / frames for name, sec in threads.items()},
                             "share": {name: sec / total for name, sec in threads.items()}})


if __name__ == "__main__":
    main()
