"""The worker's HTTP endpoint: Prometheus ``/metrics`` and a heartbeat-based ``/healthz``.

``/metrics`` answers as long as the process lives, so a liveness probe on it never
sees a hung work loop. ``/healthz`` answers 200 only while the work loop has beaten
within ``stale_after_s``: the loop beats every second when idle and while a batch
computes, until the batch has taken longer than a job may.
"""

from __future__ import annotations

import contextlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from . import metrics


class Liveness:
    """When the work loop last beat, or what it is waiting for."""

    def __init__(self, stale_after_s: float):
        self.stale_after_s = stale_after_s
        self.waiting_for: str | None = None
        self.beat()

    def beat(self) -> None:
        self._last = time.monotonic()
        metrics.HEARTBEAT.set_to_current_time()

    def age(self) -> float:
        return time.monotonic() - self._last

    def healthy(self) -> bool:
        return self.waiting_for is not None or self.age() <= self.stale_after_s

    @contextlib.contextmanager
    def waiting(self, what: str):
        """Backing off until ``what`` answers is alive, not hung: a restart would not bring it back sooner."""
        self.waiting_for = what
        try:
            yield
        finally:
            self.waiting_for = None
            self.beat()


def serve(host: str, port: int, liveness: Liveness) -> ThreadingHTTPServer:
    """Serve ``/metrics`` and ``/healthz`` on a daemon thread; the caller may ``shutdown()`` it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                age, waiting = liveness.age(), liveness.waiting_for
                ok = liveness.healthy()
                body = (f"ok: waiting for {waiting}\n" if waiting else
                        f"{'ok' if ok else 'stale'}: work loop last beat {age:.1f}s ago "
                        f"(limit {liveness.stale_after_s:.0f}s)\n").encode()
                self._answer(200 if ok else 503, body, "text/plain; charset=utf-8")
            elif path in ("/metrics", "/"):
                self._answer(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            else:
                self._answer(404, b"not found\n", "text/plain; charset=utf-8")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # probes every few seconds would flood the log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
