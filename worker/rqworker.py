"""The steelsight worker: RQ's ``SimpleWorker`` running frame jobs as model micro-batches.

RQ's work loop dequeues one job and calls :meth:`BatchingWorker.execute_job`; from there
the worker claims the jobs waiting behind it, runs them through its engine as one batch
and books each one. Plain successes are booked together (:func:`rq_compat.finish`);
every other job (a failure, a bad payload, a refusal, one with dependents) goes through
RQ's own ``perform_job`` with its outcome attached to the job (:class:`rq_compat.FrameJob`),
so RQ fails, retries and records it as it would any job.

The worker also sets RQ's policies through RQ's hooks:

- ``handle_job_failure``: a refused job is never retried; a failed one is retried after
  ``job_retry_backoff_s``, doubling per attempt, and not after ``job_retry_window_s``.
- ``get_heartbeat_ttl``: a claim lives ``claim_ttl_s`` and is renewed while it waits for
  the model, so a dead worker's jobs are found abandoned within seconds.
- maintenance: every ``reclaim_interval_s``, idle or busy, a pass re-queues abandoned jobs
  and due retries (:mod:`worker.reclaim`); RQ's own registry clean-up, which re-queues
  abandoned jobs too, runs under the same lock (``clean_registries``).
- ``heartbeat``: also beats the health endpoint's :class:`~worker.health.Liveness`, until
  a batch has computed longer than ``job_timeout_s`` per ``batch_size`` model inputs (tiles).
- RQ's loop logs an unhandled exception and returns as if it had finished; :attr:`crash`
  keeps it, so the process can exit non-zero.

Every value comes from the :class:`Settings` the worker is built with.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from rq.exceptions import StopRequested
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from steelsight.contract import Frame, Settings

from . import jobs, metrics, reclaim, rq_compat
from .engine import FrameEngine, tiles_in
from .health import Liveness
from .outcome import Failed, Outcome, Pending, settle

log = logging.getLogger("steelsight.worker")

CLAIM_RENEW_S = 1.0  # how often a waiting claim is renewed; at most a third of claim_ttl_s


@dataclass
class Batch:
    """Jobs claimed together: (job, queue, execution) each, the frames of the valid ones, their downloads."""

    claimed: list = field(default_factory=list)
    frames: dict[str, Frame] = field(default_factory=dict)
    loads: dict = field(default_factory=dict)


# one model call at a time per process, across worker generations (a reconnect makes a new worker)
_COMPUTE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")


class BatchingWorker(SimpleWorker):
    """Takes up to ``batch_size`` waiting jobs and runs them as one model batch, in-process (no fork per job).

    While the queue has work it runs batches back to back in a pipeline: the next
    batch is claimed and its frames fetched while this one computes, topped up with
    frames that arrived meanwhile when the model is free, and this batch's overlays are
    uploaded and its jobs published and booked while the next computes. Redis and S3
    round trips overlap the model instead of adding to it.
    """

    def __init__(self, queues, *, settings: Settings, engine: FrameEngine, liveness: Liveness | None = None,
                 **rq_options):
        rq_options.setdefault("job_class", rq_compat.FrameJob.bound(settings))
        rq_options.setdefault("serializer", JSONSerializer)
        rq_options.setdefault("maintenance_interval", settings.maintenance_interval_s)
        # an idle worker wakes as often as it reclaims abandoned jobs
        rq_options.setdefault("worker_ttl", rq_compat.worker_ttl(settings.reclaim_interval_s))
        super().__init__(queues, **rq_options)
        self.settings, self.engine, self.liveness = settings, engine, liveness
        self.max_batch = max(settings.batch_size, 1)
        self.claimed_heartbeat_s = min(CLAIM_RENEW_S, settings.claim_ttl_s / 3)
        self.crash: BaseException | None = None  # what made RQ's loop quit, if anything did
        self.stalled = False  # the model has held a batch longer than a job may take
        self._last_reclaim = 0.0

    # -- RQ's hooks

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return self.settings.claim_ttl_s

    def handle_job_failure(self, job, queue, started_job_registry=None, exc_string="", execution=None):
        """RQ's, with a refused job never retried and a retry spaced out and bounded in time."""
        retry_window_s = self.settings.job_retry_window_s
        if job.refusal():
            job.retries_left = None
            job.failure_ttl = self.settings.failure_ttl_s  # not the job's own, which may never expire
        elif job.should_retry:
            # failed attempts so far, kept in the job (RQ counts only retries a job asked for itself)
            failed = job.meta.get("failed_attempts", 0) + 1
            delay = self.settings.job_retry_backoff_s * 2 ** (failed - 1)
            job.meta["failed_attempts"] = failed
            job.meta.pop(rq_compat.RETRY_DUE, None)
            waited = (now() - job.created_at).total_seconds() if job.created_at else 0.0
            if waited + delay > retry_window_s:
                log.warning("job %s: not retried, %.0fs after enqueue the retry window of %.0fs is spent",
                            job.id, waited, retry_window_s)
                exc_string += f"\nnot retried: the retry window of {retry_window_s:.0f}s is spent"
                job.retries_left = None
            else:
                job.backoff_s = delay
                job.meta[rq_compat.RETRY_DUE] = time.time() + delay  # RQ's own due time is truncated
            job.save_meta()  # RQ's retry path does not always write meta, and the next delay doubles from it
        super().handle_job_failure(job, queue, started_job_registry=started_job_registry, exc_string=exc_string,
                                   execution=execution)

    def _noting_crash(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (StopRequested, SystemExit):
            raise
        except BaseException as exc:
            self.crash = exc
            raise

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        result = self._noting_crash(super().dequeue_job_and_maintain_ttl, timeout, max_idle_time)
        self.crash = None  # anything its own loop rode out (a Redis blip during maintenance) is over
        return result

    @property
    def should_run_maintenance_tasks(self) -> bool:
        return self._reclaim_due() or super().should_run_maintenance_tasks

    def run_maintenance_tasks(self):
        self._noting_crash(self._maintain)

    def clean_registries(self):
        """RQ's registry clean-up, only while holding each queue's reclaim lock; else skipped until its next loop.

        It re-queues expired claims too. Beside another worker's reclaim pass, both would
        read the same expired claims before either removed them, and queue each job twice.
        """
        with contextlib.ExitStack() as stack:
            if all(stack.enter_context(reclaim.held(queue, self.name)) for queue in self.queues):
                super().clean_registries()

    def heartbeat(self, timeout=None, pipeline=None):
        super().heartbeat(timeout, pipeline)
        if self.liveness is not None and not self.stalled:
            self.liveness.beat()

    def execute_job(self, job, queue):
        self._noting_crash(self._work_batches, job, queue)

    # -- maintenance

    def _maintain(self) -> None:
        self._reclaim()
        if super().should_run_maintenance_tasks:
            super().run_maintenance_tasks()

    def _reclaim_due(self) -> bool:
        return time.monotonic() - self._last_reclaim >= self.settings.reclaim_interval_s

    def _reclaim(self) -> None:
        """Re-queue abandoned and due-for-retry jobs: every ``reclaim_interval_s``, idle or busy."""
        self._last_reclaim = time.monotonic()
        for queue in self.queues:
            reclaim.reclaim(queue, self.name, self.job_class, self.serializer)
        # the queue as alerts see it, idle or busy: a backlog grows while every worker is busy
        depth, oldest_age, failed = rq_compat.queue_state(self.queues[0])
        metrics.QUEUE_DEPTH.set(depth)
        metrics.QUEUE_OLDEST_AGE.set(oldest_age)
        metrics.FAILED_JOBS.set(failed)

    # -- batches

    def _work_batches(self, job, queue) -> None:
        batch = self._claim(queue, Batch(), first=(job, queue))
        running = self._compute(batch)
        while True:
            upcoming = self._claim(queue, Batch())  # fetched while ``batch`` computes
            outcomes = self._outcomes(batch, running, upcoming)
            upcoming = self._claim(queue, upcoming)  # top up with frames that arrived meanwhile
            running = self._compute(upcoming)
            self._finish(batch, outcomes, upcoming)
            if not upcoming.claimed:
                break
            batch = upcoming
            if self.should_run_maintenance_tasks:  # re-queue a dead worker's jobs even while busy
                self._maintain()
        self.set_state(WorkerStatus.IDLE)

    def _claim(self, queue, batch: Batch, first=None) -> Batch:
        """Add ``first`` and waiting jobs (no blocking) up to ``max_batch``; start fetching their frames."""
        dequeued = [first] if first else []
        if not rq_compat.stop_requested(self):
            dequeued += rq_compat.dequeue_waiting(self, queue, self.max_batch - len(batch.claimed) - len(dequeued))
        if not dequeued:
            return batch
        metrics.QUEUE_DEPTH.set(queue.count)
        frames = {}
        executions = rq_compat.start(self, [job for job, _ in dequeued])
        for (job, job_queue), execution in zip(dequeued, executions, strict=True):
            batch.claimed.append((job, job_queue, execution))
            refusal = job.refusal()
            if refusal:  # never computed: RQ fails it through FrameJob's guard
                log.warning("%s", refusal)
                continue
            try:
                frames[job.id] = Frame.model_validate(job.kwargs["frame"])
            except Exception as exc:  # invalid payload: RQ fails the job with this error
                log.warning("job %s has a bad payload: %s", job.id, exc)
                job.outcome = Failed(exc)
        batch.frames.update(frames)
        batch.loads.update(self.engine.prefetch(list(frames.values())) if frames else {})
        return batch

    def _compute(self, batch: Batch):
        """Queue the batch on the model thread; None when it has no valid frame."""
        if not batch.frames:
            return None
        return _COMPUTE.submit(self.engine.compute, list(batch.frames.values()), batch.loads)

    def _wait_alive(self, futures: list, claimed: list, budget_s=None) -> None:
        """Wait for ``futures``; a claimed job waiting its turn must not look abandoned to other workers.

        Past ``budget_s()`` seconds (default ``job_timeout_s``) the worker stops vouching for
        them and for itself: peers reclaim the jobs, and the health endpoint reports the hung loop.
        """
        since = time.monotonic()
        budget_s = budget_s or (lambda: self.settings.job_timeout_s)
        try:
            while wait(futures, timeout=self.claimed_heartbeat_s).not_done:
                self.stalled = time.monotonic() - since > budget_s()
                if self.stalled:
                    continue
                for job, _, execution in claimed:
                    self.maintain_heartbeats(job, execution)
                if self._reclaim_due():
                    self._reclaim()
        finally:
            self.stalled = False

    def _outcomes(self, batch: Batch, running, upcoming: Batch) -> dict[str, Outcome | Pending]:
        """The batch's outcomes once the model is done with it (overlay uploads may still be pending)."""
        if running is None:
            return {}
        # job_timeout_s per batch_size model inputs, counted once the frames are decoded and planned:
        # a batch of wide frames runs about a batch of tiles per frame
        def budget_s() -> float:
            return self.settings.job_timeout_s * max(1.0, tiles_in(batch.loads) / self.max_batch)

        self._wait_alive([running], batch.claimed + upcoming.claimed, budget_s)
        try:
            outcomes = running.result()
        except Exception as exc:  # the whole batch failed: fail (and retry) its jobs, keep the worker
            log.exception("batch of %d frames failed", len(batch.frames))
            outcomes = {frame.job_id: Failed(exc) for frame in batch.frames.values()}
        return {job_id: outcomes[frame.job_id] for job_id, frame in batch.frames.items()}

    def _finish(self, batch: Batch, outcomes: dict[str, Outcome | Pending], upcoming: Batch) -> None:
        """Settle the batch's outcomes, publish its results and book its jobs.

        Plain successes are booked together (:func:`rq_compat.finish`); every other job
        goes through RQ's ``perform_job`` one by one, with its outcome attached.
        """
        self._wait_alive([o.upload for o in outcomes.values() if isinstance(o, Pending)],
                         batch.claimed + upcoming.claimed)
        settled = settle(outcomes)
        for job, _, _ in batch.claimed:  # a job id queued twice was claimed twice: both get its outcome
            if job.id in settled:
                job.outcome = settled[job.id]
        done = [(job, execution, job.outcome.result) for job, _, execution in batch.claimed
                if rq_compat.plain(job, job.outcome)]
        booked = set()
        if done:
            jobs.publish_and_count([result for _, _, result in done], self.connection, self.settings)
            if rq_compat.finish(self, done):
                booked = {job.id for job, _, _ in done}
        for job, queue, execution in batch.claimed:
            if job.id not in booked:
                self.perform_job(job, queue, execution)

