"""A job hash RQ cannot even read never stops the worker or strands its batch mates."""

from __future__ import annotations

import logging

import pytest
from rq import Queue
from rq.registry import ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from steelsight.clients import redis_client
from steelsight.worker import reclaim, rq_compat, service

from ..helpers import SlowEngine, enqueue_frames, records

# each makes RQ's Job.restore raise (ValueError, AssertionError, JSONDecodeError, ValueError, ValueError)
MALFORMED = {"status": "bogus", "timeout": "abc", "dependency_ids": "{", "retries_left": "x",
             "created_at": "yesterday"}


@pytest.mark.parametrize("field", MALFORMED)
@pytest.mark.parametrize("where", ["head", "middle", "started", "scheduled"])
def test_a_malformed_job_hash_is_set_aside_and_its_batch_mates_finish(settings, field, where, caplog):
    settings = settings.model_copy(update={"batch_size": 4})
    conn = redis_client(settings)
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    enqueue_frames(settings, "line-p", 9)
    ids = queue.get_job_ids()
    bad = ids[0] if where == "head" else ids[5]  # 5: second in the second batch of 4
    conn.hset(f"rq:job:{bad}", field, MALFORMED[field])
    job_class = rq_compat.FrameJob.bound(settings)
    kept = rq_compat.unreadable_key(settings, bad)
    caplog.set_level(logging.INFO, logger="steelsight.worker")
    good = set(ids) - {bad}
    if where in ("started", "scheduled"):  # a job a dead worker held, or one due for retry
        conn.lrem(queue.key, 1, bad)
        registry = (StartedJobRegistry if where == "started" else ScheduledJobRegistry)(
            settings.queue_name, connection=conn, serializer=JSONSerializer)
        conn.zadd(registry.key, {bad: 1})  # expired / due long ago
        reclaim.reclaim(queue, "test", job_class, JSONSerializer)  # the worker's own pass: must not raise
    assert service.work(settings, SlowEngine(compute_s=0.01), burst=True) is True  # no WorkerCrashed
    assert queue.count == 0
    # anything left of the bad job is read again by maintenance: it must not crash either
    reclaim.reclaim(queue, "test", job_class, JSONSerializer)
    assert set(records(settings, conn)) == good
    assert not conn.exists(f"rq:job:{bad}")  # set aside, kept a while for inspection
    assert 0 < conn.ttl(kept) <= settings.failure_ttl_s
    assert bad.encode() not in conn.lrange(queue.intermediate_queue_key, 0, -1)
    assert f"unreadable job {bad} set aside" in caplog.text
