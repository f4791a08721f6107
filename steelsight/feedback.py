"""Operator feedback on verdicts, and the review queue that active sampling fills.

A mark (:class:`~steelsight.contract.Feedback`) is written to the object store first: a copy of the
frame under ``feedback/<line>/<camera>/<job_id>.<ext>`` in ``library_bucket`` (no expiry) with its
provenance JSON beside it. That is the durable record ``steelsight dataset export`` reads. Redis then
gets the index the dashboard lists and filters (a sorted set by time plus one JSON per frame, no
TTL); :func:`reindex` rebuilds it from the store. Used by the dashboard, the worker (active sampling
calls :func:`enqueue_for_review`) and the CLI; nothing here imports the dashboard.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

from steelsight.clients import MissingObject, ObjectStore
from steelsight.contract import (
    ANONYMOUS_OPERATOR,
    CLEAN_CLASS,
    CONTENT_TYPES,
    FEEDBACK_NOTE_MAX,
    FEEDBACK_PREFIX,
    IMAGE_EXTENSIONS,
    JOB_ID_SEPARATOR,
    UPLOAD_CAMERA,
    UPLOAD_LINE,
    Feedback,
    FeedbackSource,
    FrameResult,
    ReviewItem,
    ReviewReason,
    Settings,
    Timings,
    feedback_classes,
    feedback_lock_key,
    feedback_object_key,
    review_count_key,
)
from steelsight.model.inference.labels import CLASSES
from steelsight.model.inference.tiling import BACKGROUND

OPERATOR_MAX = 100  # characters of an operator name kept
LOCK_TTL_MS = 10_000  # a writer that died holding a frame's lock frees it after this long
LOCK_WAIT_S = 5.0
COUNT_TTL_S = 2 * 3600  # an hour's review counter outlives its hour, then goes
LABELLED, DISMISSED = "labelled", "dismissed"  # what a review item key holds once it no longer waits


class FeedbackError(ValueError):
    """The mark cannot be recorded as asked (bad class, note too long, frame gone); nothing was written."""


# -- recording -------------------------------------------------------------------------------------------------

def upload_frame_id(data: bytes) -> str:
    """An upload's frame id: its bytes' hash, so marking the same file again replaces the earlier mark."""
    return "u" + hashlib.sha256(data).hexdigest()[:40]


def upload_result(frame_id: str, name: str, label: str, confidence: float, *, unknown: bool = False,
                  unknown_reason: str | None = None, probabilities: dict[str, float] | None = None,
                  checkpoint_sha256: str = "", now: datetime | None = None) -> FrameResult:
    """The dashboard's verdict on an uploaded file (``frame_id``: :func:`upload_frame_id` of its bytes), as a
    result filed under line ``upload``, camera ``dashboard``."""
    _extension(name)  # refused here already: a copy of unknown type could not be trained on
    now = now or datetime.now(UTC)
    return FrameResult(frame_id=frame_id, job_id=JOB_ID_SEPARATOR.join((UPLOAD_LINE, UPLOAD_CAMERA, frame_id)),
                       line_id=UPLOAD_LINE, camera_id=UPLOAD_CAMERA, captured_at=now, status="ok", label=label,
                       confidence=confidence, probabilities=probabilities or {}, unknown=unknown,
                       unknown_reason=unknown_reason, frame_key="", timings=Timings(queue_wait_s=0, inference_s=0,
                                                                                    total_s=0),
                       checkpoint_sha256=checkpoint_sha256, finished_at=now)


def _extension(name: str) -> str:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext not in IMAGE_EXTENSIONS:
        raise FeedbackError(f"{name!r}: the file name has no image extension ({', '.join(IMAGE_EXTENSIONS)}), so the "
                            "copy could not be typed")
    return ext


def verdict_class(result: FrameResult) -> str | None:
    """The class a verdict claims: its own for a class, ``clean`` for background (margin only); None for an
    unknown or rejected frame, which names no class."""
    verdict = result.verdict
    if verdict in CLASSES:
        return verdict
    return CLEAN_CLASS if verdict == BACKGROUND else None


def resolve_true_class(result: FrameResult, correct: bool, true_class: str | None) -> str:
    """The true class a mark records; raises :class:`FeedbackError` when it contradicts ``correct``."""
    true_class = true_class or None
    if true_class is not None and true_class not in feedback_classes():
        raise FeedbackError(f"true class {true_class!r} is not one of {', '.join(feedback_classes())}")
    claimed = verdict_class(result)
    if correct:
        if true_class is None and claimed is None:
            raise FeedbackError(f"a verdict of {result.verdict!r} names no class: choose the true class")
        if true_class is not None and claimed is not None and true_class != claimed:
            raise FeedbackError(f"marked right, but the true class {true_class!r} is not the verdict "
                                f"{result.verdict!r}: mark it wrong")
        return true_class or claimed
    if true_class is None:
        raise FeedbackError("marked wrong: choose the true class")
    if true_class == claimed:
        raise FeedbackError(f"marked wrong, but the true class is the verdict's ({true_class!r}): mark it right")
    return true_class


def operator_name(name: str | None) -> str:
    return (name or "").strip()[:OPERATOR_MAX] or ANONYMOUS_OPERATOR


def record(store: ObjectStore, connection, settings: Settings, result: FrameResult, *, correct: bool,
           true_class: str | None = None, note: str = "", operator: str | None = None,
           source: FeedbackSource = "live", review_reason: ReviewReason | None = None,
           frame_bytes: bytes | None = None, file_name: str | None = None, now: datetime | None = None) -> Feedback:
    """Store a mark on ``result``: the frame copied to the library with its provenance, then the Redis index.

    ``frame_bytes`` is an upload's content (a live frame is read from the frames bucket). Marking a
    frame again replaces its earlier mark. Raises :class:`FeedbackError` before writing anything
    when the mark is invalid or the frame is gone.
    """
    note = note or ""
    if len(note) > FEEDBACK_NOTE_MAX:
        raise FeedbackError(f"the note has {len(note)} characters; at most {FEEDBACK_NOTE_MAX}")
    resolved = resolve_true_class(result, correct, true_class)
    if source == "review" and review_reason is None:
        raise FeedbackError("a mark from the review queue needs the reason the frame was queued")
    if frame_bytes is None:
        if not result.frame_key:
            raise FeedbackError(f"{result.job_id}: no frame key and no bytes to keep")
        frame_bytes = _frame_bytes(store, settings, result.frame_key)
        ext = _extension(result.frame_key)
    else:
        ext = _extension(file_name or result.frame_key)
        if result.line_id == UPLOAD_LINE and upload_frame_id(frame_bytes) != result.frame_id:
            raise FeedbackError("these bytes are not the file the verdict was given on")
    key = feedback_object_key(result.line_id, result.camera_id, result.job_id, ext)
    mark = Feedback(
        job_id=result.job_id, frame_id=result.frame_id, line_id=result.line_id, camera_id=result.camera_id,
        captured_at=result.captured_at, frame_key=result.frame_key, file_name=file_name, feedback_key=key,
        content_sha256=hashlib.sha256(frame_bytes).hexdigest(), verdict=result.verdict, label=result.label,
        confidence=result.confidence, unknown=result.unknown, unknown_reason=result.unknown_reason,
        checkpoint_sha256=result.checkpoint_sha256, correct=correct, true_class=resolved, note=note,
        operator=operator_name(operator), created_at=now or datetime.now(UTC), source=source,
        review_reason=review_reason)
    payload = mark.model_dump_json()
    with _FrameLock(connection, settings, result.job_id):
        # the store first: the index never names a mark whose frame and provenance are not kept
        store.put(settings.library_bucket, key, frame_bytes, CONTENT_TYPES[ext])
        store.put(settings.library_bucket, mark.json_key, payload.encode(), "application/json")
        with connection.pipeline(transaction=True) as pipe:
            pipe.set(settings.feedback_key(mark.job_id), payload)
            pipe.zadd(settings.feedback_index_key, {mark.job_id: mark.created_at.timestamp()})
            # a frame marked anywhere waits in the review queue no longer
            pipe.zrem(settings.review_queue_key, mark.job_id)
            pipe.set(settings.review_item_key(mark.job_id), LABELLED, xx=True)
            pipe.execute()
    return mark


def _frame_bytes(store: ObjectStore, settings: Settings, frame_key: str) -> bytes:
    try:
        data = store.get(settings.frames_bucket, frame_key, settings.max_frame_bytes)
    except MissingObject as exc:
        raise FeedbackError(
            f"the frame {frame_key} is no longer in {settings.frames_bucket} (frames expire after "
            f"{settings.object_expiry} days, STEELSIGHT_OBJECT_EXPIRY_DAYS): nothing was recorded") from exc
    if len(data) > settings.max_frame_bytes:
        raise FeedbackError(f"the frame {frame_key} is larger than STEELSIGHT_MAX_FRAME_BYTES")
    return data


class _FrameLock:
    """One writer per frame at a time, so the store's provenance and the Redis index agree on the last mark."""

    _RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

    def __init__(self, connection, settings: Settings, job_id: str):
        self.connection, self.key, self.token = connection, feedback_lock_key(settings, job_id), uuid.uuid4().hex

    def __enter__(self):
        deadline = time.monotonic() + LOCK_WAIT_S
        while not self.connection.set(self.key, self.token, nx=True, px=LOCK_TTL_MS):
            if time.monotonic() > deadline:
                raise FeedbackError("another mark on this frame is being written; try again")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.connection.eval(self._RELEASE, 1, self.key, self.token)


