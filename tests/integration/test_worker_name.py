"""Replicas of a containerised worker all run as PID 1: their default names must still differ."""

from __future__ import annotations

import socket

from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from steelsight.clients import redis_client
from steelsight.worker import service
from steelsight.worker.rqworker import BatchingWorker

from ..helpers import SlowEngine, enqueue_frames


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


def test_a_restart_under_a_fixed_name_works_while_its_dead_predecessor_is_still_registered(settings):
    conn = redis_client(settings)
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    engine = SlowEngine(compute_s=0.0)
    # the predecessor was SIGKILLed: its key lives on without a death record; RQ refuses the name (ValueError)
    dead = BatchingWorker([queue], settings=settings, engine=engine, connection=conn, serializer=JSONSerializer,
                          name="fixed")
    dead.register_birth()
    try:
        enqueue_frames(settings, "line-fixed", 3)
        service.work(settings, engine, burst=True, name="fixed")  # before: ValueError, an active worker named so
        assert queue.get_job_ids() == [] and sum(n for event, n, _ in engine.events if event == "computed") == 3
        jobs = Job.fetch_many([f"line-fixed__cam-1__f{i}" for i in range(3)], connection=conn,
                              serializer=JSONSerializer)
        assert {job.worker_name for job in jobs} == {"fixed-r1"}
    finally:
        dead.register_death()
