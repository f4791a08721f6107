"""Claim and book a micro-batch's RQ jobs with the writes RQ makes, shared across the batch.

RQ's ``SimpleWorker`` books every job on its own: a pipeline to create its execution,
one to start it, a heartbeat, and a WATCHed transaction to finish it, each repeating
the worker-level writes. That is ~43 Redis commands per frame, and redis-py packs each
in Python on the worker's core (bench/results/history-0.1.md, "End-to-end pipeline"). Here a batch
starts in one pipeline and its successes finish in one transaction; the keys each job
leaves behind are RQ's own, which ``tests/test_booking.py`` checks field by field
against RQ's per-job path. Anything off the plain path (a failure, a callback, a
repeat, a rate limit, dependents) goes through RQ's ``perform_job`` as before.
"""

from __future__ import annotations

import itertools
import logging

from redis.exceptions import WatchError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.results import Result
from rq.utils import as_text, now, utcformat
from rq.worker import WorkerStatus

from steelsight.contract import FrameResult

log = logging.getLogger("steelsight.worker")


def dequeue_waiting(worker, queue, room: int) -> list[tuple[Job, object]]:
    """Up to ``room`` waiting jobs without blocking, in two round trips (RQ's ``dequeue_any`` takes two per job).

    The same moves as RQ's: each id goes to the queue's intermediate list, and an id
    whose job is gone is skipped.
    """
    if room <= 0:
        return []
    if len(worker.queues) != 1 or worker.get_redis_server_version() < (6, 2, 0):  # RQ pops without LMOVE there
        return dequeue_one_by_one(worker, queue, room)
    with worker.connection.pipeline(transaction=False) as pipe:
        for _ in range(room):
            pipe.lmove(queue.key, queue.intermediate_queue_key)
        ids = [as_text(job_id) for job_id in pipe.execute() if job_id is not None]
    if not ids:
        return []
    found = worker.job_class.fetch_many(ids, connection=worker.connection, serializer=worker.serializer)
    return [(job, queue) for job in found if job is not None]


def dequeue_one_by_one(worker, queue, room: int) -> list[tuple[Job, object]]:
    """RQ's own ``dequeue_any``, ``room`` times or until the queue is empty."""
    waiting = (worker.queue_class.dequeue_any([queue], None, connection=worker.connection,
                                              job_class=worker.job_class, serializer=worker.serializer)
               for _ in range(room))
    return list(itertools.takewhile(lambda item: item is not None, waiting))


def start(worker, claimed: list[Job]) -> list[Execution]:
    """Create the claimed jobs' executions and mark them started, in one round trip.

    RQ does this per job, the second half only when the job runs; a batched job is
    started when claimed, since from then on it waits only for the model.
    """
    remove_from_intermediate = len(worker.queues) == 1  # as RQ's perform_job decides
    executions = []
    with worker.connection.pipeline() as pipe:
        for job in claimed:
            ttl = worker.get_heartbeat_ttl(job)
            execution = Execution.create(job, ttl, pipeline=pipe, worker_name=worker.name)
            worker.executions[execution.id] = execution
            job.prepare_for_execution(worker.name, pipeline=pipe)
            pipe.persist(job.key)
            if remove_from_intermediate:
                pipe.lrem(worker.queue_class(job.origin, connection=worker.connection).intermediate_queue_key, 1,
                          job.id)
            executions.append(execution)
        worker.set_state(WorkerStatus.BUSY, pipeline=pipe)
        worker.heartbeat(pipeline=pipe)  # the worker's own TTL: a claim's short one would let its key lapse
        pipe.execute()
    return executions


def plain(job: Job, outcome) -> bool:
    """A frame result with nothing RQ would do beyond storing it."""
    return (isinstance(outcome, FrameResult) and job.success_callback is None and not job.webhooks
            and not job.repeats_left and not job.has_rate_limit)


def finish(worker, done: list[tuple[Job, Execution, FrameResult]]) -> bool:
    """Mark ``done`` finished with their results in one transaction; False (nothing written) if any has dependents.

    Dependents are WATCHed as in RQ's ``handle_job_success``, so one added meanwhile
    restarts the transaction rather than being lost.
    """
    if not done:
        return True
    dependents = [job.dependents_key for job, _, _ in done]
    with worker.connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(*dependents)
                if pipe.exists(*dependents):
                    pipe.unwatch()
                    return False
                pipe.multi()
                _write_success(worker, done, pipe)
                pipe.execute()
                break
            except WatchError:
                continue
    # one line per batch, not RQ's two per job
    ids = [job.id for job, _, _ in done]
    log.info("%d job%s OK: %s", len(ids), "s" * (len(ids) > 1), ids[0] if len(ids) == 1 else f"{ids[0]} … {ids[-1]}")
    return True


def _write_success(worker, done, pipe) -> None:
    ended = now()
    working_s = 0.0
    for job, execution, result in done:
        job.ended_at, job.last_heartbeat = ended, ended
        job._result, job._status = result.model_dump(mode="json"), JobStatus.FINISHED
        working_s += (ended - job.started_at).total_seconds()
        ttl = job.get_result_ttl(worker.default_result_ttl)
        if ttl != 0:  # RQ's _handle_success, writing only the fields that changed since the job started
            pipe.hset(job.key, mapping={"status": JobStatus.FINISHED, "ended_at": utcformat(ended),
                                        "last_heartbeat": utcformat(ended)})
            Result.create(job, Result.Type.SUCCESSFUL, return_value=job._result, ttl=ttl,
                          worker_name=worker.name, pipeline=pipe, execution_id=execution.id,
                          execution_started_at=execution.created_at, execution_ended_at=ended)
            job.finished_job_registry.add(job, ttl, pipe)
        job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
        worker.cleanup_execution(job, pipeline=pipe, execution=execution)
    pipe.hincrby(worker.key, "successful_job_count", len(done))
    pipe.hincrbyfloat(worker.key, "total_working_time", working_s)