def get(connection, settings: Settings, job_id: str) -> Feedback | None:
    """The frame's current (not undone) mark, from the index."""
    raw = connection.get(settings.feedback_key(job_id))
    return Feedback.model_validate_json(raw) if raw else None


def undo(store: ObjectStore, connection, settings: Settings, job_id: str, operator: str | None = None,
         now: datetime | None = None) -> Feedback:
    """Take a mark back: off the index (and out of exports); its JSON in the store stays, marked undone."""
    with _FrameLock(connection, settings, job_id):
        mark = get(connection, settings, job_id)
        if mark is None:
            raise FeedbackError(f"{job_id} has no mark to undo")
        mark = mark.model_copy(update={"undone_at": now or datetime.now(UTC), "undone_by": operator_name(operator)})
        store.put(settings.library_bucket, mark.json_key, mark.model_dump_json().encode(), "application/json")
        with connection.pipeline(transaction=True) as pipe:
            pipe.zrem(settings.feedback_index_key, job_id)
            pipe.delete(settings.feedback_key(job_id))
            pipe.execute()
    return mark


# -- reading ---------------------------------------------------------------------------------------------------

def list_feedback(connection, settings: Settings, *, line: str | None = None, true_class: str | None = None,
                  source: str | None = None, correct: bool | None = None, limit: int | None = None
                  ) -> list[Feedback]:
    """Current marks, newest first, narrowed by line, true class, source and right/wrong."""
    ids = connection.zrevrange(settings.feedback_index_key, 0, -1)
    out: list[Feedback] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for raw in connection.mget([settings.feedback_key(i.decode()) for i in chunk]):
            if raw is None:  # undone between the two reads
                continue
            mark = Feedback.model_validate_json(raw)
            if ((line is None or mark.line_id == line) and (true_class is None or mark.true_class == true_class)
                    and (source is None or mark.source == source) and (correct is None or mark.correct == correct)):
                out.append(mark)
                if limit is not None and len(out) >= limit:
                    return out
    return out


