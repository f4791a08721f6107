"""The RQ job function and the per-process handoff from the batching worker.

``BatchingWorker`` runs a whole micro-batch through the engine and books its plain
successes itself (:mod:`worker.booking`). Every other outcome it parks here under
its job id and lets RQ perform that job as usual, so failures, retries and
callbacks behave exactly as for any RQ job.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from rq import Queue, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.utils import as_text, decode_redis_hash

from steelsight.clients import REDIS_TRANSIENT
from steelsight.contract import JOB_FUNCTION, Frame, FrameResult, Settings, get_settings
from steelsight.retry import with_backoff

from . import metrics

log = logging.getLogger("steelsight.worker")

_engine = None
_settings: Settings | None = None
_precomputed: dict[str, FrameResult | Exception] = {}


class RefusedJob(RuntimeError):
    """A job that names any function other than :data:`JOB_FUNCTION`, or carries what the producer never sets."""


class FrameJob(Job):
    """Executes only the frame job: a JSON payload cannot name another callable.

    RQ imports and calls a job's callbacks and sends its webhooks from names and URLs
    in the job hash, whoever wrote it. The producer sets none of them, nor dependencies,
    so a job carrying any is refused, and this class never imports a callback or sends
    a webhook, whatever path (failure, abandonment) the job takes through RQ.
    """

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
            kept = unreadable_key(self.id)
            log.error("unreadable job %s set aside as %s: %s: %s; fields %s", self.id, kept, type(exc).__name__, exc,
                      fields)
            metrics.FAILURES.labels(reason="UnreadableJob").inc()
            # kept for inspection under a key RQ never reads, expiring like a failed job
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.rename(self.key, kept)
                pipe.expire(kept, settings().failure_ttl_s)
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
        s = settings()
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

    backoff_s = 0.0  # set by the worker on a failed attempt; an abandoned job (fresh fetch) is re-queued at once

    def get_retry_interval(self) -> float:
        return self.backoff_s

    def _execute(self):
        refusal = self.refusal()
        if refusal:
            raise RefusedJob(refusal)
        return super()._execute()


def unreadable_key(job_id: str) -> str:
    """Where a job hash RQ cannot parse is kept, out of RQ's way."""
    return f"{settings().key_prefix}:unreadable-job:{job_id}"


def _beyond(ttl: int | None, limit: int) -> bool:
    """A TTL that never expires (negative) or outlives ``limit``; None is RQ's finite default."""
    return ttl is not None and (ttl < 0 or ttl > limit)


def install(engine, settings: Settings) -> None:
    global _engine, _settings
    _engine, _settings = engine, settings


def park(outcomes: dict[str, FrameResult | Exception]) -> None:
    _precomputed.update(outcomes)


def discard(job_ids) -> None:
    for job_id in job_ids:
        _precomputed.pop(job_id, None)


def settings() -> Settings:
    return _settings or get_settings()


def engine():
    if _engine is None:  # run by a plain `rq worker`: build the engine once, lazily
        from .service import build_engine

        install(build_engine(get_settings()), get_settings())
    return _engine


# record and stream entry in one atomic step: a worker killed between two separate
# commands would leave a record whose stream entry no retry ever writes
PUBLISH_ONCE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'result', ARGV[1])
  return 1
end
return 0
"""


def publish(result: FrameResult, connection, settings: Settings) -> bool:
    """Per-frame record (first write wins) and one stream entry; True when newly written."""
    return publish_many([result], connection, settings)[0]


def publish_many(results: list[FrameResult], connection, settings: Settings) -> list[bool]:
    """:func:`publish` for a batch in one round trip; safe to repeat, as each write happens once."""
    payloads = [(settings.result_key(r.job_id), r.model_dump_json()) for r in results]

    def write() -> list[bool]:
        with connection.pipeline(transaction=False) as pipe:
            for key, payload in payloads:
                pipe.eval(PUBLISH_ONCE, 2, key, settings.results_stream, payload, settings.result_ttl_s,
                          settings.stream_maxlen)
            return [bool(written) for written in pipe.execute()]

    what = f"publish result {results[0].job_id}" + (f" and {len(results) - 1} more" if len(results) > 1 else "")
    return with_backoff(write, what, REDIS_TRANSIENT, attempts=6)


def publish_and_count(results: list[FrameResult], connection, settings: Settings) -> None:
    """Publish, and count each newly written result in the worker's metrics."""
    for result, new in zip(results, publish_many(results, connection, settings), strict=True):
        if new:
            _count(result)


def _count(result: FrameResult) -> None:
    metrics.FRAMES.labels(status=result.status, label=result.label or "none").inc()
    metrics.END_TO_END_SECONDS.observe((datetime.now(UTC) - result.captured_at).total_seconds())


def process_frame(frame: dict) -> dict:
    job = get_current_job()
    parsed = Frame.model_validate(frame)
    job_id = job.id if job is not None else parsed.job_id
    outcome = _precomputed.pop(job_id, None)
    if outcome is None:
        outcome = engine().process([parsed])[parsed.job_id]
    if isinstance(outcome, Exception):
        metrics.FAILURES.labels(reason=type(outcome).__name__).inc()
        raise outcome
    publish_and_count([outcome], job.connection, settings())
    return outcome.model_dump(mode="json")
