"""Producer metrics, named by Prometheus conventions."""

from prometheus_client import Counter, Gauge

from steelsight.metrics import QUEUE_DEPTH  # noqa: F401 - shared with the workers

FRAMES_SENT = Counter("steelsight_producer_frames_total", "Frames uploaded and enqueued, by outcome", ["outcome"])
RETRIES = Counter("steelsight_producer_retries_total", "Retries after an unavailable service", ["service"])
BACKPRESSURE_SECONDS = Counter("steelsight_producer_backpressure_seconds_total", "Time spent waiting on a full queue")
# CameraSilent reads it: a camera's frames stop reaching the workers' counters when its producer gets none
LAST_FRAME = Gauge("steelsight_producer_last_frame_timestamp_seconds",
                   "When the camera last handed this producer a frame (Unix time); its start before the first",
                   ["line", "camera"])


def camera_started(line: str, camera: str):
    """The camera's last-frame gauge, set to now unless this process already set it: a camera silent since a
    restart still shows as silent, and a second call (the command, then its producer) moves nothing."""
    gauge = LAST_FRAME.labels(line=line, camera=camera)
    labels = {"line": line, "camera": camera}
    if not any(s.labels == labels and s.value for m in LAST_FRAME.collect() for s in m.samples):
        gauge.set_to_current_time()
    return gauge
