"""RQ bookkeeping per frame job: Redis commands and worker CPU, RQ's own path against the batch booking.

    .venv/bin/python bench/rq_overhead.py --jobs 400

A real redis-server (and the S3 stand-in the producer needs) on loopback; jobs are
queued first, then one worker drains them in micro-batches with an engine that
answers instantly, so what is measured is claiming, publishing and booking only.
"RQ per job" claims, starts and finishes every job through RQ's own calls one by one,
as the worker did up to the sixth session; "batch" is the product's path
(worker/booking.py). Modes alternate, ``--rounds`` times each; medians are printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import redis
import rq

from steelsight.clients import redis_client
from steelsight.contract import Frame, FrameResult, Settings, Timings
from steelsight.devstack import free_port, redis_server, s3_server
from steelsight.producer.service import Producer
from steelsight.worker import booking, jobs
from steelsight.worker.service import make_worker


class InstantEngine:
    """Answers every frame at once: no model, no S3."""

    def prefetch(self, frames):
        return {}

    def compute(self, frames, loads=None):
        return {f.job_id: FrameResult(frame_id=f.frame_id, job_id=f.job_id, line_id=f.line_id, camera_id=f.camera_id,
                                      captured_at=f.captured_at, status="ok", label="crazing",
                                      frame_key=f.object_key, probabilities={"crazing": 0.9, "inclusion": 0.1},
                                      timings=Timings(queue_wait_s=0, inference_s=0, total_s=0)) for f in frames}

    def process(self, frames, loads=None):
        return self.compute(frames)


def commands(conn) -> int:
    return sum(v["calls"] for k, v in conn.info("commandstats").items() if k != "cmdstat_info")


def drain(settings: Settings, line: str, n: int, batch_booking: bool) -> tuple[float, float]:
    """(Redis commands, worker CPU ms) per job for draining ``n`` queued jobs."""
    producer = Producer(settings, line, "cam-1")
    for i in range(n):
        producer._enqueue(Frame(frame_id=f"f{i}", line_id=line, camera_id="cam-1", captured_at=datetime.now(UTC),
                                ext="png"))
    conn = redis_client(settings)
    saved = booking.plain, booking.dequeue_waiting, booking.start
    if not batch_booking:  # every step through RQ's own per-job calls
        booking.plain = lambda job, outcome: False
        booking.dequeue_waiting = booking.dequeue_one_by_one
        booking.start = lambda worker, claimed: [worker.prepare_execution(job) for job in claimed]
    try:
        worker = make_worker(settings)
        before, cpu = commands(conn), time.process_time()
        worker.work(burst=True, with_scheduler=False, logging_level="WARNING")
        return (commands(conn) - before) / n, 1e3 * (time.process_time() - cpu) / n
    finally:
        booking.plain, booking.dequeue_waiting, booking.start = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=400, help="jobs per drain (default: 400)")
    parser.add_argument("--batch", type=int, default=8, help="worker micro-batch size (default: 8)")
    parser.add_argument("--rounds", type=int, default=3, help="drains per mode, alternating (default: 3)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="steelsight-rq-"))
    redis_proc, s3 = redis_server(workdir).start(), s3_server(workdir).start()
    modes = {"RQ per job (claim, start, finish)": False, "batch (product: worker/booking.py)": True}
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    try:
        settings = Settings(redis_url=f"redis://127.0.0.1:{redis_proc.port}/0", s3_endpoint=f"127.0.0.1:{s3.port}",
                            s3_access_key=s3.credentials.access_key, s3_secret_key=s3.credentials.secret_key,
                            batch_size=args.batch,
                            max_queue_depth=10 * args.jobs, metrics_port=free_port())
        jobs.install(InstantEngine(), settings)
        for r in range(args.rounds):
            for name, batch_booking in modes.items():
                measured[name].append(drain(settings, f"r{r}-{int(batch_booking)}", args.jobs, batch_booking))
    finally:
        redis_proc.stop()
        s3.stop()

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, rq {rq.__version__}, "
          f"redis-py {redis.__version__}; {args.jobs} jobs per drain, batches of {args.batch}, median of "
          f"{args.rounds} drains")
    print("| path | Redis commands per job | worker CPU per job (ms) |\n|---|---:|---:|")
    medians = {name: [statistics.median(v[i] for v in runs) for i in (0, 1)] for name, runs in measured.items()}
    for name, (cmds, cpu) in medians.items():
        print(f"| {name} | {cmds:.1f} | {cpu:.2f} |")
    (rq_cmds, rq_cpu), (batch_cmds, batch_cpu) = medians.values()
    print(f"| **batch / RQ** | **{batch_cmds / rq_cmds:.2f}** | **{batch_cpu / rq_cpu:.2f}** |")


if __name__ == "__main__":
    main()
