"""Redis restarted mid-stream (append-only on): producer and worker reconnect, no frame is lost."""

from __future__ import annotations

import signal
import threading
import time

from pydantic import SecretStr

from steelsight.clients import redis_client
from steelsight.devstack import redis_server, wait_until
from steelsight.producer.service import Producer, replay, run_producer

from .helpers import SAMPLES, WorkerProcess, records

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
