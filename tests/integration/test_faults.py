"""Faults while frames flow: S3 outages, workers SIGKILLed at random, and a 2,000-frame soak."""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import threading
import time
import urllib.request

import pytest
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from steelsight.clients import redis_client
from steelsight.devstack import free_port, wait_until
from steelsight.producer import metrics as producer_metrics
from steelsight.producer.service import Producer, replay, run_producer

from ..faults import CuttableProxy, rss_bytes
from ..helpers import SAMPLES, WorkerProcess, records


def failed_jobs(settings, conn) -> dict[str, str]:
    """Failed-registry job id -> the reason RQ recorded."""
    registry = FailedJobRegistry(settings.queue_name, connection=conn, serializer=JSONSerializer)
    ids = registry.get_job_ids()
    return {i: (Job.fetch(i, connection=conn, serializer=JSONSerializer).latest_result().exc_string or "") for i in ids}


def start_worker(settings, tmp_path, name: str) -> WorkerProcess:
    """Each worker process serves metrics on a port of its own."""
    return WorkerProcess(settings.model_copy(update={"metrics_port": free_port()}), tmp_path, name)


def producer_in_thread(producer: Producer, frames) -> tuple[threading.Thread, dict]:
    counts: dict = {}
    thread = threading.Thread(target=lambda: counts.update(run_producer(producer, frames)), daemon=True)
    thread.start()
    return thread, counts


def test_cut_proxy_refuses_connections_and_restores_at_once():
    """The fault tool itself: a cut must refuse (not queue) connections and free its port."""
    upstream = socket.create_server(("127.0.0.1", 0))
    proxy = CuttableProxy(upstream.getsockname()[1]).start()
    try:
        idle = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        upstream.accept()
        proxy.cut()
        with contextlib.suppress(ConnectionResetError):  # closed at once, not left to hang
            assert idle.recv(1) == b""
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        proxy.restore()
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    finally:
        proxy.cut()
        upstream.close()


def test_s3_outage_is_ridden_out(services, settings, tmp_path):
    _, s3 = services
    proxy = CuttableProxy(s3.port).start()
    settings = settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{proxy.port}", "s3_retry_window_s": 8.0,
                                           "job_retries": 0})
    conn = redis_client(settings)
    retries_before = producer_metrics.RETRIES.labels(service="s3")._value.get()
    producer = Producer(settings, "line-s3", "cam-1")
    worker = WorkerProcess(settings, tmp_path, "s3-worker")
    try:
        wait_until(lambda: conn.scard("rq:workers") > 0, 60, "the worker to register")
        thread, counts = producer_in_thread(producer, replay(SAMPLES, limit=20))
        wait_until(lambda: len(records(settings, conn)) >= 3, 60, "the first results")
        proxy.cut()  # S3 gone: uploads, downloads and overlay writes all fail
        time.sleep(5.0)
        assert len(records(settings, conn)) < 20
        proxy.restore()
        thread.join(timeout=120)
        wait_until(lambda: len(records(settings, conn)) == 20, 120, "all 20 results")
        worker_metrics = urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/metrics").read().decode()
    finally:
        worker.kill(signal.SIGTERM)
        proxy.cut()
    assert counts == {"enqueued": 20}
    assert all(r["status"] == "ok" for r in records(settings, conn).values())
    assert failed_jobs(settings, conn) == {}  # no retry budget was spent: the backoff rode it out
    worker_retries = sum(float(line.rsplit(" ", 1)[1]) for line in worker_metrics.splitlines()
                         if line.startswith('steelsight_worker_retries_total{service="s3"}'))
    producer_retries = producer_metrics.RETRIES.labels(service="s3")._value.get() - retries_before
    assert worker_retries + producer_retries > 0, "the outage was never noticed"


