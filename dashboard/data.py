"""What the dashboard shows, read from Redis (results stream, queue) and S3 (images).

Pure functions over a list of :class:`FrameResult` keep the views testable
without a browser; :class:`LiveSource` does the I/O.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import numpy as np
import pandas as pd
from PIL import Image
from rq import Queue, Worker
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from steelsight.clients import ObjectStore, redis_client
from steelsight.contract import FrameResult, Settings
from steelsight.model.labels import CLASSES

ALL = "all"
UNKNOWN = "unknown"
REJECTED = "rejected"


@dataclass(frozen=True)
class Filters:
    line: str = ALL
    camera: str = ALL
    label: str = ALL
    window_s: int = 900


def verdict(result: FrameResult) -> str:
    """The one word an operator reads: a class, 'unknown' or 'rejected'."""
    if result.status == "rejected":
        return REJECTED
    return UNKNOWN if result.unknown else result.label or UNKNOWN


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
    names = [*CLASSES, UNKNOWN, REJECTED]
    return pd.DataFrame({"class": names, "frames": [counts.get(n, 0) for n in names]})


def rate_over_time(results: list[FrameResult], bucket_s: int = 10) -> pd.DataFrame:
    """Throughput (frames/s) and defect rate (share named as a defect class) per time bucket."""
    rows = []
    buckets: dict[datetime, list[FrameResult]] = {}
    for r in results:
        ts = r.finished_at.timestamp()
        buckets.setdefault(datetime.fromtimestamp(ts - ts % bucket_s, UTC), []).append(r)
    for start in sorted(buckets):
        group = buckets[start]
        defects = sum(verdict(r) in CLASSES for r in group)
        rows.append({"time": start, "series": "throughput (frames/s)", "value": len(group) / bucket_s})
        rows.append({"time": start, "series": "defect rate", "value": defects / len(group)})
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
    return f"{head} · {where} · {when}"


class LiveSource:
    """Reads results from the Redis stream and images from S3; the browser never talks to either."""

    def __init__(self, settings: Settings, store: ObjectStore | None = None, connection=None):
        self.settings = settings
        self.connection = connection or redis_client(settings)
        self.store = store or ObjectStore(settings)
        self.queue = Queue(settings.queue_name, connection=self.connection, serializer=JSONSerializer)
        self._image = lru_cache(maxsize=256)(self._fetch_image)

    def recent(self, count: int = 2000) -> list[FrameResult]:
        entries = self.connection.xrevrange(self.settings.results_stream, count=count)
        return [FrameResult.model_validate_json(fields[b"result"]) for _, fields in entries]

    def pipeline_state(self) -> dict[str, int]:
        return {
            "queue_depth": self.queue.count,
            "workers_alive": Worker.count(queue=self.queue, connection=self.connection),
            "failed_jobs": FailedJobRegistry(queue=self.queue).count,
        }

    def _fetch_image(self, bucket: str, key: str) -> np.ndarray | None:
        try:
            data = self.store.get(bucket, key, self.settings.max_frame_bytes)
            return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        except Exception:  # expired, unreachable or undecodable (a rejected frame): caption only
            return None

    def overlay(self, r: FrameResult) -> np.ndarray | None:
        return self._image(self.settings.overlays_bucket, r.overlay_key) if r.overlay_key else None

    def original(self, r: FrameResult) -> np.ndarray | None:
        return self._image(self.settings.frames_bucket, r.frame_key)
