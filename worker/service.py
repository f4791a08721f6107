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

from steelsight.clients import PERMANENT, REDIS_TRANSIENT, ObjectStore, redis_client
from steelsight.contract import Settings
from steelsight.registry import ModelRegistry
from steelsight.retry import caused_by, with_backoff

from . import health
from .engine import FrameEngine, build_engine, ensure_buckets
from .metrics import export_training_inputs
from .models import ModelWatcher, initial_predictor, record_shadow
from .rq_compat import FrameJob
from .rqworker import BatchingWorker
from .sinks import start_sinks

log = logging.getLogger("steelsight.worker")


def default_name() -> str:
    """Host, PID and a random suffix: in a container every replica is PID 1, and a restarted
    process must not wait for its dead predecessor's worker key to expire."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def export_training_prior(classes: list[str]) -> None:
    """Each class's share of the training set, for the class-mix drift rule. A checkpoint records no class
    counts, so the prior is uniform over its classes: what NEU, the shipped model's data (300 per class), has."""
    from . import metrics

    for name in classes:
        metrics.TRAINING_CLASS_SHARE.labels(verdict=name).set(1 / len(classes))


class WorkerCrashed(RuntimeError):
    """RQ's work loop quit on an error it did not handle."""


def connect(settings: Settings, liveness: health.Liveness | None = None):
    """A Redis client, once Redis answers (waiting for it)."""
    connection = redis_client(settings)
    with liveness.waiting("Redis") if liveness else contextlib.nullcontext():
        with_backoff(connection.ping, "connect to Redis", REDIS_TRANSIENT, attempts=None, permanent=PERMANENT)
    return connection


def make_worker(settings: Settings, engine: FrameEngine, name: str | None = None,
                liveness: health.Liveness | None = None) -> BatchingWorker:
    """Connect (waiting for Redis) and build a worker on ``settings.queue_name`` that computes with ``engine``."""
    connection = connect(settings, liveness)
    job_class = FrameJob.bound(settings)
    # the worker's job class here too: RQ's registry clean-ups build jobs with the queue's class
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer, job_class=job_class)
    return BatchingWorker([queue], settings=settings, engine=engine, liveness=liveness, connection=connection,
                          serializer=JSONSerializer, job_class=job_class, name=name)


def run_worker(settings: Settings, burst: bool = False, name: str | None = None, metrics: bool = True) -> bool:
    name = name or default_name()
    # before the model loads: a sink the worker cannot start with (a refused login) stops it in seconds
    runners = start_sinks(settings, name)
    liveness = health.Liveness(settings.health_stale_s)
    if metrics:
        health.serve(settings.metrics_host, settings.metrics_port, liveness)
        log.info("metrics on %s:%d/metrics, health on /healthz", settings.metrics_host, settings.metrics_port)
    watcher = None
    try:
        connection = connect(settings, liveness)
        registry = ModelRegistry(settings, ObjectStore(settings), connection)
        ensure_buckets(registry.store, liveness)  # the live model comes from the object store
        engine = build_engine(settings, liveness, predictor=initial_predictor(settings, registry),
                              on_shadow=lambda verdicts: record_shadow(connection, settings, verdicts))
        engine.worker_name = name
        watcher = ModelWatcher(settings, engine, registry, name)
        watcher.report()
        watcher.start()
        meta = engine.predictor.checkpoint.meta
        export_training_prior(meta.classes)
        if not export_training_inputs(meta.input_stats):
            log.info("the checkpoint records no training input statistics: InputDrift has no reference to compare "
                     "the lines' brightness, contrast and sharpness with")
        return work(settings, engine, burst=burst, name=name, liveness=liveness)
    finally:
        if watcher is not None:
            watcher.stop()
            with contextlib.suppress(*REDIS_TRANSIENT):
                watcher.forget()
        for runner in runners:
            runner.stop()


def name_taken(worker: BatchingWorker) -> bool:
    """Whether RQ would refuse to register ``worker``: a worker key by its name exists and has no death record."""
    return bool(worker.connection.exists(worker.key)) and not worker.connection.hexists(worker.key, "death")


def work(settings: Settings, engine: FrameEngine, burst: bool = False, name: str | None = None,
         liveness: health.Liveness | None = None) -> bool:
    """Work the queue with ``engine`` until done (burst) or stopped; raise :class:`WorkerCrashed`."""
    base_name = name or default_name()
    for generation in itertools.count():
        # RQ survives Redis outages while it waits for jobs, not while it books one; then it quits.
        # The model stays loaded: reconnect and work on under a fresh worker name. A job caught
        # mid-flight is found abandoned by the started-job registry and re-queued.
        worker = make_worker(settings, engine, base_name if generation == 0 else f"{base_name}-r{generation}",
                             liveness)
        if name_taken(worker):
            # RQ refuses a name whose worker key lives on (about a minute after a SIGKILL, an OOM kill or a
            # container restart): a restart under a fixed --name would exit, not work
            log.warning("worker name %s is still registered in Redis (a predecessor that died without signing "
                        "off, or another worker named so); working under the next name", worker.name)
            continue
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
