"""Metrics that more than one process exports (each process has its own registry)."""

from prometheus_client import Gauge

QUEUE_DEPTH = Gauge("steelsight_queue_depth", "Jobs waiting in the frame queue, as last seen by this process")
