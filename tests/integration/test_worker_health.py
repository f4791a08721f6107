"""/healthz follows the work loop's heartbeat: a hung loop is reported, while /metrics still answers."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

from steelsight.devstack import free_port, wait_until

from ..helpers import SlowEngine, enqueue_frames


class HungEngine(SlowEngine):
    """A model call that does not return until released."""

    def __init__(self):
        super().__init__(compute_s=0)
        self.release = threading.Event()

    def compute(self, frames, loads=None):
        self.release.wait(60)
        return super().compute(frames, loads)


def status(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=2).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_hung_work_loop_reports_unhealthy_and_recovers(settings):
    from steelsight.worker import health
    from steelsight.worker.service import make_worker

    settings = settings.model_copy(update={"job_timeout_s": 1, "health_stale_s": 2.0})
    liveness = health.Liveness(settings.health_stale_s)
    server = health.serve(settings.metrics_host, free_port(), liveness)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    engine = HungEngine()
    worker = make_worker(settings, engine, liveness=liveness)
    worker._install_signal_handlers = lambda: None  # signals belong to the main thread
    loop = threading.Thread(target=worker.work, kwargs={"max_idle_time": 4, "with_scheduler": False}, daemon=True)
    try:
        assert server.server_address[0] == "127.0.0.1"  # the metrics_host setting
        loop.start()
        wait_until(lambda: status(f"{base}/healthz") == 200, 10, "the idle loop to look healthy")
        enqueue_frames(settings, "line-h", 2)
        wait_until(lambda: status(f"{base}/healthz") == 503, 15, "the hung loop to be reported", 0.2)
        assert status(f"{base}/metrics") == 200  # what a probe on /metrics would have seen
        engine.release.set()
        wait_until(lambda: status(f"{base}/healthz") == 200, 10, "health to come back", 0.2)
        loop.join(30)
    finally:
        engine.release.set()
        server.shutdown()
    assert not loop.is_alive()


def test_a_worker_waiting_for_redis_stays_healthy_and_says_so(settings, tmp_path):
    """Waiting out a Redis outage is not a hung loop: a liveness probe must not restart the pod for it."""
    from pydantic import SecretStr

    from steelsight.devstack import redis_server
    from steelsight.worker import health
    from steelsight.worker.service import make_worker

    port = free_port()
    settings = settings.model_copy(update={"redis_url": SecretStr(f"redis://127.0.0.1:{port}/0"),
                                           "health_stale_s": 1.0})
    liveness = health.Liveness(settings.health_stale_s)
    server = health.serve(settings.metrics_host, free_port(), liveness)
    url = f"http://127.0.0.1:{server.server_address[1]}/healthz"
    made = threading.Thread(target=make_worker, args=(settings, SlowEngine()), kwargs={"liveness": liveness},
                            daemon=True)
    redis = None
    try:
        made.start()
        seen = set()
        for _ in range(15):  # 3 s, three times the stale limit, with Redis down
            seen.add(status(url))
            threading.Event().wait(0.2)
        assert seen == {200}
        assert b"waiting for Redis" in urllib.request.urlopen(url, timeout=2).read()
        redis = redis_server(tmp_path, port=port).start()
        made.join(30)
        assert not made.is_alive()
    finally:
        server.shutdown()
        if redis:
            redis.stop()
