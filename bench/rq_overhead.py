"""RQ bookkeeping per frame job: Redis commands and worker CPU, RQ's own path against the batch booking.

    python -m bench.rq_overhead --jobs 400 --rounds 3
    python -m bench.rq_overhead --quick

A real redis-server (and the S3 server the producer needs) on loopback; jobs are
queued first, then one worker drains them in micro-batches with an engine that
answers instantly, so what is measured is claiming, publishing and booking only.
"RQ per job" claims, starts and finishes every job through RQ's own calls one by one,
as the worker did before release 0.1.6; "batch" is the product's path
(worker/rq_compat.py: ``dequeue_waiting``, ``start``, ``finish``). Modes alternate,
``--rounds`` times each; the table gives medians and the ratio batch / RQ.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.harness import BenchParser, describe, emit, local_stack
from steelsight.clients import redis_client
from steelsight.contract import Frame, FrameResult, Settings, Timings
from steelsight.devstack import free_port
from steelsight.producer.service import Producer
from steelsight.worker import rq_compat
from steelsight.worker.outcome import Done
from steelsight.worker.service import make_worker

NAME = "rq_overhead"


class InstantEngine:
    """Answers every frame at once: no model, no S3."""

    def prefetch(self, frames):
        return {}

    def compute(self, frames, loads=None):
        return {f.job_id: Done(FrameResult(
            frame_id=f.frame_id, job_id=f.job_id, line_id=f.line_id, camera_id=f.camera_id,
            captured_at=f.captured_at, status="ok", label="crazing", frame_key=f.object_key,
            probabilities={"crazing": 0.9, "inclusion": 0.1},
            timings=Timings(queue_wait_s=0, inference_s=0, total_s=0))) for f in frames}


def commands(conn) -> int:
    return sum(v["calls"] for k, v in conn.info("commandstats").items() if k != "cmdstat_info")


@contextlib.contextmanager
def rq_per_job():
    """Every step through RQ's own per-job calls instead of the batch booking."""
    saved = rq_compat.plain, rq_compat.dequeue_waiting, rq_compat.start
    rq_compat.plain = lambda job, outcome: False
    rq_compat.dequeue_waiting = rq_compat.dequeue_one_by_one
    rq_compat.start = lambda worker, claimed: [worker.prepare_execution(job) for job in claimed]
    try:
        yield
    finally:
        rq_compat.plain, rq_compat.dequeue_waiting, rq_compat.start = saved


def drain(settings: Settings, line: str, n: int, batch_booking: bool) -> tuple[float, float]:
    """(Redis commands, worker CPU ms) per job for draining ``n`` queued jobs."""
    producer = Producer(settings, line, "cam-1")
    for i in range(n):
        producer._enqueue(Frame(frame_id=f"f{i}", line_id=line, camera_id="cam-1", captured_at=datetime.now(UTC),
                                ext="png"))
    conn = redis_client(settings)
    with contextlib.nullcontext() if batch_booking else rq_per_job():
        worker = make_worker(settings, InstantEngine())
        before, cpu = commands(conn), time.process_time()
        worker.work(burst=True, with_scheduler=False, logging_level="WARNING")
        return (commands(conn) - before) / n, 1e3 * (time.process_time() - cpu) / n


def main() -> None:
    parser = BenchParser(__doc__, quick={"jobs": 80, "rounds": 1})
    parser.add_argument("--jobs", type=int, default=400, help="jobs per drain (default: 400)")
    parser.add_argument("--batch", type=int, default=8, help="worker micro-batch size (default: 8)")
    parser.add_argument("--rounds", type=int, default=3, help="drains per mode, alternating (default: 3)")
    args = parser.parse_args()

    modes = {"RQ per job (claim, start, finish)": False, "batch (product: worker/rq_compat.py)": True}
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    workdir = Path(tempfile.mkdtemp(prefix="steelsight-rq-"))
    with local_stack(workdir, batch_size=args.batch, max_queue_depth=10 * args.jobs,
                     metrics_port=free_port()) as (settings, _):
        for r in range(args.rounds):
            for name, batch_booking in modes.items():
                measured[name].append(drain(settings, f"r{r}-{int(batch_booking)}", args.jobs, batch_booking))

    medians = {name: [statistics.median(v[i] for v in runs) for i in (0, 1)] for name, runs in measured.items()}
    (rq_cmds, rq_cpu), (batch_cmds, batch_cpu) = medians.values()
    lines = [f"# {describe()}; {args.jobs} jobs per drain, batches of {args.batch}, median of {args.rounds} drains",
             "| path | Redis commands per job | worker CPU per job (ms) |", "|---|---:|---:|"]
    lines += [f"| {name} | {cmds:.1f} | {cpu:.2f} |" for name, (cmds, cpu) in medians.items()]
    lines.append(f"| **batch / RQ** | **{batch_cmds / rq_cmds:.2f}** | **{batch_cpu / rq_cpu:.2f}** |")
    emit(NAME, args, lines, {"jobs": args.jobs, "batch": args.batch, "measured": measured,
                             "commands_batch_over_rq": batch_cmds / rq_cmds, "cpu_batch_over_rq": batch_cpu / rq_cpu})


if __name__ == "__main__":
    main()
