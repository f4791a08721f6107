"""The contract test of ``worker/rq_compat.py``: the batch booking leaves Redis as RQ's own per-job path does.

Run it on any RQ upgrade; it also checks the batch path costs far fewer Redis commands.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from steelsight.clients import redis_client
from steelsight.contract import JOB_FUNCTION, Frame
from steelsight.producer.service import Producer
from steelsight.worker import rq_compat

from ..helpers import SlowEngine, enqueue_frames, records, run_slow_worker, work_queue

# written at run time, so they differ between any two runs
VOLATILE_FIELDS = {b"started_at", b"ended_at", b"last_heartbeat", b"created_at", b"enqueued_at", b"worker_name"}


def commands(conn) -> int:
    return sum(v["calls"] for k, v in conn.info("commandstats").items() if k != "cmdstat_info")


def run(settings, line: str, frames: int, rq_path: bool, monkeypatch) -> int:
    """Work ``frames`` queued frames of ``line`` in batches of 8 (the default); the Redis commands the worker sent."""
    enqueue_frames(settings, line, frames)
    if rq_path:
        monkeypatch.setattr(rq_compat, "plain", lambda job, outcome: False)
    conn = redis_client(settings)
    before = commands(conn)
    work_queue(settings, SlowEngine(compute_s=0), batch=8)
    spent = commands(conn) - before
    monkeypatch.undo()
    return spent


def key_shapes(conn, line: str) -> dict[str, str]:
    """Every key the line's jobs left, ids replaced by placeholders, with its Redis type."""
    shapes = {}
    for key in conn.scan_iter(count=1000):
        name = key.decode()
        name = re.sub(rf"{line}__cam-1__f\d+", "<job>", name)
        name = re.sub(r"[0-9a-f]{32}", "<execution>", name)
        shapes[name] = conn.type(key).decode()
    return shapes


def job_state(conn, job_id: str) -> dict:
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    fields = {k: v for k, v in conn.hgetall(job.key).items() if k not in VOLATILE_FIELDS}
    fields.pop(b"data", None)  # the payload names the frame, and so the line
    result = job.latest_result()
    return_value = {k: v for k, v in result.return_value.items() if k not in {"frame_id", "job_id", "line_id",
                                                                               "frame_key", "captured_at",
                                                                               "finished_at"}}
    return {"fields": sorted(fields), "status": job.get_status(), "key_expires": conn.ttl(job.key) > 0,
            "result_type": result.type, "return_value": return_value, "ended": job.ended_at is not None}


def test_batch_booking_matches_rq_and_costs_fewer_commands(settings, monkeypatch):
    # booking alone: no frame is picked for review (that adds keys for whichever job ids the sample picks)
    settings = settings.model_copy(update={"review_unknown_share": 0.0, "review_low_margin_share": 0.0,
                                           "review_random_share": 0.0})
    conn = redis_client(settings)
    queue = Queue(settings.queue_name, connection=conn)
    startup = run(settings, "line-0", 0, rq_path=False, monkeypatch=monkeypatch)  # a worker that finds no job
    rq_commands = run(settings, "line-r", 32, rq_path=True, monkeypatch=monkeypatch) - startup
    rq_keys = key_shapes(conn, "line-r")
    batch_commands = run(settings, "line-b", 32, rq_path=False, monkeypatch=monkeypatch) - startup
    batch_keys = key_shapes(conn, "line-b")

    assert len(records(settings, conn)) == 64
    assert queue.finished_job_registry.count == 64 and queue.count == 0
    assert StartedJobRegistry(queue=queue).count == 0 and queue.failed_job_registry.count == 0
    assert conn.llen(queue.intermediate_queue_key) == 0
    assert not [k for k in conn.keys("rq:execution*")]  # executions cleaned up on both paths
    for i in range(32):
        rq_job, batch_job = job_state(conn, f"line-r__cam-1__f{i}"), job_state(conn, f"line-b__cam-1__f{i}")
        assert batch_job == rq_job
        assert batch_job["status"] == JobStatus.FINISHED
    # same kinds of keys (each run's worker adds its own, named alike)
    assert {k for k in batch_keys if "<job>" in k} == {k for k in rq_keys if "<job>" in k}
    assert all(batch_keys[k] == rq_keys[k] for k in batch_keys if "<job>" in k)
    # the worker's own statistics count the batched jobs too
    counts = [int(conn.hget(key, "successful_job_count") or 0) for key in conn.keys("rq:worker:*")
              if conn.type(key) == b"hash"]
    assert sorted(counts)[-3:] == [0, 32, 32]
    assert batch_commands < 0.7 * rq_commands, (batch_commands, rq_commands)  # 28 against 44 per job measured


def test_a_job_with_dependents_is_booked_by_rq_and_releases_them(settings):
    """A frame with dependents finishes through RQ, which releases them; a dependent is then refused.

    The producer never sets ``depends_on``, so a job that carries it was written by
    someone else: the worker's guard refuses it (tests/integration/test_worker_guard.py).
    """
    conn = redis_client(settings)
    producer = Producer(settings, "line-d", "cam-1")
    first = Frame(frame_id="f0", line_id="line-d", camera_id="cam-1", captured_at=datetime.now(UTC), ext="png")
    producer._enqueue(first)
    later = Frame(frame_id="f1", line_id="line-d", camera_id="cam-1", captured_at=datetime.now(UTC), ext="png")
    producer.queue.enqueue(JOB_FUNCTION, frame=later.model_dump(mode="json"), job_id=later.job_id,
                           depends_on=first.job_id)
    run_slow_worker(settings, SlowEngine(compute_s=0), frames=0, batch=4, line="line-d")
    assert set(records(settings, conn)) == {first.job_id}
    queue = Queue(settings.queue_name, connection=conn)
    assert queue.finished_job_registry.get_job_ids() == [first.job_id]
    assert queue.failed_job_registry.get_job_ids() == [later.job_id]  # released, then refused


def test_waiting_jobs_are_claimed_together_and_vanished_ones_skipped(settings):
    from steelsight.worker.service import make_worker

    conn = redis_client(settings)
    enqueue_frames(settings, "line-w", 3)
    conn.delete(Job.key_for("line-w__cam-1__f1"))  # deleted while queued, as by a queue cleanup
    worker = make_worker(settings, SlowEngine())
    queue = worker.queues[0]
    claimed = rq_compat.dequeue_waiting(worker, queue, room=8)
    assert [job.id for job, _ in claimed] == ["line-w__cam-1__f0", "line-w__cam-1__f2"]
    assert queue.count == 0
    assert conn.lrange(queue.intermediate_queue_key, 0, -1) == [b"line-w__cam-1__f0", b"line-w__cam-1__f1",
                                                                 b"line-w__cam-1__f2"]
    assert rq_compat.dequeue_waiting(worker, queue, room=8) == []
