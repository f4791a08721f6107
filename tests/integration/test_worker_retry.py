"""A failed frame is retried after a growing wait, and never past the retry window."""

from __future__ import annotations

import time

from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from steelsight.clients import redis_client

from ..helpers import SlowEngine, enqueue_frames, records


class FlakyEngine(SlowEngine):
    """Fails each frame's first ``failures`` attempts with a transient-looking error; records when each ran."""

    def __init__(self, failures: int):
        super().__init__(compute_s=0)
        self.failures, self.attempts = failures, []

    def compute(self, frames, loads=None):
        from steelsight.worker.outcome import Failed

        self.attempts.append(time.monotonic())
        if len(self.attempts) <= self.failures:
            return {f.job_id: Failed(ConnectionError("S3 still down")) for f in frames}
        return super().compute(frames, loads)


def work_until_idle(settings, engine, idle_s: int) -> None:
    from steelsight.worker.service import make_worker

    make_worker(settings, engine).work(max_idle_time=idle_s, with_scheduler=False)


def test_retries_back_off(settings):
    settings = settings.model_copy(update={"job_retries": 3, "job_retry_backoff_s": 1.0})
    enqueue_frames(settings, "line-r", 1)
    engine = FlakyEngine(failures=2)
    work_until_idle(settings, engine, idle_s=4)
    conn = redis_client(settings)
    gaps = [round(b - a, 2) for a, b in zip(engine.attempts, engine.attempts[1:], strict=False)]
    print(f"retry gaps {gaps} s")
    assert len(engine.attempts) == 3 and set(records(settings, conn)) == {"line-r__cam-1__f0"}
    assert 1.0 <= gaps[0] < 2.5 and 2.0 <= gaps[1] < 3.5  # 1 s, then 2 s (the worker checks every second)
    assert FailedJobRegistry(settings.queue_name, connection=conn).count == 0


def test_retries_stop_at_the_retry_window(settings):
    # attempts at 0 and ~1 s; the next would start ~3 s after enqueue, past the 2.5 s window
    settings = settings.model_copy(update={"job_retries": 5, "job_retry_backoff_s": 1.0, "job_retry_window_s": 2.5})
    enqueue_frames(settings, "line-w", 1)
    engine = FlakyEngine(failures=99)
    started = time.monotonic()
    work_until_idle(settings, engine, idle_s=4)
    conn = redis_client(settings)
    failed = FailedJobRegistry(settings.queue_name, connection=conn, serializer=JSONSerializer).get_job_ids()
    assert len(engine.attempts) == 2 and engine.attempts[-1] - started < 2.5
    assert failed == ["line-w__cam-1__f0"] and records(settings, conn) == {}
    reason = Job.fetch(failed[0], connection=conn, serializer=JSONSerializer).latest_result().exc_string
    assert "S3 still down" in reason and "retry window of 2s is spent" in reason