@dataclass(frozen=True)
class Rate:
    key: str  # a line, or the verdict's class
    reviewed: int
    wrong: int

    @property
    def rate(self) -> float:
        return self.wrong / self.reviewed if self.reviewed else 0.0


def correction_rates(marks: list[Feedback]) -> dict[str, list[Rate]]:
    """Share of reviewed frames marked wrong, per line and per verdict (the model's word, so a class's rate is
    how often the model is wrong when it says that class)."""
    out = {}
    for name, key in (("line", lambda m: m.line_id), ("class", lambda m: m.verdict)):
        reviewed = Counter(key(m) for m in marks)
        wrong = Counter(key(m) for m in marks if not m.correct)
        out[name] = [Rate(k, reviewed[k], wrong[k]) for k in sorted(reviewed)]
    return out


def read_library(store: ObjectStore, settings: Settings, include_undone: bool = False) -> list[Feedback]:
    """Every mark's provenance JSON from the store (the durable copy), sorted by job id."""
    if not store.client.bucket_exists(settings.library_bucket):
        return []
    marks = []
    for key in store.list_keys(settings.library_bucket, FEEDBACK_PREFIX):
        if key.endswith(".json"):
            mark = Feedback.model_validate_json(store.get(settings.library_bucket, key))
            if include_undone or mark.undone_at is None:
                marks.append(mark)
    return sorted(marks, key=lambda m: m.job_id)


