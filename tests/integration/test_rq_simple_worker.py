"""Queued frames stay plain RQ jobs: RQ's own ``SimpleWorker`` runs one through the job function."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from steelsight.clients import ObjectStore, redis_client
from steelsight.contract import JOB_FUNCTION, Frame, get_settings
from steelsight.producer.service import Producer, replay
from steelsight.worker import jobs

from ..helpers import SAMPLES, records


@pytest.fixture()
def process_settings(settings, monkeypatch):
    """``settings`` as the process's own (``get_settings``), which is all a plain RQ worker's job function reads."""
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    jobs.plain_engine.cache_clear()
    yield settings
    get_settings.cache_clear()
    jobs.plain_engine.cache_clear()


def test_a_plain_simple_worker_processes_a_frame(process_settings):
    settings = process_settings
    conn = redis_client(settings)
    producer = Producer(settings, "line-s", "cam-1")
    assert producer.send_file(next(replay(SAMPLES, limit=1))) == "enqueued"
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    [job_id] = queue.get_job_ids()

    assert SimpleWorker([queue], connection=conn, serializer=JSONSerializer).work(burst=True) is True

    record = json.loads(conn.get(settings.result_key(job_id)))
    assert record["job_id"] == job_id and record["status"] == "ok" and record["label"]
    assert ObjectStore(settings).exists(settings.overlays_bucket, record["overlay_key"])
    assert conn.xlen(settings.results_stream) == 1
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FINISHED
    assert job.latest_result().return_value["overlay_key"] == record["overlay_key"]


def test_a_plain_simple_worker_refuses_a_payload_for_another_frames_id(process_settings):
    settings = process_settings
    conn = redis_client(settings)
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    other = Frame(frame_id="f1", line_id="line-i", camera_id="cam-1", captured_at=datetime.now(UTC), ext="png")
    queue.enqueue(JOB_FUNCTION, frame=other.model_dump(mode="json"), job_id="line-i__cam-1__f0")

    SimpleWorker([queue], connection=conn, serializer=JSONSerializer).work(burst=True)

    assert records(settings, conn) == {}  # nothing written under f1's id
    failed = FailedJobRegistry(settings.queue_name, connection=conn, serializer=JSONSerializer)
    assert failed.get_job_ids() == ["line-i__cam-1__f0"]
    job = Job.fetch("line-i__cam-1__f0", connection=conn, serializer=JSONSerializer)
    assert "RefusedJob" in job.latest_result().exc_string
