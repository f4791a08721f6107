"""Producer: put each frame into the frames bucket and enqueue exactly one job for it."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from steelsight.clients import PERMANENT, REDIS_TRANSIENT, S3_TRANSIENT, ObjectStore, redis_client
from steelsight.contract import CONTENT_TYPES, IMAGE_EXTENSIONS, JOB_FUNCTION, Frame, Settings
from steelsight.retry import with_backoff

from . import metrics

log = logging.getLogger("steelsight.producer")
UNSAFE = re.compile(r"[^A-Za-z0-9-]+")


def safe_frame_id(stem: str) -> str:
    """A file stem turned into a valid frame id: runs of other characters become one '_'."""
    cleaned = UNSAFE.sub("_", stem).strip("_-")[:80]
    return cleaned or "frame"


@dataclass(frozen=True)
class FrameFile:
    path: Path
    frame_id: str


class Producer:
    def __init__(self, settings: Settings, line_id: str, camera_id: str, store: ObjectStore | None = None,
                 connection=None):
        self.settings = settings
        self.line_id, self.camera_id = line_id, camera_id
        self.store = store or ObjectStore(settings)
        self.connection = connection or redis_client(settings)
        self.queue = Queue(settings.queue_name, connection=self.connection, serializer=JSONSerializer)
        self._retry(self.store.ensure_buckets, "create buckets", S3_TRANSIENT, "s3")

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

    def is_known(self, frame: Frame) -> bool:
        def check() -> bool:
            return Job.exists(frame.job_id, connection=self.connection) or bool(
                self.connection.exists(self.settings.result_key(frame.job_id)))
        return self._retry(check, f"check {frame.job_id}", REDIS_TRANSIENT, "redis")

    def send(self, data: bytes, frame_id: str, ext: str, captured_at: datetime | None = None) -> str:
        """Upload then enqueue one frame; returns 'enqueued', 'duplicate' or 'too_large'."""
        frame = Frame(frame_id=frame_id, line_id=self.line_id, camera_id=self.camera_id,
                      captured_at=captured_at or datetime.now(UTC), ext=ext)
        if len(data) > self.settings.max_frame_bytes:
            log.warning("frame %s is %d bytes > limit %d: not sent", frame.job_id, len(data),
                        self.settings.max_frame_bytes)
            metrics.FRAMES_SENT.labels(outcome="too_large").inc()
            return "too_large"
        if self.is_known(frame):
            log.info("frame %s was sent before: skipped", frame.job_id)
            metrics.FRAMES_SENT.labels(outcome="duplicate").inc()
            return "duplicate"
        self._wait_for_room()
        self._retry(lambda: self.store.put(self.settings.frames_bucket, frame.object_key, data,
                                           CONTENT_TYPES[frame.ext]), f"upload {frame.object_key}", S3_TRANSIENT, "s3")
        frame = frame.model_copy(update={"enqueued_at": datetime.now(UTC)})
        self._retry(lambda: self._enqueue(frame), f"enqueue {frame.job_id}", REDIS_TRANSIENT, "redis")
        metrics.FRAMES_SENT.labels(outcome="enqueued").inc()
        return "enqueued"

    def _enqueue(self, frame: Frame) -> None:
        s = self.settings
        self.queue.enqueue(
            JOB_FUNCTION, frame=frame.model_dump(mode="json"), job_id=frame.job_id,
            job_timeout=s.job_timeout_s, result_ttl=s.job_result_ttl_s, failure_ttl=s.failure_ttl_s,
            retry=Retry(max=s.job_retries) if s.job_retries > 0 else None, description=f"frame {frame.job_id}",
        )

    def send_file(self, item: FrameFile, captured_at: datetime | None = None) -> str:
        return self.send(item.path.read_bytes(), item.frame_id, item.path.suffix, captured_at)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)


def replay(folder: Path, loop: bool = False, limit: int | None = None) -> Iterator[FrameFile]:
    """The folder's images in name order; looped runs get fresh ids per pass."""
    files = image_files(folder)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    session, n, passes = datetime.now(UTC).strftime("%Y%m%dT%H%M%S"), 0, 0
    while True:
        for path in files:
            if limit is not None and n >= limit:
                return
            frame_id = safe_frame_id(path.stem)
            yield FrameFile(path, f"{frame_id}-{session}-{passes}" if loop else frame_id)
            n += 1
        passes += 1
        if not loop:
            return


def watch(folder: Path, poll_s: float = 0.5, limit: int | None = None) -> Iterator[FrameFile]:
    """New files as they appear, once their size has stopped changing (no half-written frames)."""
    seen: set[Path] = set(image_files(folder))
    sizes: dict[Path, int] = {}
    n = 0
    while limit is None or n < limit:
        for path in image_files(folder):
            if path in seen:
                continue
            size = path.stat().st_size
            if sizes.get(path) == size and size > 0:
                seen.add(path)
                n += 1
                yield FrameFile(path, safe_frame_id(path.stem))
            else:
                sizes[path] = size
        time.sleep(poll_s)


def run_producer(producer: Producer, frames: Iterator[FrameFile], fps: float | None = None) -> dict[str, int]:
    counts: dict[str, int] = {}
    period = 1.0 / fps if fps else 0.0
    next_at = time.monotonic()
    for item in frames:
        outcome = producer.send_file(item)
        counts[outcome] = counts.get(outcome, 0) + 1
        log.info("%s %s", outcome, item.frame_id)
        if period:
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
    return counts
