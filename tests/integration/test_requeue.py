"""A frame whose job failed is not stuck: `steelsight requeue` and a re-send both get it a result."""

from __future__ import annotations

import signal
import time

import pytest
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from steelsight.cli import main
from steelsight.clients import redis_client
from steelsight.contract import get_settings
from steelsight.producer.service import Producer, replay

from ..helpers import SAMPLES, SlowEngine, WorkerProcess, records, work_queue


class BrokenEngine(SlowEngine):
    """Every frame fails, as when S3 stayed down longer than the retries last."""

    def compute(self, frames, loads=None):
        from steelsight.worker.outcome import Failed

        return {f.job_id: Failed(OSError("S3 unreachable for too long")) for f in frames}


def failed_ids(settings, conn) -> set[str]:
    return set(FailedJobRegistry(settings.queue_name, connection=conn, serializer=JSONSerializer).get_job_ids())


@pytest.fixture()
def cli_settings(settings, monkeypatch):
    """The settings, as the CLI reads them: from the environment."""
    settings = settings.model_copy(update={"job_retries": 0})
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()


def test_failed_frames_are_listed_requeued_and_get_a_result(cli_settings, tmp_path, capsys):
    settings = cli_settings
    conn = redis_client(settings)
    producer = Producer(settings, "line-f", "cam-1")
    items = list(replay(SAMPLES, limit=3))
    assert [producer.send_file(i) for i in items] == ["enqueued"] * 3
    work_queue(settings, BrokenEngine(), batch=4)
    first, second, third = (f"line-f__cam-1__{i.frame_id}" for i in items)
    reason = "(OSError: S3 unreachable for too long)"
    assert failed_ids(settings, conn) == {first, second, third} and not records(settings, conn)

    # listing and dry run change nothing, and name each frame with its reason
    assert main(["requeue"]) == 0
    out = capsys.readouterr().out
    assert all(f"failed {j}  {reason}" in out for j in (first, second, third)), out
    assert "3 failed frame(s); pass JOB_IDs or --all to requeue" in out
    assert main(["requeue", "--all", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("would requeue ") == 3
    assert main(["requeue", "--all", "--line", "other-line"]) == 0
    assert capsys.readouterr().out.splitlines() == ["requeued 0 frame(s)"]
    assert failed_ids(settings, conn) == {first, second, third}

    # one by id; an unknown id is reported and makes the exit status 1
    assert main(["requeue", first, "line-f__cam-1__nope"]) == 1
    out = capsys.readouterr().out
    assert f"requeued {first}  {reason}" in out and "not a failed frame: line-f__cam-1__nope" in out
    # one by re-sending the same file: a failed frame is not a duplicate
    assert producer.send_file(items[1]) == "requeued"
    # the rest by line and camera
    assert main(["requeue", "--all", "--line", "line-f", "--camera", "cam-1"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"requeued {third}  {reason}", "requeued 1 frame(s)"]
    assert not failed_ids(settings, conn)

    worker = WorkerProcess(settings, tmp_path, "requeue", burst=True)
    try:
        worker.proc.wait(timeout=180)
    finally:
        worker.kill(signal.SIGTERM)
    results = records(settings, conn)
    assert set(results) == {first, second, third}, worker.output()[-2000:]
    assert all(r["status"] == "ok" for r in results.values())
    assert conn.xlen(settings.results_stream) == 3 and not failed_ids(settings, conn)
    assert producer.send_file(items[0]) == "duplicate"  # done now: a re-send is a duplicate again


class FlakyEngine(SlowEngine):
    """The first attempt at each frame fails, the next succeeds: one retry is all a frame needs."""

    def __init__(self):
        super().__init__(compute_s=0.0)
        self.tried: set[str] = set()

    def compute(self, frames, loads=None):
        fresh = {f.job_id for f in frames} - self.tried
        self.tried |= fresh
        results = super().compute(frames, loads)
        return {j: OSError("S3 blip") if j in fresh else r for j, r in results.items()}


def test_requeue_after_the_retry_window_gives_fresh_retries(cli_settings, tmp_path, monkeypatch, capsys):
    conn = redis_client(cli_settings)
    producer = Producer(cli_settings, "line-w", "cam-1")
    item = next(replay(SAMPLES, limit=1))
    assert producer.send_file(item) == "enqueued"
    job_id = f"line-w__cam-1__{item.frame_id}"
    work_queue(cli_settings, BrokenEngine(), batch=1)
    assert failed_ids(cli_settings, conn) == {job_id}

    # the frame failed longer ago than the retry window; the operator requeues it with retries configured
    settings = cli_settings.model_copy(update={"job_retries": 2, "job_retry_window_s": 1.0,
                                               "job_retry_backoff_s": 0.0})
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    time.sleep(1.5)
    assert main(["requeue", job_id]) == 0
    capsys.readouterr()
    work_queue(settings, FlakyEngine(), batch=1)  # fails once, then its retry succeeds
    results = records(settings, conn)
    assert set(results) == {job_id} and results[job_id]["status"] == "ok", failed_ids(settings, conn)
    assert not failed_ids(settings, conn)
