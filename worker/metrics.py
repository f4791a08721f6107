"""Worker metrics, named by Prometheus conventions (base units, _total counters)."""

from prometheus_client import Counter, Histogram, Info

from steelsight.metrics import QUEUE_DEPTH  # noqa: F401 - shared with the producer

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

FRAMES = Counter("steelsight_worker_frames_total", "Frames finished, by status and label", ["status", "label"])
FAILURES = Counter("steelsight_worker_failures_total", "Frame attempts that raised, by reason", ["reason"])
INFERENCE_SECONDS = Histogram("steelsight_worker_inference_seconds", "Model time per batch (predict + Grad-CAM)",
                              buckets=LATENCY_BUCKETS)
END_TO_END_SECONDS = Histogram("steelsight_frame_end_to_end_seconds", "Capture to result written",
                               buckets=LATENCY_BUCKETS)
QUEUE_WAIT_SECONDS = Histogram("steelsight_frame_queue_wait_seconds", "Enqueue to batch start",
                               buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("steelsight_worker_batch_size", "Frames per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64))
MODEL = Info("steelsight_model", "The loaded checkpoint")
RETRIES = Counter("steelsight_worker_retries_total", "Retries after a transient service error", ["service"])
