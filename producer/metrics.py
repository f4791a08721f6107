"""Producer metrics, named by Prometheus conventions."""

from prometheus_client import Counter

from steelsight.metrics import QUEUE_DEPTH  # noqa: F401 - shared with the workers

FRAMES_SENT = Counter("steelsight_producer_frames_total", "Frames uploaded and enqueued, by outcome", ["outcome"])
RETRIES = Counter("steelsight_producer_retries_total", "Retries after an unavailable service", ["service"])
BACKPRESSURE_SECONDS = Counter("steelsight_producer_backpressure_seconds_total", "Time spent waiting on a full queue")
