"""Worker metrics, named by Prometheus conventions (base units, _total counters).

Per-frame series carry ``line`` and ``camera``, which come from the data: a worker labels
the first :data:`MAX_LINES` lines and :data:`MAX_CAMERAS` (line, camera) pairs it sees by
name and counts the rest under ``other`` (:func:`line_camera`), so a producer sending
odd ids cannot flood Prometheus. Every other label (verdict, reason, issue, stat) takes
values from the code. The alert rules in ``deploy/prometheus/rules.yml`` read these
names (docs/alerts.md).
"""

import re
import threading

import numpy as np
from prometheus_client import Counter, Gauge, Histogram, Info, Summary

from steelsight.metrics import QUEUE_DEPTH  # noqa: F401 - shared with the producer

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

FRAMES = Counter("steelsight_worker_frames_total", "Frames finished, by status and label", ["status", "label"])
FAILURES = Counter("steelsight_worker_failures_total", "Frame attempts that raised, by reason", ["reason"])
INFERENCE_SECONDS = Histogram("steelsight_worker_inference_seconds", "Model time per batch (predict + Grad-CAM)",
                              buckets=LATENCY_BUCKETS)
END_TO_END_SECONDS = Histogram("steelsight_frame_end_to_end_seconds", "Capture to result written, by line and camera",
                               ["line", "camera"], buckets=LATENCY_BUCKETS)
QUEUE_WAIT_SECONDS = Histogram("steelsight_frame_queue_wait_seconds", "Enqueue to batch start",
                               buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("steelsight_worker_batch_size", "Frames per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64))
MODEL = Info("steelsight_model", "The loaded checkpoint")
# model lifecycle (worker/models.py)
MODEL_SWITCHES = Counter("steelsight_model_switches_total", "Live-model switches, each between two batches")
MODEL_REFUSED = Counter("steelsight_model_refused_total",
                        "Checkpoints a worker would not serve (failed to load or its smoke check), by role",
                        ["role"])
MODEL_LOAD_SECONDS = Histogram("steelsight_model_load_seconds",
                               "Fetching, loading and smoke-checking a checkpoint in the background",
                               buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128))
MODEL_BUILD_SECONDS = Histogram("steelsight_model_build_seconds",
                                "Building a new model's trunk between two batches: the work loop waits this long",
                                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16))
SHADOW_FRAMES = Counter("steelsight_shadow_frames_total", "Frames the shadow challenger also read, by agreement",
                        ["agree"])
SHADOW_SECONDS = Histogram("steelsight_shadow_seconds", "Challenger model time per batch", buckets=LATENCY_BUCKETS)
REVIEW_SENT = Counter("steelsight_review_sent_total", "Frames sent to the review queue by active sampling, by reason",
                      ["reason"])
SHADOW_FAILURES = Counter("steelsight_shadow_failures_total", "Batches the shadow challenger failed on")
RETRIES = Counter("steelsight_worker_retries_total", "Retries after a transient service error", ["service"])

# what alerts and drift read
VERDICTS = Counter("steelsight_verdicts_total",
                   "Frames finished, by line, camera and verdict (a class, background, unknown or rejected)",
                   ["line", "camera", "verdict"])
UNKNOWN = Counter("steelsight_unknown_frames_total", "Frames answered unknown, by line, camera and reason",
                  ["line", "camera", "reason"])
REJECTED = Counter("steelsight_rejected_frames_total", "Frames rejected unread, by line, camera and reason",
                   ["line", "camera", "reason"])
QUALITY_FLAGS = Counter("steelsight_quality_flags_total",
                        "Frames unknown for a camera fault (the quality gate or the camera bank), by issue",
                        ["line", "camera", "issue"])
QUEUE_OLDEST_AGE = Gauge("steelsight_queue_oldest_age_seconds",
                         "Age of the oldest frame waiting in the queue (0 when empty), as last seen by this worker")
FAILED_JOBS = Gauge("steelsight_failed_jobs", "Jobs in RQ's failed registry (retries used up), as last seen")
HEARTBEAT = Gauge("steelsight_worker_heartbeat_timestamp_seconds",
                  "When the work loop last beat (Unix time): idle, or while a batch computes within its budget")
# drift: per-line rolling means are rate(_sum) / rate(_count) over the rules' window
CONFIDENCE = Summary("steelsight_confidence", "Confidence of the frames the model read, by line", ["line"])
INPUT_STATS = Summary("steelsight_input_stat", "Per-frame input statistics at the model's scale (brightness, "
                      "contrast, sharpness: model.inference.quality.input_statistics), by line", ["line", "stat"])
TRAINING_CLASS_SHARE = Gauge("steelsight_training_class_share", "Each class's share of the training set",
                             ["verdict"])
TRAINING_INPUT_STAT = Gauge("steelsight_training_input_stat",
                            "Input statistics over the checkpoint's training images: their mean and standard "
                            "deviation (quantity)", ["stat", "quantity"])

MAX_LINES = 64  # lines labelled by name per worker; the rest are "other"
MAX_CAMERAS = 512  # (line, camera) pairs labelled by name per worker; the rest are camera "other"
OTHER = "other"
_labelled_lines: set[str] = set()
_labelled_cameras: set[tuple[str, str]] = set()
_labels_lock = threading.Lock()

_REASON = re.compile(r"[a-z][a-z0-9_]{0,31}")


def _line(line: str) -> str:
    if line not in _labelled_lines:
        if len(_labelled_lines) >= MAX_LINES:
            return OTHER
        _labelled_lines.add(line)
    return line


def line_label(line: str) -> str:
    """A frame's line label: its name for the first :data:`MAX_LINES` lines seen, else ``other``."""
    with _labels_lock:
        return _line(line)


def line_camera(line: str, camera: str) -> tuple[str, str]:
    """A frame's (line, camera) labels: by name for the first lines and cameras seen, else ``other``."""
    with _labels_lock:
        line = _line(line)
        if line == OTHER:
            return OTHER, OTHER
        if (line, camera) not in _labelled_cameras:
            if len(_labelled_cameras) >= MAX_CAMERAS:
                return line, OTHER
            _labelled_cameras.add((line, camera))
    return line, camera


def observe_input(line: str, gray: np.ndarray) -> None:
    """Count a frame's input statistics into its line's drift summaries (``gray`` at the model's scale)."""
    from steelsight.model.inference.quality import input_statistics

    label = line_label(line)
    for stat, value in input_statistics(gray).items():
        INPUT_STATS.labels(line=label, stat=stat).observe(value)


def export_training_inputs(input_stats: dict) -> bool:
    """The training images' input statistics from a checkpoint (``CheckpointMeta.input_stats``), the
    InputDrift rule's reference; False when the checkpoint has none (older checkpoints)."""
    for stat, summary in (input_stats or {}).items():
        for quantity in ("mean", "std"):
            TRAINING_INPUT_STAT.labels(stat=stat, quantity=quantity).set(float(summary[quantity]))
    return bool(input_stats)


def reason_label(reason: str | None) -> str:
    """The code part of a reason ("not_an_image: 3 bytes" -> "not_an_image"); anything else is "other"."""
    head = (reason or "").split(":", 1)[0].strip()
    return head if _REASON.fullmatch(head) else "other"
