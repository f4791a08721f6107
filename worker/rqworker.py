"""RQ worker variants: each overrides one hook of SimpleWorker."""

from __future__ import annotations

import logging

from rq.worker import SimpleWorker, WorkerStatus

from steelsight.contract import Frame

from . import jobs, metrics

log = logging.getLogger("steelsight.worker")


class FrameWorker(SimpleWorker):
    """Runs jobs in-process next to the model loaded once at start (no fork per job)."""

    heartbeat_grace_s = 15
    max_batch = 1

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        # short TTL: a SIGKILLed worker's jobs are found abandoned and re-queued quickly
        return int(job.timeout or 60) + self.heartbeat_grace_s


class BatchingWorker(FrameWorker):
    """Takes up to ``max_batch`` waiting jobs and runs them as one model batch."""

    max_batch = 8

    def execute_job(self, job, queue):
        batch = [(job, queue, self.prepare_execution(job))]
        while len(batch) < self.max_batch:
            more = self.queue_class.dequeue_any([queue], None, connection=self.connection,
                                                job_class=self.job_class, serializer=self.serializer)
            if more is None:
                break
            batch.append((more[0], more[1], self.prepare_execution(more[0])))
        metrics.QUEUE_DEPTH.set(queue.count)
        frames = {}
        for batch_job, _, _ in batch:
            try:
                if batch_job.func_name == jobs.JOB_FUNCTION:
                    frames[batch_job.id] = Frame.model_validate(batch_job.kwargs["frame"])
            except Exception as exc:  # undecodable or invalid payload: perform_job fails that job
                log.warning("job %s has a bad payload: %s", batch_job.id, exc)
        if frames:
            try:
                outcomes = jobs.engine().process(list(frames.values()))
            except Exception as exc:  # the whole batch failed: fail (and retry) its jobs, keep the worker
                log.exception("batch of %d frames failed", len(frames))
                outcomes = {frame.job_id: exc for frame in frames.values()}
            jobs.park({job_id: outcomes[frame.job_id] for job_id, frame in frames.items()})
        try:
            for batch_job, batch_queue, execution in batch:
                self.perform_job(batch_job, batch_queue, execution)
        finally:
            jobs.discard(frames)
        self.set_state(WorkerStatus.IDLE)

