"""A failed frame is retried after a growing wait, and never past the retry window."""

from __future__ import annotations

import time

import pytest
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
    # 1 s, then 2 s, never less (RQ's due time is truncated to the second: without the worker's own, a 2 s
    # backoff came due after 1.1 s); found within the worker's 1 s check
    assert 1.0 <= gaps[0] < 2.5 and 2.0 <= gaps[1] < 3.5
    assert FailedJobRegistry(settings.queue_name, connection=conn).count == 0


def test_retries_stop_at_the_retry_window(settings):
    # attempts at 0 and 1-2 s (due after 1 s, found within the 1 s check); the next would start at least
    # 2 s later, past the 2.5 s window
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


def test_a_retry_is_not_due_before_its_backoff_though_rq_files_it_under_the_whole_second(settings, monkeypatch):
    from datetime import UTC, datetime

    from rq import Queue

    from steelsight.worker import rq_compat

    enqueue_frames(settings, "line-d", 1)
    conn = redis_client(settings)
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    job_class = rq_compat.FrameJob.bound(settings)
    job = job_class.fetch("line-d__cam-1__f0", connection=conn, serializer=JSONSerializer)
    queue.remove(job)
    due = float(int(time.time()) + 100) + 0.9  # late in its second
    job.meta[rq_compat.RETRY_DUE] = due
    job.save_meta()
    queue.schedule_job(job, datetime.fromtimestamp(due, UTC))  # as RQ's retry does: filed under int(due)

    def at(t: float) -> None:  # the worker's clock, fixed: no sleeps to race on a loaded machine
        monkeypatch.setattr(rq_compat, "now", lambda: datetime.fromtimestamp(t, UTC))
        monkeypatch.setattr(rq_compat, "current_timestamp", lambda: int(t))

    at(int(due) + 0.1)
    assert rq_compat.enqueue_due(queue, job_class, JSONSerializer) == 0 and job.id not in queue.job_ids
    at(due + 0.01)
    assert rq_compat.enqueue_due(queue, job_class, JSONSerializer) == 1 and job.id in queue.job_ids


UNREADABLE_DUE = ['{"retry_due": "x"}', '{"retry_due": NaN}', '{"retry_due": 1e300}']


@pytest.mark.parametrize("n, meta", list(enumerate(UNREADABLE_DUE)))
def test_an_unreadable_retry_due_neither_crashes_nor_strands_the_job(settings, monkeypatch, n, meta):
    from datetime import UTC, datetime

    from rq import Queue

    from steelsight.worker import rq_compat

    enqueue_frames(settings, f"line-u{n}", 1)
    conn = redis_client(settings)
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    job_class = rq_compat.FrameJob.bound(settings)
    job = job_class.fetch(f"line-u{n}__cam-1__f0", connection=conn, serializer=JSONSerializer)
    queue.remove(job)
    filed = int(time.time()) + 100
    queue.schedule_job(job, datetime.fromtimestamp(filed, UTC))
    conn.hset(job.key, "meta", meta)
    monkeypatch.setattr(rq_compat, "now", lambda: datetime.fromtimestamp(filed + 1.01, UTC))
    monkeypatch.setattr(rq_compat, "current_timestamp", lambda: filed + 1)
    assert rq_compat.enqueue_due(queue, job_class, JSONSerializer) == 1 and job.id in queue.job_ids


def test_the_worker_files_the_precise_due_time_with_the_retry(settings):
    from rq.registry import ScheduledJobRegistry

    settings = settings.model_copy(update={"job_retries": 3, "job_retry_backoff_s": 5.0})
    enqueue_frames(settings, "line-p", 1)
    engine = FlakyEngine(failures=99)
    failed_at = time.time()
    work_until_idle(settings, engine, idle_s=2)
    conn = redis_client(settings)
    (job_id, score), = conn.zrange(ScheduledJobRegistry(settings.queue_name, connection=conn).key, 0, -1,
                                   withscores=True)
    due = Job.fetch(job_id.decode(), connection=conn, serializer=JSONSerializer).meta["retry_due"]
    assert len(engine.attempts) == 1 and failed_at + 5.0 <= due and score <= due < score + 1
