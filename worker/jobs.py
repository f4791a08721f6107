"""The RQ job function, and what a frame job does with its outcome.

Queued jobs name :func:`process_frame` (:data:`steelsight.contract.JOB_FUNCTION`), so
any RQ worker can run them: run by a plain ``SimpleWorker`` it computes its one frame
with an engine built from :func:`get_settings` once per process. The batching worker
(:mod:`worker.rqworker`) computes whole batches itself and attaches each job's outcome
to the job (:class:`worker.rq_compat.FrameJob`), so for its jobs RQ never calls this
function. Both paths end in :func:`conclude`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache

from rq import get_current_job

from steelsight.clients import REDIS_TRANSIENT
from steelsight.contract import CAMERA_REASONS, REJECTED, Frame, FrameResult, Settings, get_settings
from steelsight.retry import with_backoff

from . import metrics, sampling, sinks
from .engine import FrameEngine, build_engine
from .outcome import Done, Failed, Outcome, settle


class RefusedJob(RuntimeError):
    """A job that names any function other than :data:`JOB_FUNCTION`, or carries what the producer never sets."""


# record, stream entry and event-sink outbox entries in one atomic step: a worker killed between two
# separate commands would leave a record whose stream entry (or event) no retry ever writes.
# KEYS[3..]: an outbox and its dropped-events counter per sink; a full outbox takes no more (counted).
PUBLISH_ONCE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'result', ARGV[1])
  for i = 3, #KEYS, 2 do
    if redis.call('XLEN', KEYS[i]) < tonumber(ARGV[4]) then
      redis.call('XADD', KEYS[i], '*', 'result', ARGV[1])
    else
      redis.call('INCR', KEYS[i + 1])
    end
  end
  return 1
end
return 0
"""


def publish(result: FrameResult, connection, settings: Settings) -> bool:
    """Per-frame record (first write wins) and one stream entry; True when newly written."""
    return publish_many([result], connection, settings)[0]


def publish_many(results: list[FrameResult], connection, settings: Settings) -> list[bool]:
    """:func:`publish` for a batch in one round trip; safe to repeat, as each write happens once."""
    payloads = [(settings.result_key(r.job_id), r.model_dump_json(), sinks.outbox_keys(settings, r)) for r in results]

    def write() -> list[bool]:
        with connection.pipeline(transaction=False) as pipe:
            for key, payload, outboxes in payloads:
                pipe.eval(PUBLISH_ONCE, 2 + len(outboxes), key, settings.results_stream, *outboxes, payload,
                          settings.result_ttl_s, settings.stream_maxlen, settings.sink_queue_max)
            return [bool(written) for written in pipe.execute()]

    what = f"publish result {results[0].job_id}" + (f" and {len(results) - 1} more" if len(results) > 1 else "")
    return with_backoff(write, what, REDIS_TRANSIENT, attempts=6)


def publish_and_count(results: list[FrameResult], connection, settings: Settings) -> None:
    """Publish, count each newly written result in the worker's metrics, and offer it for review."""
    fresh = [result for result, new in zip(results, publish_many(results, connection, settings), strict=True) if new]
    for result in fresh:
        _count(result)
    sampling.offer(connection, settings, fresh)


def _count(result: FrameResult) -> None:
    line, camera = metrics.line_camera(result.line_id, result.camera_id)
    metrics.FRAMES.labels(status=result.status, label=result.label or "none").inc()
    metrics.VERDICTS.labels(line=line, camera=camera, verdict=result.verdict).inc()
    metrics.END_TO_END_SECONDS.labels(line=line, camera=camera).observe(
        (datetime.now(UTC) - result.captured_at).total_seconds())
    if result.status == REJECTED:
        metrics.REJECTED.labels(line=line, camera=camera, reason=metrics.reason_label(result.reason)).inc()
        return
    if result.unknown:
        reason = metrics.reason_label(result.unknown_reason)
        metrics.UNKNOWN.labels(line=line, camera=camera, reason=reason).inc()
        if result.unknown_reason in CAMERA_REASONS:  # a camera fault: the quality gate or the camera bank
            metrics.QUALITY_FLAGS.labels(line=line, camera=camera, issue=reason).inc()
    if result.confidence is not None:
        metrics.CONFIDENCE.labels(line=line).observe(result.confidence)


def conclude(outcome: Outcome, connection, settings: Settings) -> dict:
    """What RQ records for the job: a published result's JSON, or the job's error raised (and counted)."""
    if isinstance(outcome, Failed):
        metrics.FAILURES.labels(reason=type(outcome.error).__name__).inc()
        raise outcome.error
    if not isinstance(outcome, Done):
        raise TypeError(f"an engine answered {outcome!r}, not a Done or Failed outcome")
    publish_and_count([outcome.result], connection, settings)
    return outcome.result.model_dump(mode="json")


@lru_cache(maxsize=1)
def plain_engine() -> FrameEngine:
    """The engine of a plain RQ worker: loaded on its first job and kept for the process."""
    return build_engine(get_settings())


def process_frame(frame: dict) -> dict:
    job = get_current_job()
    parsed = Frame.model_validate(frame)
    if job is None or parsed.job_id != job.id:  # its result would land under another frame's id
        raise RefusedJob(f"refusing job {job and job.id}: its payload is frame {parsed.job_id}")
    outcome = settle(plain_engine().compute([parsed]))[parsed.job_id]
    return conclude(outcome, job.connection, get_settings())
