"""Re-queue a dead worker's claimed jobs and jobs due for retry, within about a second.

RQ finds abandoned jobs in its registry clean-up, which runs every maintenance
interval under a lock held up to 15 minutes (a worker killed while holding it stalls
every clean-up for that long), and moves retries due later only from a scheduler
process. Here every worker makes a quick pass every ``reclaim_interval_s``, under a
lock that lapses within seconds; one pass at a time, so no job is re-queued twice.
RQ's own clean-up also re-queues abandoned jobs, so the worker runs it under this
lock too (:meth:`worker.rqworker.BatchingWorker.clean_registries`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rq.registry import StartedJobRegistry

from .rq_compat import enqueue_due

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


@contextlib.contextmanager
def held(queue, holder: str) -> Iterator[bool]:
    """Whether ``holder`` took ``queue``'s reclaim lock; released on leaving, if it is still the holder's."""
    connection = queue.connection
    took = bool(connection.set(lock_key(queue), holder, nx=True, ex=LOCK_S))
    try:
        yield took
    finally:
        if took:
            connection.eval(RELEASE, 1, lock_key(queue), holder)


def reclaim(queue, holder: str, job_class, serializer) -> None:
    """One pass over ``queue``: expired claims back to the queue (or to failed, out of retries), due retries in."""
    with held(queue, holder) as took:
        if not took:
            return  # another worker is making this pass right now
        # RQ's own handling of an abandoned job: retried if it has retries left, else failed
        StartedJobRegistry(queue.name, connection=queue.connection, job_class=job_class,
                           serializer=serializer).cleanup()
        enqueue_due(queue, job_class, serializer)
