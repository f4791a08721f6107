"""Local stand-ins for development, tests and benchmarks: redis-server and an S3 server on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # the service is still starting
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class Service:
    def __init__(self, args: list[str], port: int, log: Path, env: dict | None = None):
        self.args, self.port, self.log_path, self.env = args, port, log, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Service:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        wait_until(self.accepting, 30, f"{self.args[0]} on port {self.port}")
        return self

    def accepting(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.args} exited: see {self.log_path}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            return True

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=20)
        self.log.close()


def redis_server(workdir: Path, appendonly: bool = False, port: int | None = None) -> Service:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run ./deploy/install-system-deps.sh")
    port = port or free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
            "--appendonly", "yes" if appendonly else "no"]
    return Service(args, port, workdir / f"redis-{port}.log")


def s3_server(workdir: Path, port: int | None = None) -> Service:
    """moto's S3, in memory, served with keep-alive connections: a stand-in for MinIO that keeps nothing.

    moto's own server (werkzeug's) closes every connection after one request, so each
    S3 call reconnected, costing the client's core 0.15 ms that MinIO does not
    (bench/README.md); waitress keeps connections open as MinIO does.
    """
    port = port or free_port()
    args = [sys.executable, "-m", "steelsight.devstack", "s3", str(port)]
    return Service(args, port, workdir / f"moto-{port}.log")


def serve_s3(port: int) -> None:
    """moto's S3 application alone.

    moto's server puts every AWS service behind ``DomainDispatcherApplication``, which
    works out the service of each request under one lock, listing moto's ~200 service
    folders on disk to do it. Only S3 is served here, so requests go straight to the
    app the dispatcher would pick: 0.77 instead of 1.44 ms of CPU per request
    (bench/s3_standin.py).
    """
    from moto.moto_server.werkzeug_app import create_backend_app
    from waitress import serve

    os.environ.setdefault("MOTO_PORT", str(port))  # as moto's own server does
    serve(create_backend_app("s3"), host="127.0.0.1", port=port, threads=8, _quiet=True)


if __name__ == "__main__":
    if sys.argv[1:2] != ["s3"] or len(sys.argv) != 3:
        sys.exit("usage: python -m steelsight.devstack s3 PORT")
    serve_s3(int(sys.argv[2]))
