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
    """moto's S3 server: S3-compatible and in memory, a stand-in for MinIO that keeps nothing."""
    port = port or free_port()
    args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return Service(args, port, workdir / f"moto-{port}.log")
