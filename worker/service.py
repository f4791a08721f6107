"""Start a worker: load the model once, connect, serve metrics, work the queue."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import socket

from rq import Queue
from rq.serializers import JSONSerializer

from steelsight.clients import PERMANENT, REDIS_TRANSIENT, ObjectStore, redis_client, s3_transient
from steelsight.contract import Settings
from steelsight.model.inference.predictor import Predictor
from steelsight.retry import caused_by, with_backoff

from . import health, jobs
from .engine import FrameEngine
from .rqworker import BatchingWorker

log = logging.getLogger("steelsight.worker")


def build_engine(settings: Settings, liveness: health.Liveness | None = None) -> FrameEngine:
    predictor = Predictor.load(settings.checkpoint, device=settings.device, batch_size=max(settings.batch_size, 1),
                               backend=settings.backend)
    store = ObjectStore(settings)
    with liveness.waiting("the object store") if liveness else contextlib.nullcontext():
        with_backoff(store.ensure_buckets, "create buckets", s3_transient, attempts=None, permanent=PERMANENT)
    log.info("model %s loaded on %s (sha256 %s…)", predictor.checkpoint.path.name, predictor.device,
             predictor.checkpoint.sha256[:12])
    return FrameEngine(predictor, store, settings)


def default_name() -> str:
    """Host, PID and a random suffix: in a container every replica is PID 1, and a restarted
    process must not wait for its dead predecessor's worker key to expire."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class WorkerCrashed(RuntimeError):
    """RQ's work loop quit on an error it did not handle."""


def make_worker(settings: Settings, name: str | None = None, liveness: health.Liveness | None = None
                ) -> BatchingWorker:
    connection = redis_client(settings)
    with liveness.waiting("Redis") if liveness else contextlib.nullcontext():
        with_backoff(connection.ping, "connect to Redis", REDIS_TRANSIENT, attempts=None, permanent=PERMANENT)
    # FrameJob here too: RQ's registry clean-ups build jobs with the queue's class
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer, job_class=jobs.FrameJob)
    worker = BatchingWorker(
        [queue], connection=connection, serializer=JSONSerializer, job_class=jobs.FrameJob,
        name=name, maintenance_interval=settings.maintenance_interval_s,
        # an idle worker wakes every second to re-queue abandoned jobs (dequeue timeout = worker_ttl - 15)
        worker_ttl=16,
    )
    worker.max_batch = max(settings.batch_size, 1)
    worker.heartbeat_grace_s = settings.heartbeat_grace_s
    worker.claim_ttl_s = settings.claim_ttl_s
    worker.claimed_heartbeat_s = min(worker.claimed_heartbeat_s, settings.claim_ttl_s / 3)
    worker.reclaim_interval_s = settings.reclaim_interval_s
    worker.stall_after_s = settings.job_timeout_s
    worker.retry_backoff_s = settings.job_retry_backoff_s
    worker.retry_window_s = settings.job_retry_window_s
    worker.liveness = liveness
    return worker


def run_worker(settings: Settings, burst: bool = False, name: str | None = None, metrics: bool = True) -> bool:
    liveness = health.Liveness(settings.health_stale_s)
    if metrics:
        health.serve(settings.metrics_host, settings.metrics_port, liveness)
        log.info("metrics on %s:%d/metrics, health on /healthz", settings.metrics_host, settings.metrics_port)
    jobs.install(build_engine(settings, liveness), settings)
    return work(settings, burst=burst, name=name, liveness=liveness)


def work(settings: Settings, burst: bool = False, name: str | None = None,
         liveness: health.Liveness | None = None) -> bool:
    """Work the queue with the installed engine until done (burst) or stopped; raise :class:`WorkerCrashed`."""
    base_name = name or default_name()
    for generation in itertools.count():
        # RQ survives Redis outages while it waits for jobs, not while it books one; then it quits.
        # The model stays loaded: reconnect and work on under a fresh worker name. A job caught
        # mid-flight is found abandoned by the started-job registry and re-queued.
        worker = make_worker(settings, base_name if generation == 0 else f"{base_name}-r{generation}", liveness)
        log.info("worker %s on queue %s, batches of up to %d", worker.name, settings.queue_name, worker.max_batch)
        try:
            worked = worker.work(burst=burst, with_scheduler=False, logging_level="INFO")
        except REDIS_TRANSIENT as exc:
            if caused_by(exc, PERMANENT):
                raise
            log.warning("lost Redis while working (%s); reconnecting", exc)
            continue
        crash = worker.crash
        if crash is None:
            return worked
        if isinstance(crash, REDIS_TRANSIENT) and not caused_by(crash, PERMANENT):
            log.warning("lost Redis while working (%s); reconnecting", crash)
            continue
        raise WorkerCrashed(f"worker {worker.name} quit on {type(crash).__name__}: {crash}") from crash
    return False
