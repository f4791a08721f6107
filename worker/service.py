"""Start a worker: load the model once, connect, serve metrics, work the queue."""

from __future__ import annotations

import itertools
import logging
import os

from prometheus_client import start_http_server
from rq import Queue
from rq.serializers import JSONSerializer

from steelsight.clients import PERMANENT, REDIS_TRANSIENT, S3_TRANSIENT, ObjectStore, redis_client
from steelsight.contract import Settings
from steelsight.model.predictor import Predictor
from steelsight.retry import caused_by, with_backoff

from . import jobs
from .engine import FrameEngine
from .rqworker import BatchingWorker

log = logging.getLogger("steelsight.worker")


def build_engine(settings: Settings) -> FrameEngine:
    predictor = Predictor.load(settings.checkpoint, device=settings.device, batch_size=max(settings.batch_size, 1),
                               backend=settings.backend)
    store = ObjectStore(settings)
    with_backoff(store.ensure_buckets, "create buckets", S3_TRANSIENT, attempts=None, permanent=PERMANENT)
    log.info("model %s loaded on %s (sha256 %s…)", predictor.checkpoint.path.name, predictor.device,
             predictor.checkpoint.sha256[:12])
    return FrameEngine(predictor, store, settings)


def make_worker(settings: Settings, name: str | None = None) -> BatchingWorker:
    connection = redis_client(settings)
    with_backoff(connection.ping, "connect to Redis", REDIS_TRANSIENT, attempts=None, permanent=PERMANENT)
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
    worker = BatchingWorker(
        [queue], connection=connection, serializer=JSONSerializer, job_class=jobs.FrameJob,
        name=name, maintenance_interval=settings.maintenance_interval_s,
        # an idle worker wakes every maintenance interval to re-queue abandoned jobs
        worker_ttl=max(settings.maintenance_interval_s + 15, 16),
    )
    worker.max_batch = max(settings.batch_size, 1)
    worker.heartbeat_grace_s = settings.heartbeat_grace_s
    return worker


def run_worker(settings: Settings, burst: bool = False, name: str | None = None, metrics: bool = True) -> bool:
    if metrics:
        start_http_server(settings.metrics_port)
        log.info("metrics on :%d/metrics", settings.metrics_port)
    jobs.install(build_engine(settings), settings)
    base_name = name or f"steelsight-{os.getpid()}"
    for generation in itertools.count():
        # RQ survives Redis outages while it waits for jobs, not while it books one; then it quits.
        # The model stays loaded: reconnect and work on under a fresh worker name. A job caught
        # mid-flight is found abandoned by the started-job registry and re-queued.
        worker = make_worker(settings, base_name if generation == 0 else f"{base_name}-r{generation}")
        log.info("worker %s on queue %s, batches of up to %d", worker.name, settings.queue_name, worker.max_batch)
        try:
            return worker.work(burst=burst, with_scheduler=False, logging_level="INFO")
        except REDIS_TRANSIENT as exc:
            if caused_by(exc, PERMANENT):
                raise
            log.warning("lost Redis while working (%s); reconnecting", exc)
    return False
