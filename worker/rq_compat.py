"""Every use of RQ's internals by the worker, in one place. Checked against rq 3.0.0 (redis-py 8.1).

Three things reach past RQ's public API:

- :class:`FrameJob`, the job class. Its ``_execute`` refuses foreign jobs and, when the
  worker has attached a precomputed :mod:`outcome <worker.outcome>` to the instance,
  returns or raises that instead of calling the job function. The batching worker
  computes a whole micro-batch, attaches each job's outcome, and hands any job off the
  plain path to RQ's own ``perform_job``; RQ then fails, retries, records and releases
  it exactly as for a job whose function returned or raised. The outcome lives on the
  job object the worker holds, so nothing is handed over through module state. Its
  ``restore`` sets aside a hash RQ cannot parse.
- Claiming and booking a batch (:func:`dequeue_waiting`, :func:`start`, :func:`finish`).
  RQ's ``SimpleWorker`` books every job on its own: a pipeline to create its execution,
  one to start it, a heartbeat, and a WATCHed transaction to finish it, each repeating
  the worker-level writes, each packed in Python on the worker's core
  (``bench/rq_overhead.py`` counts them). Here a batch starts in one pipeline and its plain successes finish
  in one transaction, writing RQ's own fields (``job._result``, ``job._status``,
  ``Execution``, ``Result.create``, the intermediate queue). ``tests/integration/test_booking.py``
  checks field by field that the keys left behind match RQ's per-job path; rerun it on
  any RQ upgrade.
- Moving due retries onto the queue (:func:`enqueue_due`), as RQ's scheduler does; the
  worker's idle wake-up (:func:`worker_ttl`) and warm-shutdown flag (:func:`stop_requested`).
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import ClassVar

from redis.exceptions import WatchError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry
from rq.results import Result
from rq.utils import as_text, current_timestamp, decode_redis_hash, now, utcformat
from rq.worker import WorkerStatus

from steelsight.contract import JOB_FUNCTION, Frame, FrameResult, Settings, get_settings

from . import metrics
from .jobs import RefusedJob, conclude
from .outcome import Done, Outcome

log = logging.getLogger("steelsight.worker")


class FrameJob(Job):
    """Executes only the frame job: a JSON payload cannot name another callable.

    RQ imports and calls a job's callbacks and sends its webhooks from names and URLs
    in the job hash, whoever wrote it. The producer sets none of them, nor dependencies,
    so a job carrying any is refused, and this class never imports a callback or sends
    a webhook, whatever path (failure, abandonment) the job takes through RQ.

    RQ builds jobs from their class alone (fetches, registry clean-ups), so the settings
    the class reads (TTL limits, key prefix) are bound to it: :meth:`bound`. Unbound, it
    reads the process's :func:`get_settings`.
    """

    bound_settings: ClassVar[Settings | None] = None
    outcome: Outcome | None = None  # attached by the batching worker before RQ performs the job
    backoff_s = 0.0  # set by the worker on a failed attempt; an abandoned job (fresh fetch) is re-queued at once

    @classmethod
    def bound(cls, settings: Settings) -> type[FrameJob]:
        """This class, reading ``settings``: one per worker, passed to its queues and to RQ as ``job_class``."""
        return type(cls.__name__, (cls,), {"bound_settings": settings, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__})

    @property
    def settings(self) -> Settings:
        return self.bound_settings or get_settings()

    def restore(self, raw_data) -> None:
        """RQ's, but a hash RQ cannot parse is set aside and reads as a missing job.

        RQ raises on a garbled field wherever it fetches (dequeue, registry clean-ups,
        retries), which would stop every worker that meets the job. Every RQ path skips
        a missing job, so the id is dropped from the queue and registries as they are
        next read.
        """
        try:
            super().restore(raw_data)
        except NoSuchJobError:
            raise
        except Exception as exc:
            obj = decode_redis_hash(raw_data)
            fields = {k: v[:80] for k, v in obj.items() if k != "data"}
            kept = unreadable_key(self.settings, self.id)
            log.error("unreadable job %s set aside as %s: %s: %s; fields %s", self.id, kept, type(exc).__name__, exc,
                      fields)
            metrics.FAILURES.labels(reason="UnreadableJob").inc()
            # kept for inspection under a key RQ never reads, expiring like a failed job
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.rename(self.key, kept)
                pipe.expire(kept, self.settings.failure_ttl_s)
                if origin := obj.get("origin"):  # else RQ's intermediate-queue clean-up drops the id later
                    queue = Queue(as_text(origin), connection=self.connection)
                    pipe.lrem(queue.intermediate_queue_key, 0, self.id)
                pipe.execute(raise_on_error=False)  # another worker may have set it aside first
            raise NoSuchJobError(f"job {self.id} is unreadable, set aside as {kept}") from exc

    @classmethod
    def fetch_many(cls, job_ids, connection, serializer=None) -> list[Job | None]:
        """RQ's, one job at a time: an unreadable job is None like a missing one, not an error for all."""
        found = []
        for job_id in job_ids:
            try:
                found.append(cls.fetch(job_id, connection=connection, serializer=serializer))
            except NoSuchJobError:
                found.append(None)
        return found

    def refusal(self) -> str | None:
        """Why this job must not run, or None."""
        try:
            func_name = self.func_name
        except Exception as exc:  # undecodable payload: refused without running anything
            return f"refusing job {self.id}: unreadable payload ({type(exc).__name__})"
        if func_name != JOB_FUNCTION:
            return f"refusing to run {func_name!r}: this queue only runs {JOB_FUNCTION}"
        extras = [what for what, value in (
            ("a success callback", self._success_callback_name), ("a failure callback", self._failure_callback_name),
            ("a stopped callback", self._stopped_callback_name), ("webhooks", self.webhooks),
            ("dependencies", self._dependency_ids)) if value]
        s = self.settings
        extras += [what for what, odd in (
            # RQ re-enqueues a repeating job after each success: it would be processed again and again
            ("a repeat", self.repeats_left is not None or self.repeat_intervals is not None),
            # a queued frame with a TTL can expire unprocessed
            ("a queue TTL", self.ttl is not None),
            # keys that never expire, or outlive what Redis is sized for (steelsight.sizing)
            ("a result TTL beyond job_result_ttl_s", _beyond(self.result_ttl, s.job_result_ttl_s)),
            ("a failure TTL beyond failure_ttl_s", _beyond(self.failure_ttl, s.failure_ttl_s))) if odd]
        if extras:
            return f"refusing job {self.id}: it carries {', '.join(extras)}, which the producer never sets"
        frame_id = self._frame_job_id()
        if frame_id is not None and frame_id != self.id:  # its result would land under another frame's id
            return f"refusing job {self.id}: its payload is frame {frame_id}"
        return None

    def _frame_job_id(self) -> str | None:
        """The payload's own job id; None if it does not parse (failed as a bad payload instead)."""
        try:
            return Frame.model_validate(self.kwargs["frame"]).job_id
        except Exception:
            return None

    # never imported, never called: see the class docstring
    success_callback = property(lambda self: None)
    failure_callback = property(lambda self: None)
    stopped_callback = property(lambda self: None)

    def send_webhooks(self, status, *, exc_string=None) -> None:
        return None

    def get_retry_interval(self) -> float:
        return self.backoff_s

    def _execute(self):
        refusal = self.refusal()
        if refusal:
            raise RefusedJob(refusal)
        if self.outcome is not None:  # computed in the worker's batch: only recorded here
            return conclude(self.outcome, self.connection, self.settings)
        return super()._execute()


