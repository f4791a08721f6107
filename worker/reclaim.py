"""Re-queue a dead worker's claimed jobs and jobs due for retry, within about a second.

RQ finds abandoned jobs in its registry clean-up, which runs every maintenance
interval under a lock held up to 15 minutes (a worker killed while holding it stalls
every clean-up for that long), and moves retries due later only from a scheduler
process. Here every worker makes a quick pass every ``reclaim_interval_s``, under a
lock that lapses within seconds; one pass at a time, so no job is re-queued twice.
"""

from __future__ import annotations

import logging

from rq.registry import ScheduledJobRegistry, StartedJobRegistry
from rq.utils import current_timestamp

log = logging.getLogger("steelsight.worker")

LOCK_S = 3  # a pass takes milliseconds; a worker killed in one delays the next by at most this

# delete the lock only if this worker still holds it
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def lock_key(queue) -> str:
    return f"{queue.key}:reclaim-lock"


def reclaim(queue, holder: str, job_class, serializer) -> None:
    """One pass over ``queue``: expired claims back to the queue (or to failed, out of retries), due retries in."""
    connection = queue.connection
    if not connection.set(lock_key(queue), holder, nx=True, ex=LOCK_S):
        return  # another worker is making this pass right now
    try:
        # RQ's own handling of an abandoned job: retried if it has retries left, else failed
        StartedJobRegistry(queue.name, connection=connection, job_class=job_class, serializer=serializer).cleanup()
        enqueue_due(queue, job_class, serializer)
    finally:
        connection.eval(RELEASE, 1, lock_key(queue), holder)


def enqueue_due(queue, job_class, serializer) -> int:
    """Move scheduled jobs whose time has come onto the queue, as RQ's scheduler does; how many moved."""
    registry = ScheduledJobRegistry(queue.name, connection=queue.connection, job_class=job_class,
                                    serializer=serializer)
    ids = registry.get_jobs_to_schedule(current_timestamp())
    if not ids:
        return 0
    found = job_class.fetch_many(ids, connection=queue.connection, serializer=serializer)
    with queue.connection.pipeline() as pipe:
        for job_id, job in zip(ids, found, strict=True):
            if job is not None:
                queue._enqueue_job(job, pipeline=pipe, at_front=job.should_enqueue_at_front())
            registry.remove(job_id, pipeline=pipe)
        pipe.execute()
    log.info("re-queued %d job%s due for retry", len(ids), "s" * (len(ids) > 1))
    return len(ids)
