"""``steelsight up``: the whole product on one machine, for demos and development.

Redis (append-only, under ``--data``), an S3 endpoint (a ``minio`` binary when
one is on PATH, otherwise moto's server as a clearly labelled, non-persistent
stand-in), two workers, the producer replaying the bundled samples and the
dashboard. Ctrl-C stops every process it started.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .contract import Settings
from .devstack import Service, redis_server, s3_server, wait_until

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"


@dataclass
class Stack:
    data_dir: Path
    port_offset: int = 0
    frames: int | None = None
    fps: float = 2.0
    workers: int = 2
    services: list[Service] = field(default_factory=list)
    children: list[subprocess.Popen] = field(default_factory=list)

    def port(self, base: int) -> int:
        return base + self.port_offset

    def start_storage(self) -> tuple[str, str, str]:
        """Start Redis and S3; returns (redis url, S3 endpoint, a description of the S3 server)."""
        (self.data_dir / "redis").mkdir(parents=True, exist_ok=True)
        redis = redis_server(self.data_dir / "redis", appendonly=True, port=self.port(16379)).start()
        self.services.append(redis)
        s3_port = self.port(19000)
        if shutil.which("minio"):
            (self.data_dir / "minio").mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, MINIO_ROOT_USER=self.access_key, MINIO_ROOT_PASSWORD=self.secret_key)
            s3 = Service(["minio", "server", str(self.data_dir / "minio"), "--address", f"127.0.0.1:{s3_port}",
                          "--console-address", f"127.0.0.1:{s3_port + 1}"], s3_port,
                         self.data_dir / "minio.log", env=env).start()
            kind = f"MinIO, data in {self.data_dir / 'minio'}"
        else:
            s3 = s3_server(self.data_dir, port=s3_port).start()
            kind = "moto S3 server: a NON-PERSISTENT development stand-in for MinIO (install `minio` to keep data)"
        self.services.append(s3)
        return f"redis://127.0.0.1:{redis.port}/0", f"127.0.0.1:{s3.port}", kind

    def settings(self, redis_url: str, s3_endpoint: str) -> Settings:
        return Settings(redis_url=redis_url, s3_endpoint=s3_endpoint, s3_access_key=self.access_key,
                        s3_secret_key=self.secret_key, dashboard_port=self.port(7860),
                        dashboard_metrics_port=self.port(9102))

    def spawn(self, settings: Settings, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.data_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it until exit
        env = dict(os.environ) | settings.to_env()
        proc = subprocess.Popen([sys.executable, "-m", "steelsight.cli", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append(proc)
        return proc

    def up(self) -> Settings:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.access_key, self.secret_key = self._credentials()
        redis_url, s3_endpoint, s3_kind = self.start_storage()
        settings = self.settings(redis_url, s3_endpoint)
        for i in range(self.workers):
            worker = settings.model_copy(update={"metrics_port": self.port(9100) + i * 10})
            self.spawn(worker, f"worker-{i + 1}", ["worker", "--name", f"worker-{i + 1}-{self.port(0)}"])
        producer = ["produce", "--source", str(SAMPLES), "--loop", "--fps", str(self.fps),
                    "--metrics-port", str(self.port(9103))]
        if self.frames is not None:
            producer += ["--limit", str(self.frames)]
        self.spawn(settings, "producer", producer)
        self.spawn(settings, "dashboard", ["dashboard"])
        print(f"redis      {redis_url} (append-only, {self.data_dir / 'redis'})")
        print(f"s3         http://{s3_endpoint} — {s3_kind}")
        print(f"workers    {self.workers}, metrics on " + ", ".join(
            f"http://127.0.0.1:{self.port(9100) + i * 10}/metrics" for i in range(self.workers)))
        print(f"producer   replaying {SAMPLES} at {self.fps} fps, metrics on http://127.0.0.1:{self.port(9103)}/metrics")
        print(f"logs       {self.data_dir}/*.log")
        url = f"http://127.0.0.1:{settings.dashboard_port}/"
        wait_until(lambda: self._dashboard_up(url), 180, "the dashboard", interval=0.5)
        print(f"dashboard  {url}  (metrics on http://127.0.0.1:{settings.dashboard_metrics_port}/metrics)")
        print("ready — Ctrl-C stops everything", flush=True)
        return settings

    def _dashboard_up(self, url: str) -> bool:
        import urllib.request

        for proc in self.children:
            if proc.poll() is not None and proc.returncode != 0:
                raise RuntimeError(f"a process exited with {proc.returncode}: see {self.data_dir}/*.log")
        return urllib.request.urlopen(url, timeout=2).status == 200

    def _credentials(self) -> tuple[str, str]:
        """Random per-data-dir credentials for the local S3 server, kept so a restart can read old data."""
        path = self.data_dir / "s3-credentials"
        if not path.exists():
            path.write_text(f"steelsight-{secrets.token_hex(4)}\n{secrets.token_urlsafe(24)}\n")
            path.chmod(0o600)
        access, secret = path.read_text().split()
        return access, secret

    def down(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not strand half the processes
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for proc in self.children:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for service in reversed(self.services):
            service.stop()
        print("stopped: workers, producer, dashboard, S3 and Redis")


def run_stack(stack: Stack) -> int:
    """Bring the stack up and keep it until Ctrl-C (SIGINT) or SIGTERM."""
    # installed explicitly: a shell starts background jobs with SIGINT ignored, and Ctrl-C must still work
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        stack.up()
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stack.down()
    return 0
