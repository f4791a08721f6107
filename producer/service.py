"""Producer: put each frame into the frames bucket and enqueue exactly one job for it."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from steelsight.clients import PERMANENT, REDIS_TRANSIENT, ObjectStore, redis_client, s3_transient
from steelsight.contract import CONTENT_TYPES, IMAGE_EXTENSIONS, JOB_FUNCTION, Frame, Settings, safe_frame_id
from steelsight.retry import with_backoff

from . import metrics

__all__ = ["FrameFile", "Producer", "image_files", "is_frame_name", "replay", "run_producer", "safe_frame_id"]

log = logging.getLogger("steelsight.producer")

# Redis acknowledges a write before it is on disk. With appendfsync everysec it fsyncs
# every second and may hold back a write for up to 2 s more while a slow fsync runs, so
# a crash can lose about the last 3 s of acknowledged writes: frames enqueued within this
# window are checked again until they have been in Redis that long.
UNCONFIRMED_WINDOW_S = 3.0
CHECK_S = 0.25  # how often the producer looks for them


def is_frame_name(name: str) -> bool:
    """An image a camera finished: dotfiles and ``~`` names are temporary (written, then renamed)."""
    return not name.startswith((".", "~")) and name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS


def file_time(path: Path) -> datetime:
    """A file's modification time: when the camera wrote the frame."""
    return datetime.fromtimestamp(path.stat().st_mtime_ns / 1e9, UTC)


@dataclass(frozen=True)
class FrameFile:
    path: Path
    frame_id: str
    captured_at: datetime | None = None  # None: the moment it is sent (a replay re-enacts a live line)


class Producer:
    def __init__(self, settings: Settings, line_id: str, camera_id: str, store: ObjectStore | None = None,
                 connection=None, unconfirmed_window_s: float = UNCONFIRMED_WINDOW_S):
        self.settings = settings
        self.line_id, self.camera_id = line_id, camera_id
        self._last_frame = metrics.camera_started(line_id, camera_id)
        self.store = store or ObjectStore(settings)
        self.connection = connection or redis_client(settings)
        self.queue = Queue(settings.queue_name, connection=self.connection, serializer=JSONSerializer)
        self._retry(lambda: self.store.ensure_buckets(library=False), "create buckets", s3_transient, "s3")
        self.unconfirmed_window_s = unconfirmed_window_s
        self._unconfirmed: deque[tuple[float, Frame]] = deque()  # (enqueued at, frame), oldest first
        self._checked = 0.0
        self.resent = 0  # frames enqueued again after Redis lost them

    def _retry(self, fn, what, transient, service):
        return with_backoff(fn, what, transient, attempts=None, permanent=PERMANENT,
                            on_retry=lambda exc, delay: metrics.RETRIES.labels(service=service).inc())

    def _wait_for_room(self) -> None:
        """Backpressure: block while the queue is deeper than the limit; never drop."""
        waited, last_log = 0.0, 0.0
        while True:
            depth = self._retry(lambda: self.queue.count, "read queue depth", REDIS_TRANSIENT, "redis")
            metrics.QUEUE_DEPTH.set(depth)
            if depth <= self.settings.max_queue_depth:
                return
            if waited - last_log >= 5 or waited == 0:
                log.info("queue depth %d > limit %d: waiting for workers", depth, self.settings.max_queue_depth)
                last_log = waited
            time.sleep(0.25)
            waited += 0.25
            metrics.BACKPRESSURE_SECONDS.inc(0.25)

    def job_state(self, frame: Frame) -> str | None:
        """'done' (result written), an RQ job status, or None when Redis knows nothing of the frame."""
        def check() -> str | None:
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.exists(self.settings.result_key(frame.job_id))
                pipe.hget(Job.key_for(frame.job_id), "status")
                has_result, status = pipe.execute()
            if has_result:
                return "done"
            return status.decode() if status is not None else None
        return self._retry(check, f"check {frame.job_id}", REDIS_TRANSIENT, "redis")

    def is_known(self, frame: Frame) -> bool:
        return self.job_state(frame) is not None

    def send(self, data: bytes, frame_id: str, ext: str, captured_at: datetime | None = None) -> str:
        """Upload then enqueue one frame; returns 'enqueued', 'duplicate', 'requeued' or 'too_large'.

        A frame whose job failed is not a duplicate: it is sent again ('requeued').
        """
        self.check_unconfirmed()
        self._last_frame.set_to_current_time()
        frame = Frame(frame_id=frame_id, line_id=self.line_id, camera_id=self.camera_id,
                      captured_at=captured_at or datetime.now(UTC), ext=ext)
        if len(data) > self.settings.max_frame_bytes:
            log.warning("frame %s is %d bytes > limit %d: not sent", frame.job_id, len(data),
                        self.settings.max_frame_bytes)
            metrics.FRAMES_SENT.labels(outcome="too_large").inc()
            return "too_large"
        state = self.job_state(frame)
        if state == JobStatus.FAILED.value:
            log.warning("frame %s: its job failed; sending it again", frame.job_id)
            registry = FailedJobRegistry(self.settings.queue_name, connection=self.connection,
                                         serializer=JSONSerializer)
            self._retry(lambda: registry.remove(frame.job_id, delete_job=True), f"forget failed {frame.job_id}",
                        REDIS_TRANSIENT, "redis")
        elif state is not None:
            log.info("frame %s was sent before: skipped", frame.job_id)
            metrics.FRAMES_SENT.labels(outcome="duplicate").inc()
            return "duplicate"
        self._wait_for_room()
        # provenance travels with the object, for whoever reads the bucket without Redis
        provenance = {"line": frame.line_id, "camera": frame.camera_id, "captured-at": frame.captured_at.isoformat()}
        self._retry(lambda: self.store.put(self.settings.frames_bucket, frame.object_key, data,
                                           CONTENT_TYPES[frame.ext], metadata=provenance),
                    f"upload {frame.object_key}", s3_transient, "s3")
        frame = frame.model_copy(update={"enqueued_at": datetime.now(UTC)})
        self._retry(lambda: self._enqueue(frame), f"enqueue {frame.job_id}", REDIS_TRANSIENT, "redis")
        self._unconfirmed.append((time.monotonic(), frame))
        outcome = "requeued" if state is not None else "enqueued"
        metrics.FRAMES_SENT.labels(outcome=outcome).inc()
        return outcome

    def _enqueue(self, frame: Frame) -> None:
        s = self.settings
        self.queue.enqueue(
            JOB_FUNCTION, frame=frame.model_dump(mode="json"), job_id=frame.job_id,
            job_timeout=s.job_timeout_s, result_ttl=s.job_result_ttl_s, failure_ttl=s.failure_ttl_s,
            retry=Retry(max=s.job_retries) if s.job_retries > 0 else None, description=f"frame {frame.job_id}",
        )

    def send_file(self, item: FrameFile, captured_at: datetime | None = None) -> str:
        """As :meth:`send`, or 'unreadable' when the file cannot be read (moved away, another uid's, ...)."""
        try:
            data = item.path.read_bytes()
        except OSError as exc:  # one bad file must not stop the frames behind it
            log.warning("cannot read %s: %s: not sent", item.path, exc.strerror or exc)
            metrics.FRAMES_SENT.labels(outcome="unreadable").inc()
            return "unreadable"
        return self.send(data, item.frame_id, item.path.suffix, captured_at or item.captured_at)

    # --- frames Redis acknowledged but may not have written to disk yet ---

    def check_unconfirmed(self, force: bool = False) -> int:
        """Enqueue again the recent frames Redis lost (it restarted without them); returns how many.

        A frame is lost when Redis has neither its job nor its result: RQ writes the job
        hash and its queue entry in one transaction, and jobs outlive their results'
        writing. Frames seen in Redis ``unconfirmed_window_s`` after their enqueue are
        taken as on disk and forgotten here, so this holds a few seconds of frames.
        """
        now = time.monotonic()
        if not self._unconfirmed or (not force and now - self._checked < CHECK_S):
            return 0
        entries = list(self._unconfirmed)
        s = self.settings

        def gone() -> list[bool]:
            with self.connection.pipeline(transaction=False) as pipe:
                for _, frame in entries:
                    pipe.exists(Job.key_for(frame.job_id), s.result_key(frame.job_id))
                return [n == 0 for n in pipe.execute()]

        lost = self._retry(gone, f"check {len(entries)} recent frames", REDIS_TRANSIENT, "redis")
        self._checked = time.monotonic()
        keep: deque[tuple[float, Frame]] = deque()
        for (at, frame), missing in zip(entries, lost, strict=True):
            if missing:
                self._retry(lambda f=frame: self._enqueue(f), f"enqueue {frame.job_id} again", REDIS_TRANSIENT,
                            "redis")
                keep.append((time.monotonic(), frame))
                metrics.FRAMES_SENT.labels(outcome="resent").inc()
            elif at > now - self.unconfirmed_window_s:
                keep.append((at, frame))
        self._unconfirmed = keep
        if any(lost):
            log.warning("%d of the %d frames enqueued in the last %.0f s are gone from Redis (it restarted without "
                        "them): enqueued again", sum(lost), len(entries), self.unconfirmed_window_s)
        self.resent += sum(lost)
        return sum(lost)

    def flush(self) -> int:
        """Before exiting: wait until every frame sent is past the unconfirmed window; returns frames re-sent."""
        resent = 0
        while self._unconfirmed:
            resent += self.check_unconfirmed(force=True)
            if self._unconfirmed:
                time.sleep(min(CHECK_S, max(0.0, self._unconfirmed[0][0] + self.unconfirmed_window_s
                                            - time.monotonic()) + 0.01))
        return resent


