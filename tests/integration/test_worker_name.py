"""Replicas of a containerised worker all run as PID 1: their default names must still differ."""

from __future__ import annotations

import socket

from rq import Queue
from rq.serializers import JSONSerializer

from steelsight.clients import redis_client
from steelsight.worker import service
from steelsight.worker.rqworker import BatchingWorker

from ..helpers import SlowEngine


def test_default_names_differ_for_the_same_pid(monkeypatch):
    monkeypatch.setattr(service.os, "getpid", lambda: 1)
    names = {service.default_name() for _ in range(50)}
    assert len(names) == 50
    assert all(name.startswith(f"{socket.gethostname()}-1-") for name in names)


def test_a_replica_starts_beside_a_live_worker_with_the_same_pid(settings, monkeypatch):
    conn = redis_client(settings)
    monkeypatch.setattr(service.os, "getpid", lambda: 1)
    # the first replica (or the previous, SIGKILLed process of this pod) still holds its worker key
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    engine = SlowEngine()
    first = BatchingWorker([queue], settings=settings, engine=engine, connection=conn, serializer=JSONSerializer,
                           name=service.default_name())
    first.register_birth()
    old_style = BatchingWorker([queue], settings=settings, engine=engine, connection=conn, serializer=JSONSerializer,
                               name="steelsight-1")
    old_style.register_birth()
    try:
        assert service.work(settings, engine, burst=True) is False  # registered, found nothing to do, left cleanly
    finally:
        first.register_death()
        old_style.register_death()