def reindex(store: ObjectStore, connection, settings: Settings) -> int:
    """Rebuild the Redis index from the store's provenance JSONs (after Redis lost it); returns the marks indexed."""
    marks = read_library(store, settings)
    with connection.pipeline(transaction=True) as pipe:
        pipe.delete(settings.feedback_index_key)
        for mark in marks:
            pipe.set(settings.feedback_key(mark.job_id), mark.model_dump_json())
            pipe.zadd(settings.feedback_index_key, {mark.job_id: mark.created_at.timestamp()})
        pipe.execute()
    return len(marks)


# -- review queue ----------------------------------------------------------------------------------------------

# KEYS: item, hour counter, queue, the frame's feedback; ARGV: item JSON, bound, counter TTL, score, job id.
# One script, so concurrent workers can neither queue a frame twice nor pass the line's bound.
_ENQUEUE = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local sent = tonumber(redis.call('GET', KEYS[2]) or '0')
if sent >= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
return 1
"""


def enqueue_for_review(connection, settings: Settings, result: FrameResult, reason: ReviewReason,
                       now: datetime | None = None) -> bool:
    """Send a frame to the review queue; False when it was queued (or marked) before, or its line has sent
    ``review_max_per_line_hour`` frames this clock hour (UTC)."""
    now = now or datetime.now(UTC)
    item = ReviewItem(result=result, reason=reason, queued_at=now)
    hour = now.astimezone(UTC).strftime("%Y%m%d%H")
    keys = (settings.review_item_key(result.job_id), review_count_key(settings, result.line_id, hour),
            settings.review_queue_key, settings.feedback_key(result.job_id))
    sent = connection.eval(_ENQUEUE, len(keys), *keys, item.model_dump_json(), settings.review_max_per_line_hour,
                           COUNT_TTL_S, now.timestamp(), result.job_id)
    return bool(sent)


def list_review(connection, settings: Settings, *, line: str | None = None, limit: int | None = None
                ) -> list[ReviewItem]:
    """Frames waiting for a label, oldest first (so none waits for ever behind newer ones)."""
    ids = connection.zrange(settings.review_queue_key, 0, -1)
    out: list[ReviewItem] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for raw in connection.mget([settings.review_item_key(i.decode()) for i in chunk]):
            if raw is None or raw in (LABELLED.encode(), DISMISSED.encode()):
                continue
            item = ReviewItem.model_validate_json(raw)
            if line is None or item.result.line_id == line:
                out.append(item)
                if limit is not None and len(out) >= limit:
                    return out
    return out


def label_review(store: ObjectStore, connection, settings: Settings, item: ReviewItem, *, correct: bool,
                 true_class: str | None = None, note: str = "", operator: str | None = None) -> Feedback:
    """Label a queued frame: a mark with source ``review``; the frame leaves the pending queue for good."""
    return record(store, connection, settings, item.result, correct=correct, true_class=true_class, note=note,
                  operator=operator, source="review", review_reason=item.reason)


def dismiss_review(connection, settings: Settings, job_id: str) -> bool:
    """Drop a queued frame unlabelled (its frame expired, or it is not worth a label); False if it was not queued."""
    with connection.pipeline(transaction=True) as pipe:
        pipe.zrem(settings.review_queue_key, job_id)
        pipe.set(settings.review_item_key(job_id), DISMISSED, xx=True)
        removed, _ = pipe.execute()
    return bool(removed)