def unreadable_key(settings: Settings, job_id: str) -> str:
    """Where a job hash RQ cannot parse is kept, out of RQ's way."""
    return f"{settings.key_prefix}:unreadable-job:{job_id}"


def _beyond(ttl: int | None, limit: int) -> bool:
    """A TTL that never expires (negative) or outlives ``limit``; None is RQ's finite default."""
    return ttl is not None and (ttl < 0 or ttl > limit)


def worker_ttl(wake_every_s: float) -> int:
    """The ``worker_ttl`` that has an idle worker wake every ``wake_every_s`` (whole seconds, at least one).

    RQ blocks on the queue for ``worker_ttl - 15`` seconds (``BaseWorker.dequeue_timeout``);
    the worker key it refreshes lives ``worker_ttl + 60``.
    """
    return 15 + max(1, math.ceil(wake_every_s))


def stop_requested(worker) -> bool:
    """A warm shutdown was asked for (SIGTERM): claim nothing more."""
    return worker._stop_requested


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


def plain(job: Job, outcome: Outcome | None) -> bool:
    """A frame result with nothing RQ would do beyond storing it."""
    return (isinstance(outcome, Done) and job.success_callback is None and not job.webhooks
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


RETRY_DUE = "retry_due"  # job meta: when a scheduled retry is due (Unix time)


def _due_at(job, score: float) -> float:
    """The job's precise due time, within the second RQ filed it under; whatever its meta holds, a job is
    never kept past that second (an unreadable value must not stall or crash the worker)."""
    meta = job.meta if isinstance(job.meta, dict) else {}
    due = meta.get(RETRY_DUE)
    if isinstance(due, bool) or not isinstance(due, int | float) or not math.isfinite(due):
        return score
    return min(float(due), score + 1.0)


def enqueue_due(queue, job_class, serializer) -> int:
    """Move scheduled jobs whose time has come onto the queue, as RQ's scheduler does; how many moved."""
    registry = ScheduledJobRegistry(queue.name, connection=queue.connection, job_class=job_class,
                                    serializer=serializer)
    rows = queue.connection.zrangebyscore(registry.key, 0, current_timestamp(), start=0, num=1000, withscores=True)
    if not rows:
        return 0
    ids = [as_text(job_id) for job_id, _ in rows]
    found = job_class.fetch_many(ids, connection=queue.connection, serializer=serializer)
    # RQ files a job under its due time truncated to the second: the precise one, kept in the job's meta
    # (``RETRY_DUE``), keeps a 2 s backoff from coming due after 1.0x s
    clock = now().timestamp()
    due = [(job_id, job) for job_id, job, (_, score) in zip(ids, found, rows, strict=True)
           if job is None or _due_at(job, score) <= clock]
    if not due:
        return 0
    with queue.connection.pipeline() as pipe:
        for job_id, job in due:
            if job is not None:
                queue._enqueue_job(job, pipeline=pipe, at_front=job.should_enqueue_at_front())
            registry.remove(job_id, pipeline=pipe)
        pipe.execute()
    ids = [job_id for job_id, _ in due]
    log.info("re-queued %d job%s due for retry", len(ids), "s" * (len(ids) > 1))
    return len(ids)


def queue_state(queue) -> tuple[int, float, int]:
    """(jobs waiting, age in seconds of the oldest waiting job (0 when none), jobs in the failed registry).

    RQ appends to the queue's list and pops from its head, and stamps ``enqueued_at`` in the job's hash.
    """
    from rq.registry import FailedJobRegistry
    from rq.utils import utcparse

    connection = queue.connection
    with connection.pipeline(transaction=False) as pipe:
        pipe.llen(queue.key)
        pipe.lindex(queue.key, 0)
        pipe.zcard(FailedJobRegistry(queue.name, connection=connection).key)
        depth, head, failed = pipe.execute()
    age = 0.0
    if head is not None:
        stamp = connection.hget(Job.key_for(as_text(head)), "enqueued_at")
        if stamp:
            age = max((now() - utcparse(as_text(stamp))).total_seconds(), 0.0)
    return depth, age, failed