def test_workers_killed_at_random_lose_and_duplicate_nothing(settings, tmp_path):
    conn = redis_client(settings)
    started = StartedJobRegistry(settings.queue_name, connection=conn, serializer=JSONSerializer)
    producer = Producer(settings, "line-kill", "cam-1")
    total = 96  # enough that the kills land while frames are in flight
    rng = random.Random(8)
    names = [f"w{i}" for i in range(2)]
    workers = [start_worker(settings, tmp_path, name) for name in names]
    thread, _ = producer_in_thread(producer, replay(SAMPLES, loop=True, limit=total))
    kills, mid_batch = 0, 0
    try:
        wait_until(lambda: len(records(settings, conn)) >= 2, 90, "the first results")
        for round_ in range(4):
            time.sleep(rng.uniform(0.2, 2.5))
            victim = rng.randrange(len(workers))

            def holds_jobs(name=names[victim]) -> bool:
                held = Job.fetch_many(started.get_job_ids(cleanup=False), connection=conn, serializer=JSONSerializer)
                return any(job is not None and job.worker_name == name for job in held)
            # aim at a batch in flight while there is one: 48 frames can be done before a random sleep ends
            with contextlib.suppress(TimeoutError):
                wait_until(holds_jobs, 3, "the victim to hold a batch", interval=0.02)
            workers[victim].kill(signal.SIGKILL)
            kills += 1
            # a dead worker's claimed jobs stay in the started registry under its name until reclaimed
            mid_batch += holds_jobs()
            names[victim] = f"w{victim}-{round_}"
            workers[victim] = start_worker(settings, tmp_path, names[victim])
        thread.join(timeout=120)

        def all_accounted() -> bool:  # a result or a failure each, so a lost frame fails fast
            return len(records(settings, conn)) + len(failed_jobs(settings, conn)) >= total
        wait_until(all_accounted, 180, f"{total} frames accounted for", interval=0.5)
    finally:
        for worker in workers:
            worker.kill(signal.SIGTERM)
    results, failed = records(settings, conn), failed_jobs(settings, conn)
    print(f"random kills: {kills} SIGKILLs ({mid_batch} mid-batch), {len(results)} results, {len(failed)} failed")
    assert kills == 4 and mid_batch >= 1
    assert failed == {} and len(results) == total  # nothing lost
    assert conn.xlen(settings.results_stream) == total  # one stream entry per result
    # the stream write is first-wins, so it cannot show a frame computed twice: each job ran once
    done = Job.fetch_many(list(results), connection=conn, serializer=JSONSerializer)
    assert [job.id for job in done if job is None or len(job.results()) != 1] == []


def test_soak_two_thousand_frames_two_workers(settings, tiny_checkpoint, tmp_path):
    settings = settings.model_copy(update={"checkpoint": str(tiny_checkpoint), "batch_size": 8,
                                           "max_queue_depth": 200, "job_timeout_s": 30})
    conn = redis_client(settings)
    total = 2000
    workers = [start_worker(settings, tmp_path, f"soak{i}") for i in range(2)]
    producer = Producer(settings, "line-soak", "cam-1")
    started = time.monotonic()
    thread, counts = producer_in_thread(producer, replay(SAMPLES, loop=True, limit=total))
    try:
        wait_until(lambda: conn.xlen(settings.results_stream) >= 200, 300, "200 results", interval=0.2)
        rss_at_200 = [rss_bytes(w.proc.pid) for w in workers]
        wait_until(lambda: conn.xlen(settings.results_stream) >= total, 900, f"{total} results", interval=0.5)
        rss_at_end = [rss_bytes(w.proc.pid) for w in workers]
        thread.join(timeout=30)
    finally:
        for worker in workers:
            worker.kill(signal.SIGTERM)
    elapsed = time.monotonic() - started
    results = records(settings, conn)
    assert counts == {"enqueued": total}
    assert len(results) == total and conn.xlen(settings.results_stream) == total
    assert all(r["status"] == "ok" for r in results.values())
    assert failed_jobs(settings, conn) == {}
    growth = [end / start - 1 for start, end in zip(rss_at_200, rss_at_end, strict=True)]
    print(f"soak: {total} frames in {elapsed:.0f}s ({total / elapsed:.1f} fps); RSS MB at 200 "
          f"{[round(r / 2**20) for r in rss_at_200]} -> end {[round(r / 2**20) for r in rss_at_end]}; "
          f"growth {[f'{g:+.1%}' for g in growth]}")
    assert max(growth) < 0.10
