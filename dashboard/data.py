"""What the dashboard shows, read from Redis (results stream, queue) and S3 (images).

Pure functions over a list of :class:`FrameResult` keep the views testable
without a browser; :class:`LiveSource` does the I/O.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
from rq import Queue, Worker
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from steelsight.clients import MissingObject, ObjectStore, redis_client
from steelsight.contract import REJECTED, FrameResult, Settings
from steelsight.model.inference.imageio import DecodeLimits, ImageRejected, decode_rgb
from steelsight.model.inference.labels import CLASSES
from steelsight.model.inference.tiling import BACKGROUND, UNKNOWN

from . import metrics

ALL = "all"
ImageRef = tuple[str, str]  # (bucket, key)
IMAGE_READS = 4  # live-tab reads at once: a refresh's thumbnails side by side, at most 4 frames' bytes held
IMAGE_BACKLOG = 24  # live-tab reads queued or running at most (two galleries); the rest wait for a later refresh
STALE_REFRESHES = 3  # a queued read no refresh has asked for in this many refresh periods is dropped
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Filters:
    line: str = ALL
    camera: str = ALL
    label: str = ALL
    window_s: int = 900


VERDICTS = [*CLASSES, BACKGROUND, UNKNOWN, REJECTED]  # every word verdict() can say, in display order


def verdict(result: FrameResult) -> str:
    """The one word an operator reads: a class, 'background' (a frame of margin only), 'unknown' or 'rejected'."""
    return result.verdict


def apply_filters(results: list[FrameResult], f: Filters, now: datetime | None = None) -> list[FrameResult]:
    now = now or datetime.now(UTC)
    since = now - timedelta(seconds=f.window_s)
    return [
        r for r in results
        if r.finished_at >= since
        and (f.line == ALL or r.line_id == f.line)
        and (f.camera == ALL or r.camera_id == f.camera)
        and (f.label == ALL or verdict(r) == f.label)
    ]


def class_counts(results: list[FrameResult]) -> pd.DataFrame:
    counts = Counter(verdict(r) for r in results)
    names = VERDICTS
    return pd.DataFrame({"class": names, "frames": [counts.get(n, 0) for n in names]})


RATE_VERDICTS = [*CLASSES, UNKNOWN]  # the live tab's rate series: each class, and unknown
BASELINE = "baseline"


def rate_over_time(results: list[FrameResult], bucket_s: int = 10) -> pd.DataFrame:
    """Per time bucket, each class's and the unknown rate (share of the bucket's frames), against its baseline.

    A verdict's baseline is its share over all of ``results`` (the window), drawn flat as
    ``"<verdict> baseline"``; verdicts absent from the window are left out, so the chart
    shows what the line sees.
    """
    rows = []
    buckets: dict[datetime, list[FrameResult]] = {}
    for r in results:
        ts = r.finished_at.timestamp()
        buckets.setdefault(datetime.fromtimestamp(ts - ts % bucket_s, UTC), []).append(r)
    overall = Counter(verdict(r) for r in results)
    shown = [v for v in RATE_VERDICTS if overall.get(v)]
    for start in sorted(buckets):
        counts = Counter(verdict(r) for r in buckets[start])
        for v in shown:
            rows.append({"time": start, "series": v, "value": counts.get(v, 0) / len(buckets[start])})
            rows.append({"time": start, "series": f"{v} {BASELINE}", "value": overall[v] / len(results)})
    return pd.DataFrame(rows, columns=["time", "series", "value"])


def latency_quantiles(results: list[FrameResult]) -> dict[str, dict[str, float]]:
    out = {}
    for name in ("queue_wait_s", "inference_s", "total_s"):
        values = np.array([getattr(r.timings, name) for r in results])
        out[name] = {q: float(np.percentile(values, p)) if len(values) else float("nan")
                     for q, p in (("p50", 50), ("p95", 95), ("p99", 99))}
    return out


def caption(r: FrameResult) -> str:
    """One line per frame; it names the frame, so a selection can be traced back to its result."""
    when = r.captured_at.astimezone(UTC).strftime("%H:%M:%S")
    where = f"{r.line_id}/{r.camera_id}/{r.frame_id}"
    if r.status == "rejected":
        return f"REJECTED ({(r.reason or '').split(':')[0]}) · {where} · {when}"
    head = f"⚠ UNKNOWN ({r.unknown_reason}; nearest {r.label})" if r.unknown else f"{r.label} {r.confidence:.2f}"
    if r.tiles:  # a wide frame: its defect classes by tile count say more than the top one alone
        counts = ", ".join(f"{c} {n}" for c, n in sorted(r.defect_counts.items(), key=lambda kv: (-kv[1], kv[0])) if n)
        head += f" · {len(r.tiles)} tiles ({counts or 'no defect'})"
    return f"{head} · {where} · {when}"


class ByteBoundedCache:
    """Least-recently-used cache bounded by the bytes of the arrays it holds; safe across Gradio's threads."""

    ENTRY_OVERHEAD = 256  # bytes charged per entry, so remembered misses (None) are bounded too

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[object, tuple[np.ndarray | None, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key][0]

    def put(self, key, value: np.ndarray | None) -> None:
        cost = self.ENTRY_OVERHEAD + (value.nbytes if value is not None else 0)
        with self._lock:
            if key in self._items:
                self.bytes -= self._items.pop(key)[1]
            if cost > self.max_bytes:
                return
            self._items[key] = (value, cost)
            self.bytes += cost
            while self.bytes > self.max_bytes:
                self.bytes -= self._items.popitem(last=False)[1][1]

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Window:
    """The results of a time window, newest first, and how much of the window they really cover."""

    results: list[FrameResult]
    window_s: int
    covered_s: float  # equals window_s unless the read limit or the stream's length cut it short
    limited_by: str | None = None  # "read limit" or "stream length" when covered_s < window_s


@dataclass
class _Read:
    future: futures.Future
    asked: float  # when a refresh last asked for its image (monotonic)


def _outcome(future: futures.Future) -> np.ndarray | None:
    return None if future.cancelled() or future.exception() is not None else future.result()


class LiveSource:
    """Reads results from the Redis stream and images from S3; the browser never talks to either."""

    def __init__(self, settings: Settings, store: ObjectStore | None = None, connection=None):
        self.settings = settings
        self.connection = connection or redis_client(settings)
        self.store = store or ObjectStore(settings)
        self.queue = Queue(settings.queue_name, connection=self.connection, serializer=JSONSerializer)
        self.images_cache = ByteBoundedCache(settings.dashboard_cache_bytes)
        self._loading: dict[ImageRef, _Read] = {}  # reads queued, running, or done and not yet handed over
        self._closed = False
        self._lock = threading.Lock()
        self._pool = futures.ThreadPoolExecutor(IMAGE_READS, thread_name_prefix="dashboard-image")
        self._decoding = threading.Semaphore(1)  # one decode at a time: a 40 Mpx frame's peak, not several
        self._warned_at = -60.0
        self.limits = DecodeLimits(max_bytes=settings.max_frame_bytes)

    @property
    def cache_bytes(self) -> int:
        return self.images_cache.bytes

    def recent(self, count: int = 2000) -> list[FrameResult]:
        entries = self.connection.xrevrange(self.settings.results_stream, count=count)
        return [FrameResult.model_validate_json(fields[b"result"]) for _, fields in entries]

    def stream_length(self) -> int:
        return self.connection.xlen(self.settings.results_stream)

    def window(self, window_s: int, now: float | None = None) -> Window:
        """Results of the last ``window_s`` seconds, read by stream-id time (ids are the ms they were
        written), at most ``dashboard_window_max_frames`` of them, newest first."""
        now = time.time() if now is None else now
        since_ms = int((now - window_s) * 1000)
        limit = self.settings.dashboard_window_max_frames
        stream = self.settings.results_stream
        entries = self.connection.xrevrange(stream, max="+", min=str(since_ms), count=limit)
        results = [FrameResult.model_validate_json(fields[b"result"]) for _, fields in entries]
        limited_by = None
        if len(entries) >= limit:
            limited_by = "read limit"
        elif self.connection.xlen(stream) >= self.settings.stream_maxlen:  # trimmed: older ones are gone
            oldest = self.connection.xrange(stream, count=1)
            if oldest and int(oldest[0][0].split(b"-")[0]) > since_ms:
                limited_by = "stream length"
        covered = window_s
        if limited_by and entries:
            covered = max(0.0, now - int(entries[-1][0].split(b"-")[0]) / 1000)
        return Window(results, window_s, min(covered, window_s), limited_by)

    def pipeline_state(self) -> dict[str, int]:
        return {
            "queue_depth": self.queue.count,
            "workers_alive": Worker.count(queue=self.queue, connection=self.connection),
            "failed_jobs": FailedJobRegistry(queue=self.queue).count,
        }

    _MISSING = object()

    def images(self, refs: list[ImageRef], wait_s: float) -> dict[ImageRef, np.ndarray | None]:
        """The images of ``refs`` (newest first), read side by side. A read not done within ``wait_s`` is left
        out of the answer and goes on loading for a later call, so a stalled store never stalls a refresh.
        A read that failed on a store error answers None this time and is tried again next time."""
        now, wanted = time.monotonic(), dict.fromkeys(refs)
        answer: dict[ImageRef, np.ndarray | None] = {}
        mine: dict[ImageRef, futures.Future] = {}
        with self._lock:
            if self._closed:
                return answer
            stale = now - STALE_REFRESHES * self.settings.dashboard_refresh_s
            for ref, read in list(self._loading.items()):
                # not shown any more: a done read's image is in the cache if it fits; a queued one is dropped
                if ref not in wanted and (read.future.done() or (read.asked < stale and read.future.cancel())):
                    del self._loading[ref]
            for ref in wanted:
                read = self._loading.get(ref)
                if read is not None:
                    read.asked = now
                    if read.future.done():  # handed over once, even if the cache cannot hold it
                        del self._loading[ref]
                        answer[ref] = _outcome(read.future)
                    continue
                cached = self.images_cache.get(ref, self._MISSING)
                if cached is not self._MISSING:
                    answer[ref] = cached
                elif len(self._loading) < IMAGE_BACKLOG:  # else late: asked for again by the next refresh
                    mine[ref] = self._pool.submit(self._load, ref)
                    self._loading[ref] = _Read(mine[ref], now)
        futures.wait(mine.values(), timeout=wait_s)  # older reads are late already: no refresh waits on them twice
        with self._lock:
            for ref, future in mine.items():
                if future.done():
                    read = self._loading.get(ref)
                    if read is not None and read.future is future:
                        del self._loading[ref]
                    answer[ref] = _outcome(future)
            for ref in wanted.keys() - answer.keys():  # read meanwhile for another tab's refresh
                cached = self.images_cache.get(ref, self._MISSING)
                if cached is not self._MISSING:
                    answer[ref] = cached
        return answer

    def close(self) -> None:
        """Drop the reads still queued; those running end at the S3 client's read timeout."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _image(self, ref: ImageRef) -> np.ndarray | None:
        """One image now, read in the caller's thread: a click never waits behind the live tab's reads."""
        cached = self.images_cache.get(ref, self._MISSING)
        if cached is not self._MISSING:
            return cached
        try:
            return self._load(ref)
        except Exception:  # logged in _load; caption only, and read again next time
            return None

    def _load(self, ref: ImageRef) -> np.ndarray | None:
        """Fetch and decode. A missing object or a refused image is remembered as None; any other failure (a store
        error) raises and is not remembered: the store may be back by the next refresh."""
        bucket, key = ref
        try:
            data = self.store.get(bucket, key, self.settings.max_frame_bytes)
            with self._decoding:  # the worker's guarded decoder, at display size: the bytes are untrusted
                image = decode_rgb(data, self.limits, self.settings.dashboard_image_max_side)
        except (MissingObject, ImageRejected):  # expired, or refused by the decoder: caption only
            image = None
        except Exception as exc:
            metrics.IMAGE_ERRORS.inc()
            self._warn(f"reading {bucket}/{key} failed: {type(exc).__name__}: {exc}")
            raise
        self.images_cache.put(ref, image)
        return image

    def _warn(self, message: str) -> None:
        """At most one warning a minute: a store that is down fails every read of every refresh."""
        now = time.monotonic()
        with self._lock:
            if now - self._warned_at < 60:
                return
            self._warned_at = now
        log.warning("%s (further image read failures this minute are counted in "
                    "steelsight_dashboard_image_errors_total, not logged)", message)

    def overlay_ref(self, r: FrameResult) -> ImageRef | None:
        return (self.settings.overlays_bucket, r.overlay_key) if r.overlay_key else None

    def original_ref(self, r: FrameResult) -> ImageRef:
        return self.settings.frames_bucket, r.frame_key

    def overlay(self, r: FrameResult) -> np.ndarray | None:
        ref = self.overlay_ref(r)
        return self._image(ref) if ref else None

    def original(self, r: FrameResult) -> np.ndarray | None:
        return self._image(self.original_ref(r))
