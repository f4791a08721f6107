"""A dead worker's claims are re-queued once, though two workers clean up at the same moment."""

from __future__ import annotations

import threading
from collections import Counter

from rq import Queue, SimpleWorker
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from steelsight.clients import redis_client
from steelsight.worker import reclaim, rq_compat
from steelsight.worker.service import make_worker

from ..helpers import SlowEngine, enqueue_frames

FRAMES, ROUNDS = 20, 10


def test_rq_clean_up_beside_a_reclaim_pass_queues_each_abandoned_job_once(settings):
    """One worker's RQ maintenance (which also re-queues expired claims) and another's reclaim pass, at once."""
    conn = redis_client(settings)
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    started = StartedJobRegistry(settings.queue_name, connection=conn, serializer=JSONSerializer)
    dead, cleaner = make_worker(settings, SlowEngine(), name="dead"), make_worker(settings, SlowEngine(), name="rq")
    job_class = rq_compat.FrameJob.bound(settings)
    twice: list[str] = []
    for round_ in range(ROUNDS):
        enqueue_frames(settings, f"line-r{round_}", FRAMES)
        claimed = rq_compat.dequeue_waiting(dead, dead.queues[0], FRAMES)
        rq_compat.start(dead, [job for job, _ in claimed])  # then it died: its claims expire
        assert len(claimed) == FRAMES and queue.count == 0
        conn.zadd(started.key, dict.fromkeys(conn.zrange(started.key, 0, -1), 1), xx=True)  # expired long ago
        both = threading.Barrier(2)
        threads = [threading.Thread(target=lambda fn=fn, both=both: (both.wait(), fn()))
                   for fn in (cleaner.clean_registries, lambda: reclaim.reclaim(queue, "peer", job_class,
                                                                               JSONSerializer))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # whichever ran, or a later pass if one stood back: every claim back in the queue
        reclaim.reclaim(queue, "peer", job_class, JSONSerializer)
        cleaner.clean_registries()
        counts = Counter(queue.get_job_ids())
        assert set(counts) == {job.id for job, _ in claimed}, f"round {round_}: a claim was not re-queued"
        twice += [job_id for job_id, n in counts.items() if n > 1]
        conn.delete(queue.key)
    assert twice == [], f"{len(twice)} of {FRAMES * ROUNDS} abandoned jobs queued twice (computed twice)"


def test_rq_clean_up_stands_back_while_a_peer_holds_the_lock_and_runs_on_the_next_loop(settings):
    conn = redis_client(settings)
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    started = StartedJobRegistry(settings.queue_name, connection=conn, serializer=JSONSerializer)
    dead, cleaner = make_worker(settings, SlowEngine(), name="dead2"), make_worker(settings, SlowEngine(), name="rq2")
    enqueue_frames(settings, "line-held", 3)
    claimed = rq_compat.dequeue_waiting(dead, dead.queues[0], 3)
    rq_compat.start(dead, [job for job, _ in claimed])
    conn.zadd(started.key, dict.fromkeys(conn.zrange(started.key, 0, -1), 1), xx=True)
    with reclaim.held(queue, "peer") as took:
        assert took
        cleaner.clean_registries()
        assert queue.count == 0 and cleaner.last_cleaned_at is None  # stood back
        assert SimpleWorker.should_run_maintenance_tasks.fget(cleaner)  # RQ's own test: its loop tries again
    cleaner.clean_registries()
    assert sorted(queue.get_job_ids()) == sorted(job.id for job, _ in claimed)  # RQ's clean-up re-queued them
    assert cleaner.last_cleaned_at is not None
