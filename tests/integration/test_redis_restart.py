"""Redis restarted mid-stream (append-only on): producer and worker reconnect, no frame is lost."""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

from pydantic import SecretStr

from steelsight.clients import redis_client
from steelsight.devstack import redis_server, wait_until
from steelsight.producer.service import Producer, replay, run_producer

from ..helpers import SAMPLES, WorkerProcess, records

FRAMES = 20


def test_redis_restart_loses_no_frame(settings, tmp_path):
    (tmp_path / "redis").mkdir()
    redis = redis_server(tmp_path / "redis", appendonly=True).start()
    settings = settings.model_copy(update={"redis_url": SecretStr(f"redis://127.0.0.1:{redis.port}/0")})
    worker = WorkerProcess(settings, tmp_path, "restart-worker")
    producer = Producer(settings, "line-r", "cam-1")
    conn = redis_client(settings)
    frames = replay(SAMPLES, limit=FRAMES)
    counts: dict[str, int] = {}
    try:
        for item in [next(frames), next(frames)]:  # the worker is up and serving before the restart
            producer.send_file(item)
        wait_until(lambda: len(records(settings, conn)) == 2, 120, "the first results")
        sender = threading.Thread(target=lambda: counts.update(run_producer(producer, frames, fps=5)))
        sender.start()
        time.sleep(1.0)
        redis.stop()  # SIGTERM: redis flushes its append-only file
        assert sender.is_alive()  # frames were still on their way
        time.sleep(3.0)
        redis = redis_server(tmp_path / "redis", appendonly=True, port=redis.port).start()
        sender.join(timeout=120)
        wait_until(lambda: len(records(settings, conn)) == FRAMES, 180, f"{FRAMES} results")
        assert counts == {"enqueued": FRAMES - 2}
        assert conn.xlen(settings.results_stream) == FRAMES
        assert worker.proc.poll() is None, worker.output()[-2000:]
        assert "lost Redis while working" in worker.output() or "could not connect to Redis" in worker.output()
    finally:
        worker.kill(signal.SIGTERM)
        redis.stop()


def incr_aof(workdir: Path) -> Path:
    """The append-only file Redis 7 is appending to now (the last INCR part of its manifest)."""
    manifest = next((workdir / "appendonlydir").glob("*.manifest")).read_text()
    return workdir / "appendonlydir" / re.findall(r"file (\S+) seq \d+ type i", manifest)[-1]


class RecordingProducer(Producer):
    """Counts the producer's enqueues, so the test can cut Redis's disk at a known frame."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.enqueued: list[str] = []
        self.changed = threading.Condition()

    def _enqueue(self, frame):
        super()._enqueue(frame)
        with self.changed:
            self.enqueued.append(frame.job_id)
            self.changed.notify_all()

    def wait_for(self, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.enqueued) >= n, timeout=60)


def test_redis_sigkill_with_unsynced_writes_loses_no_frame(settings, tmp_path):
    """Redis SIGKILLed mid-stream, and the writes it had not fsynced yet lost with it.

    With ``appendfsync everysec`` Redis answers a write before it is on disk: a crash of
    its machine (power, kernel) loses about the last second of acknowledged writes, up to
    ~3 s when a slow disk makes Redis hold back its writes. SIGKILL alone leaves them in
    the page cache, so the test truncates the append-only file back to a point taken 2
    frames before the kill: those frames' jobs, and any results written meanwhile, are
    gone. The producer must notice (their jobs are gone) and enqueue them again.
    """
    workdir = tmp_path / "redis"
    workdir.mkdir()

    def redis_proc(port=None):
        service = redis_server(workdir, appendonly=True, port=port)
        service.args += ["--appendfsync", "everysec", "--aof-load-truncated", "yes"]
        return service.start()

    redis = redis_proc()
    settings = settings.model_copy(update={"redis_url": SecretStr(f"redis://127.0.0.1:{redis.port}/0")})
    worker = WorkerProcess(settings, tmp_path, "sigkill-worker")
    producer = RecordingProducer(settings, "line-k9", "cam-1")
    conn = redis_client(settings)
    counts: dict[str, int] = {}
    try:
        sender = threading.Thread(target=lambda: counts.update(
            run_producer(producer, replay(SAMPLES, limit=FRAMES), fps=5)))
        sender.start()
        producer.wait_for(8)
        time.sleep(0.05)
        cut = incr_aof(workdir).stat().st_size  # what would be on disk at a crash ~1 s from now
        lost = producer.enqueued[8:]
        producer.wait_for(10)
        redis.stop(signal.SIGKILL)
        with open(incr_aof(workdir), "r+b") as f:
            f.truncate(cut)
        redis = redis_proc(redis.port)
        plain = redis_client(settings)
        assert not any(plain.exists(f"rq:job:{job_id}") for job_id in lost[:2]), "the cut lost nothing"
        sender.join(timeout=120)
        wait_until(lambda: len(records(settings, conn)) == FRAMES, 180, f"{FRAMES} results")
        assert counts["enqueued"] == FRAMES and counts["resent"] >= 2, counts
        assert conn.xlen(settings.results_stream) == FRAMES
        assert worker.proc.poll() is None, worker.output()[-2000:]
    finally:
        worker.kill(signal.SIGTERM)
        redis.stop()
