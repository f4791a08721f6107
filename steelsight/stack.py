"""``steelsight up``: the whole product on one machine, for demos and development.

Redis (append-only) and SeaweedFS (or ``--s3 minio``), both keeping their data
under ``--data`` so that a second run finds the first run's frames, two workers,
the dashboard, Prometheus scraping them all with the alert rules loaded, and the
producer replaying the bundled samples once every worker has its model loaded.
Ctrl-C stops every process it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .alerts import check_rules, rules_path
from .contract import SAMPLE_FRAMES, Settings, redis_bytes_needed
from .devstack import Service, ServiceExited, minio_server, prometheus_server, redis_server, s3_server, wait_until

S3_PORT = 19000
PROMETHEUS_PORT = 19090
SCRAPE_INTERVAL_S = 5.0
# SeaweedFS's inner ports, fixed so that a restart over the same data finds the same cluster
SEAWEEDFS_PORTS = {"master.port": 19333, "master.port.grpc": 19334, "volume.port": 19380, "volume.port.grpc": 19381,
                   "filer.port": 19388, "filer.port.grpc": 19389, "s3.port.grpc": 19002}


@dataclass
class Stack:
    data_dir: Path
    port_offset: int = 0
    frames: int | None = None
    fps: float = 2.0
    workers: int = 2
    s3: str = "seaweedfs"
    prometheus: bool = True
    services: list[Service] = field(default_factory=list)
    children: list[subprocess.Popen] = field(default_factory=list)

    def port(self, base: int) -> int:
        return base + self.port_offset

    def start_storage(self) -> tuple[str, Service, str]:
        """Start Redis and the object store; returns (redis url, the S3 service, a description of it)."""
        (self.data_dir / "redis").mkdir(parents=True, exist_ok=True)
        defaults = Settings()
        # room for this frame rate's records (steelsight check-sizing); old results go first when full
        maxmemory = max(redis_bytes_needed(defaults, self.fps), 256 * 1024**2)
        redis = redis_server(self.data_dir / "redis", appendonly=True, port=self.port(16379),
                             maxmemory=maxmemory).start()
        self.services.append(redis)
        if self.s3 == "minio":
            s3 = minio_server(self.data_dir, port=self.port(S3_PORT)).start()
            kind = f"MinIO, data in {self.data_dir / 'minio'}"
        else:
            ports = {name: self.port(port) for name, port in SEAWEEDFS_PORTS.items()}
            s3 = s3_server(self.data_dir, port=self.port(S3_PORT), ports=ports, volume_size_mb=1024,
                           expiry_days=defaults.object_expiry,
                           expiring=(defaults.frames_bucket, defaults.overlays_bucket)).start()
            kind = f"SeaweedFS S3 gateway, data in {self.data_dir / 'seaweedfs'}"
        self.services.append(s3)
        return f"redis://127.0.0.1:{redis.port}/0", s3, kind

    def settings(self, redis_url: str, s3: Service) -> Settings:
        return Settings(redis_url=redis_url, s3_endpoint=f"127.0.0.1:{s3.port}",
                        s3_access_key=s3.credentials.access_key, s3_secret_key=s3.credentials.secret_key,
                        dashboard_port=self.port(7860),
                        dashboard_metrics_port=self.port(9102),
                        prometheus_url=f"http://127.0.0.1:{self.port(PROMETHEUS_PORT)}" if self.prometheus else None)

    def worker_metrics_port(self, i: int) -> int:
        return self.port(9100) + i * 10

    def start_prometheus(self, settings: Settings) -> str:
        """Prometheus scraping every process this stack starts, with the alert rules; returns a line to print."""
        rules = rules_path(settings)
        targets = {"steelsight-worker": [f"127.0.0.1:{self.worker_metrics_port(i)}" for i in range(self.workers)],
                   "steelsight-producer": [f"127.0.0.1:{self.port(9103)}"],
                   "steelsight-dashboard": [f"127.0.0.1:{settings.dashboard_metrics_port}"]}
        prometheus = prometheus_server(self.data_dir / "prometheus", targets, rules, port=self.port(PROMETHEUS_PORT),
                                       scrape_interval_s=SCRAPE_INTERVAL_S, evaluation_interval_s=SCRAPE_INTERVAL_S)
        self.services.append(prometheus.start())
        return f"prometheus {prometheus.url}/alerts — rules {rules}, data in {self.data_dir / 'prometheus'}"

    def spawn(self, settings: Settings, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.data_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it until exit
        env = dict(os.environ) | settings.to_env()
        proc = subprocess.Popen([sys.executable, "-m", "steelsight.cli", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append(proc)
        return proc

    def up(self) -> Settings:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        redis_url, s3, s3_kind = self.start_storage()
        settings = self.settings(redis_url, s3)
        prometheus = self.start_prometheus(settings) if self.prometheus else None
        workers = {}
        for i in range(self.workers):
            name = f"worker-{i + 1}-{self.port(0)}"
            worker = settings.model_copy(update={"metrics_port": self.worker_metrics_port(i)})
            workers[name] = self.spawn(worker, f"worker-{i + 1}", ["worker", "--name", name]).pid
        self.spawn(settings, "dashboard", ["dashboard"])
        print(f"redis      {redis_url} (append-only, {self.data_dir / 'redis'})")
        print(f"s3         http://{settings.s3_endpoint} — {s3_kind}")
        if prometheus:
            print(prometheus)
        print(f"workers    {self.workers}, metrics on " + ", ".join(
            f"http://127.0.0.1:{self.worker_metrics_port(i)}/metrics" for i in range(self.workers)), flush=True)
        # frames sent before the models are loaded would only wait in the queue
        self._wait(lambda: self._workers_ready(settings, workers), "the workers to load the model")
        producer = ["produce", "--source", str(SAMPLE_FRAMES), "--loop", "--fps", str(self.fps),
                    "--metrics-port", str(self.port(9103))]
        if self.frames is not None:
            producer += ["--limit", str(self.frames)]
        self.spawn(settings, "producer", producer)
        print(f"producer   replaying {SAMPLE_FRAMES} at {self.fps} fps, metrics on http://127.0.0.1:{self.port(9103)}/metrics")
        print(f"logs       {self.data_dir}/*.log")
        url = f"http://127.0.0.1:{settings.dashboard_port}/"
        self._wait(lambda: self._dashboard_up(url), "the dashboard")
        print(f"dashboard  {url}  (metrics on http://127.0.0.1:{settings.dashboard_metrics_port}/metrics)")
        print("ready — Ctrl-C stops everything", flush=True)
        return settings

    def preflight(self) -> None:
        """Refuse bad input before anything starts: alert rules that do not parse."""
        if self.prometheus:
            check_rules(rules_path(Settings()))

    def _wait(self, check, what: str) -> None:
        def alive_and(check=check) -> bool:
            for proc in self.children:
                if proc.poll() is not None and proc.returncode != 0:
                    raise ServiceExited(f"a process exited with {proc.returncode}: see {self.data_dir}/*.log")
            return check()

        wait_until(alive_and, 180, what, interval=0.5)

    @staticmethod
    def _workers_ready(settings: Settings, workers: dict[str, int]) -> bool:
        """Each worker (name -> pid) has registered with RQ, which it does once its model is loaded.

        The pid tells this run's registration from one that a killed earlier run left in the
        append-only Redis under the same name.
        """
        from rq.worker import Worker

        from .clients import redis_client

        with redis_client(settings) as conn:
            pids = [conn.hget(Worker.redis_worker_namespace_prefix + name, "pid") for name in workers]
        return [int(p) if p else None for p in pids] == list(workers.values())

    @staticmethod
    def _dashboard_up(url: str) -> bool:
        import urllib.request

        return urllib.request.urlopen(url, timeout=2).status == 200

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
        print("stopped: workers, producer, dashboard, " + ("Prometheus, " if self.prometheus else "") + "S3 and Redis")


def run_stack(stack: Stack) -> int:
    """Bring the stack up and keep it until Ctrl-C (SIGINT) or SIGTERM."""
    # installed explicitly: a shell starts background jobs with SIGINT ignored, and Ctrl-C must still work
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    stack.preflight()
    try:
        stack.up()
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stack.down()
    return 0
