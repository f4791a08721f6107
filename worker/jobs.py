"""The RQ job function and the per-process handoff from the batching worker.

``BatchingWorker`` runs a whole micro-batch through the engine and books its plain
successes itself (:mod:`worker.booking`). Every other outcome it parks here under
its job id and lets RQ perform that job as usual, so failures, retries and
callbacks behave exactly as for any RQ job.
"""

from __future__ import annotations

from datetime import UTC, datetime

from rq import get_current_job
from rq.job import Job

from steelsight.clients import REDIS_TRANSIENT
from steelsight.contract import JOB_FUNCTION, Frame, FrameResult, Settings, get_settings
from steelsight.retry import with_backoff

from . import metrics

_engine = None
_settings: Settings | None = None
_precomputed: dict[str, FrameResult | Exception] = {}


class RefusedJob(RuntimeError):
    """A job that names any function other than :data:`JOB_FUNCTION`."""


class FrameJob(Job):
    """Executes only the frame job: a JSON payload cannot name another callable."""

    def _execute(self):
        if self.func_name != JOB_FUNCTION:
            raise RefusedJob(f"refusing to run {self.func_name!r}: this queue only runs {JOB_FUNCTION}")
        return super()._execute()


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
