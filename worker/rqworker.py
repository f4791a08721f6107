"""RQ worker variants: each overrides one hook of SimpleWorker."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from rq.exceptions import StopRequested
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from steelsight.contract import Frame

from . import booking, jobs, metrics, reclaim
from .engine import settle
from .health import Liveness

log = logging.getLogger("steelsight.worker")


class FrameWorker(SimpleWorker):
    """Runs jobs in-process next to the model loaded once at start (no fork per job)."""

    heartbeat_grace_s = 15
    max_batch = 1
    retry_backoff_s = 5.0
    retry_window_s = 600.0
    reclaim_interval_s = 1.0
    crash: BaseException | None = None  # what made RQ's loop quit, if anything did
    liveness: Liveness | None = None

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        # short TTL: a SIGKILLed worker's jobs are found abandoned and re-queued quickly
        return int(job.timeout or 60) + self.heartbeat_grace_s

    def handle_job_failure(self, job, queue, started_job_registry=None, exc_string="", execution=None):
        """RQ's, with a refused job never retried and a retry spaced out and bounded in time."""
        if jobs.FrameJob.refusal(job):
            job.retries_left = None
            job.failure_ttl = jobs.settings().failure_ttl_s  # not the job's own, which may never expire
        elif job.should_retry:
            # failed attempts so far, kept in the job (RQ counts only retries a job asked for itself)
            failed = job.meta.get("failed_attempts", 0) + 1
            job.meta["failed_attempts"] = failed
            job.save_meta()  # RQ's retry path does not always write meta, and the next delay doubles from it
            delay = self.retry_backoff_s * 2 ** (failed - 1)
            waited = (now() - job.created_at).total_seconds() if job.created_at else 0.0
            if waited + delay > self.retry_window_s:
                log.warning("job %s: not retried, %.0fs after enqueue the retry window of %.0fs is spent",
                            job.id, waited, self.retry_window_s)
                exc_string += f"\nnot retried: the retry window of {self.retry_window_s:.0f}s is spent"
                job.retries_left = None
            else:
                job.backoff_s = delay
        super().handle_job_failure(job, queue, started_job_registry=started_job_registry, exc_string=exc_string,
                                   execution=execution)

    # RQ's loop logs an unhandled exception and returns as if it had finished; note it so the process can say so
    def _noting_crash(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (StopRequested, SystemExit):
            raise
        except BaseException as exc:
            self.crash = exc
            raise

    def execute_job(self, job, queue):
        return self._noting_crash(super().execute_job, job, queue)

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        result = self._noting_crash(super().dequeue_job_and_maintain_ttl, timeout, max_idle_time)
        self.crash = None  # anything its own loop rode out (a Redis blip during maintenance) is over
        return result

    @property
    def should_run_maintenance_tasks(self) -> bool:
        return self._reclaim_due() or super().should_run_maintenance_tasks

    def run_maintenance_tasks(self):
        self._noting_crash(self._maintain)

    def _maintain(self) -> None:
        self._reclaim()
        if super().should_run_maintenance_tasks:
            super().run_maintenance_tasks()

    _last_reclaim = 0.0

    def _reclaim_due(self) -> bool:
        return time.monotonic() - self._last_reclaim >= self.reclaim_interval_s

    def _reclaim(self) -> None:
        """Re-queue abandoned and due-for-retry jobs: every ``reclaim_interval_s``, idle or busy."""
        self._last_reclaim = time.monotonic()
        for queue in self.queues:
            reclaim.reclaim(queue, self.name, self.job_class, self.serializer)

    def heartbeat(self, timeout=None, pipeline=None):
        super().heartbeat(timeout, pipeline)
        if self.liveness is not None and not self.stalled:
            self.liveness.beat()

    stalled = False  # the model has held a batch longer than a job may take


@dataclass
class Batch:
    """Jobs claimed together: (job, queue, execution) each, the frames of the valid ones, their downloads."""

    claimed: list = field(default_factory=list)
    frames: dict[str, Frame] = field(default_factory=dict)
    loads: dict = field(default_factory=dict)


# one model call at a time per process, across worker generations (a reconnect makes a new worker)
_COMPUTE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")


class BatchingWorker(FrameWorker):
    """Takes up to ``max_batch`` waiting jobs and runs them as one model batch.

    While the queue has work it runs batches back to back in a pipeline: the next
    batch is claimed and its frames fetched while this one computes, topped up with
    frames that arrived meanwhile when the model is free, and this batch's overlays are
    uploaded and its jobs published and booked while the next computes. Redis and S3
    round trips overlap the model instead of adding to it.
    """

    max_batch = 8
    claim_ttl_s = 6  # a claimed job's heartbeat lives this long; renewed every claimed_heartbeat_s
    claimed_heartbeat_s = 1.0
    stall_after_s = 60.0  # a batch computing longer than this stops the worker's heartbeats

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        # a batching worker renews its claims while they wait, so a dead one's expire within seconds
        return self.claim_ttl_s

    def execute_job(self, job, queue):
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
        if not self._stop_requested:
            dequeued += booking.dequeue_waiting(self, queue, self.max_batch - len(batch.claimed) - len(dequeued))
        if not dequeued:
            return batch
        metrics.QUEUE_DEPTH.set(queue.count)
        frames = {}
        executions = booking.start(self, [job for job, _ in dequeued])
        for (job, job_queue), execution in zip(dequeued, executions, strict=True):
            batch.claimed.append((job, job_queue, execution))
            refusal = jobs.FrameJob.refusal(job)
            if refusal:  # never computed: perform_job fails it through FrameJob's guard
                log.warning("%s", refusal)
                continue
            try:
                frames[job.id] = Frame.model_validate(job.kwargs["frame"])
            except Exception as exc:  # invalid payload: perform_job fails that job
                log.warning("job %s has a bad payload: %s", job.id, exc)
        batch.frames.update(frames)
        batch.loads.update(jobs.engine().prefetch(list(frames.values())) if frames else {})
        return batch

    def _compute(self, batch: Batch):
        """Queue the batch on the model thread; None when it has no valid frame."""
        if not batch.frames:
            return None
        return _COMPUTE.submit(jobs.engine().compute, list(batch.frames.values()), batch.loads)

    def _wait_alive(self, futures: list, claimed: list) -> None:
        """Wait for ``futures``; a claimed job waiting its turn must not look abandoned to other workers.

        Past ``stall_after_s`` the worker stops vouching for them and for itself: peers
        reclaim the jobs, and the health endpoint reports the hung loop.
        """
        since = time.monotonic()
        try:
            while wait(futures, timeout=self.claimed_heartbeat_s).not_done:
                self.stalled = time.monotonic() - since > self.stall_after_s
                if self.stalled:
                    continue
                for job, _, execution in claimed:
                    self.maintain_heartbeats(job, execution)
                if self._reclaim_due():
                    self._reclaim()
        finally:
            self.stalled = False

    def _outcomes(self, batch: Batch, running, upcoming: Batch) -> dict:
        """The batch's outcomes once the model is done with it (overlay uploads may still run)."""
        if running is None:
            return {}
        self._wait_alive([running], batch.claimed + upcoming.claimed)
        try:
            outcomes = running.result()
        except Exception as exc:  # the whole batch failed: fail (and retry) its jobs, keep the worker
            log.exception("batch of %d frames failed", len(batch.frames))
            outcomes = {frame.job_id: exc for frame in batch.frames.values()}
        return {job_id: outcomes[frame.job_id] for job_id, frame in batch.frames.items()}

    def _finish(self, batch: Batch, outcomes: dict, upcoming: Batch) -> None:
        """Wait for the batch's overlay uploads, publish its results and book its jobs.

        Plain successes are booked together (:mod:`worker.booking`); the rest (failures,
        bad payloads, jobs RQ must do more for) go through RQ's ``perform_job`` one by one.
        """
        self._wait_alive([o for o in outcomes.values() if isinstance(o, Future)], batch.claimed + upcoming.claimed)
        outcomes = settle(outcomes)
        done = [(job, execution, outcomes[job.id]) for job, _, execution in batch.claimed
                if booking.plain(job, outcomes.get(job.id))]
        if done:
            jobs.publish_and_count([result for _, _, result in done], self.connection, jobs.settings())
            if booking.finish(self, done):
                booked = {job.id for job, _, _ in done}
                outcomes = {job_id: o for job_id, o in outcomes.items() if job_id not in booked}
        jobs.park(outcomes)
        try:
            for job, queue, execution in batch.claimed:
                if job.id in outcomes or job.id not in batch.frames:
                    self.perform_job(job, queue, execution)
        finally:
            jobs.discard(outcomes)
