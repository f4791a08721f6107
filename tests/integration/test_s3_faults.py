"""The object store answering errors or stalling mid-stream, through an HTTP proxy in front of SeaweedFS."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from pydantic import SecretStr

from steelsight.cli import main
from steelsight.clients import ObjectStore, redis_client
from steelsight.contract import get_settings
from steelsight.devstack import free_port, s3_server, wait_until
from steelsight.producer.service import Producer, replay, run_producer

from ..faults import HttpFaultProxy
from ..helpers import SAMPLES, WorkerProcess, records
from .test_faults import failed_jobs

FRAMES = 20


@pytest.mark.parametrize("mode", ["503", "502", "slow"])
def test_s3_errors_and_stalls_for_10_s_lose_no_frame(services, settings, tmp_path, mode):
    """MinIO's XML ``503 SlowDown``, a proxy's HTML ``502`` and 2 s stalls, each for 10 s mid-stream:
    every frame gets an ``ok`` result, nothing reaches the failed registry, and the producer keeps running."""
    _, s3 = services
    proxy = HttpFaultProxy(s3.port, slow_s=2.0).start()
    settings = settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{proxy.port}", "metrics_port": free_port()})
    conn = redis_client(settings)
    producer = Producer(settings, f"line-{mode}", "cam-1")
    worker = WorkerProcess(settings, tmp_path, f"http-{mode}-worker")
    counts: dict = {}
    errors: list[BaseException] = []

    def produce():
        try:
            counts.update(run_producer(producer, replay(SAMPLES, loop=True, limit=FRAMES), fps=3))
        except BaseException as exc:  # the producer must not die: record it for the assertion
            errors.append(exc)

    thread = threading.Thread(target=produce, daemon=True)
    try:
        wait_until(lambda: conn.scard("rq:workers") > 0, 60, "the worker to register")
        thread.start()
        wait_until(lambda: len(records(settings, conn)) >= 3, 60, "the first results")
        proxy.mode = mode
        time.sleep(10.0)
        proxy.mode = None
        thread.join(timeout=120)
        wait_until(lambda: len(records(settings, conn)) == FRAMES, 120, f"all {FRAMES} results")
    finally:
        worker.kill(signal.SIGTERM)
        proxy.stop()
    assert errors == [], f"the producer died: {errors!r}"
    assert counts.get("enqueued") == FRAMES
    assert proxy.faulted > 0, "the fault never hit a request"
    assert all(r["status"] == "ok" for r in records(settings, conn).values())
    assert failed_jobs(settings, conn) == {}


def test_a_full_disk_sends_frames_to_the_failed_registry_with_the_reason(settings, tmp_path):
    """SeaweedFS with its disk 'full' (free space under ``-volume.minFreeSpace``) refuses every write: the
    worker cannot store overlays, so each frame ends in the failed registry saying why, none is lost, and
    ``steelsight requeue`` brings them all to a result once there is room again."""
    frames = 4
    store_dir = tmp_path / "store"
    s3 = s3_server(store_dir).start()
    settings = settings.model_copy(update={
        "s3_endpoint": f"127.0.0.1:{s3.port}", "metrics_port": free_port(),
        "s3_access_key": SecretStr(s3.credentials.access_key), "s3_secret_key": SecretStr(s3.credentials.secret_key),
        "s3_retry_window_s": 2.0, "job_retries": 1, "job_retry_backoff_s": 0.5})
    conn = redis_client(settings)
    producer = Producer(settings, "line-full", "cam-1")
    assert run_producer(producer, replay(SAMPLES, limit=frames)) == {"enqueued": frames}
    s3.stop()
    full = s3_server(store_dir, port=s3.port, ports=s3.ports)
    full.args.append("-volume.minFreeSpace=99.99")  # every volume read-only, no room for new ones
    full.ready = full.accepting
    full.start()
    worker = WorkerProcess(settings, tmp_path, "full-disk-worker")
    try:
        wait_until(lambda: len(failed_jobs(settings, conn)) == frames, 120, "every frame in the failed registry")
        reasons = failed_jobs(settings, conn)
        assert records(settings, conn) == {}
        assert all("500" in r or "InternalError" in r for r in reasons.values()), reasons
    finally:
        worker.kill(signal.SIGTERM)
        full.stop()
    s3 = s3_server(store_dir, port=s3.port, ports=s3.ports).start()  # room again
    worker = WorkerProcess(settings, tmp_path, "after-full-worker")
    try:
        for key, value in settings.to_env().items():
            os.environ[key] = value
        get_settings.cache_clear()
        assert main(["requeue", "--all"]) == 0
        wait_until(lambda: len(records(settings, conn)) == frames, 120, f"all {frames} results")
    finally:
        for key in settings.to_env():
            os.environ.pop(key, None)
        get_settings.cache_clear()
        worker.kill(signal.SIGTERM)
        s3.stop()
    assert all(r["status"] == "ok" for r in records(settings, conn).values())


def test_seaweedfs_killed_mid_stream_loses_no_acknowledged_frame(settings, tmp_path):
    """SIGKILL of the whole store (master, volume, filer, gateway) while frames flow, then a restart over
    the same data: every frame gets a result, and every frame and overlay the store had acknowledged
    reads back."""
    frames = 16
    store_dir = tmp_path / "store"
    s3 = s3_server(store_dir).start()
    settings = settings.model_copy(update={
        "s3_endpoint": f"127.0.0.1:{s3.port}", "metrics_port": free_port(),
        "s3_access_key": SecretStr(s3.credentials.access_key), "s3_secret_key": SecretStr(s3.credentials.secret_key)})
    conn = redis_client(settings)
    producer = Producer(settings, "line-kill-s3", "cam-1")
    worker = WorkerProcess(settings, tmp_path, "store-kill-worker")
    counts: dict = {}
    thread = threading.Thread(target=lambda: counts.update(
        run_producer(producer, replay(SAMPLES, loop=True, limit=frames), fps=4)), daemon=True)
    try:
        wait_until(lambda: conn.scard("rq:workers") > 0, 60, "the worker to register")
        thread.start()
        wait_until(lambda: len(records(settings, conn)) >= 3, 60, "the first results")
        s3.stop(signal.SIGKILL)
        time.sleep(2.0)
        s3 = s3_server(store_dir, port=s3.port, ports=s3.ports).start()
        thread.join(timeout=120)
        wait_until(lambda: len(records(settings, conn)) == frames, 120, f"all {frames} results")
        results = records(settings, conn)
        store = ObjectStore(settings)
        for r in results.values():
            assert store.get(settings.frames_bucket, r["frame_key"])
            assert store.get(settings.overlays_bucket, r["overlay_key"])
    finally:
        worker.kill(signal.SIGTERM)
        s3.stop()
    assert counts.get("enqueued") == frames
    assert all(r["status"] == "ok" for r in results.values())
    assert failed_jobs(settings, conn) == {}


def test_a_port_taken_between_the_pick_and_weeds_bind_is_picked_again(tmp_path, monkeypatch):
    """weed binds eight ports picked free a moment before; one taken in between (by another test's
    server or an outgoing connection) ends the process. The start picks fresh ports and serves."""
    import socket

    from minio import Minio

    from steelsight import devstack

    picked = devstack.free_port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", picked()))
        holder.listen()
        taken = holder.getsockname()[1]
        first = iter([taken])
        monkeypatch.setattr(devstack, "free_port", lambda: next(first, None) or picked())
        server = devstack.s3_server(tmp_path)
        assert server.ports["master.port"] == taken
        server.start()
        try:
            assert taken not in (server.port, *server.ports.values())
            assert "address already in use" in server.log_path.read_text()
            creds = server.credentials
            client = Minio(f"127.0.0.1:{server.port}", creds.access_key, creds.secret_key, secure=False)
            assert client.list_buckets() == []
        finally:
            server.stop()


def test_free_ports_are_picked_below_the_kernels_range_for_outgoing_connections():
    """The kernel gives outgoing connections source ports from its ephemeral range, so a port picked
    there can be gone before the server binds it (a SeaweedFS gRPC port was, once, in a full run)."""
    from steelsight.devstack import ephemeral_port_range

    low, high = ephemeral_port_range()
    ports = [free_port() for _ in range(200)]
    assert not [p for p in ports if low <= p <= high]


def test_a_store_on_fixed_ports_reports_a_taken_port_instead_of_moving(tmp_path):
    """`steelsight up` fixes its ports (links and dashboards point at them): a taken one is an error
    naming weed's log, not a store quietly serving elsewhere."""
    import socket

    from steelsight.devstack import ServiceExited

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", free_port()))
        holder.listen()
        names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port.grpc")
        ports = {name: free_port() for name in names} | {"master.port": holder.getsockname()[1]}
        server = s3_server(tmp_path, port=free_port(), ports=ports)
        with pytest.raises(ServiceExited, match="address already in use"):
            server.start()
        server.stop()