def image_files(folder: Path) -> list[Path]:
    """Finished image files under ``folder``, in name order; temporary names and dot-folders are skipped."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_frame_name(p.name)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts[:-1]))


def replay(folder: Path, loop: bool = False, limit: int | None = None) -> Iterator[FrameFile]:
    """The folder's images in name order; looped runs get fresh ids per pass.

    A file's id comes from its path under ``folder`` and its modification time, so a
    second replay of the same folder is recognised as duplicates, and a new file under an
    old name (``img0001`` again the next day) is a new frame.
    """
    files = image_files(folder)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    started, n, passes = datetime.now(UTC).isoformat(), 0, 0
    while True:
        for path in files:
            if limit is not None and n >= limit:
                return
            name = path.relative_to(folder).as_posix()
            yield FrameFile(path, safe_frame_id(name, file_time(path), f"{started} pass {passes}" if loop else ""))
            n += 1
        passes += 1
        if not loop:
            return


def run_producer(producer: Producer, frames: Iterator[FrameFile], fps: float | None = None,
                 on_sent: Callable[[FrameFile, str], None] | None = None) -> dict[str, int]:
    """Send every frame; ``on_sent`` hears each outcome (the watcher records it as sent)."""
    counts: dict[str, int] = {}
    resent_before = producer.resent
    period = 1.0 / fps if fps else 0.0
    next_at = time.monotonic()
    for item in frames:
        outcome = producer.send_file(item)
        counts[outcome] = counts.get(outcome, 0) + 1
        log.info("%s %s", outcome, item.frame_id)
        if on_sent:
            on_sent(item, outcome)
        if period:
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
    producer.flush()
    if producer.resent > resent_before:
        counts["resent"] = producer.resent - resent_before
    return counts
