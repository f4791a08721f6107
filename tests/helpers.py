"""Helpers for tests that run steelsight processes against real services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest

from steelsight.contract import SAMPLE_FRAMES, Frame, Settings
from steelsight.producer.service import Producer

SAMPLES = SAMPLE_FRAMES
ARTIFACTS = Path(os.environ.get("STEELSIGHT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))


class ChildProcess:
    """``python -m steelsight.cli ARGS`` with the settings in its environment, logging to a file."""

    def __init__(self, settings: Settings, tmp: Path, name: str, args: list[str]):
        self.settings, self.log_path = settings, tmp / f"{name}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in kill()
        env = dict(os.environ) | settings.to_env() | {"OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "steelsight.cli", *args], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class WorkerProcess(ChildProcess):
    def __init__(self, settings: Settings, tmp: Path, name: str, burst: bool = False):
        super().__init__(settings, tmp, name, ["worker", "--name", name, *(["--burst"] if burst else [])])


def records(settings: Settings, conn) -> dict[str, dict]:
    keys = conn.keys(f"{settings.key_prefix}:result:*")
    return {k.decode().rsplit(":", 1)[1]: json.loads(conn.get(k)) for k in keys}


class SlowEngine:
    """Stand-in engine that logs when each batch is fetched, computed and uploaded; compute takes ``compute_s``.

    With ``upload_s`` each frame's overlay upload takes that long on an I/O thread, and
    ``compute`` hands back futures, as the real engine does.
    """

    def __init__(self, upload_s: float = 0.0, compute_s: float = 0.3):
        from concurrent.futures import ThreadPoolExecutor

        self.events: list[tuple[str, int, float]] = []
        self.upload_s, self.compute_s = upload_s, compute_s
        self.io = ThreadPoolExecutor(max_workers=8)

    def prefetch(self, frames):
        self.events.append(("fetch", len(frames), time.perf_counter()))
        return {}

    def compute(self, frames, loads=None):
        from steelsight.contract import FrameResult, Timings
        from steelsight.worker.outcome import Done, Pending

        self.events.append(("compute", len(frames), time.perf_counter()))
        time.sleep(self.compute_s)
        self.events.append(("computed", len(frames), time.perf_counter()))
        results = {f.job_id: FrameResult(frame_id=f.frame_id, job_id=f.job_id, line_id=f.line_id,
                                         camera_id=f.camera_id, captured_at=f.captured_at, status="ok",
                                         label="crazing", frame_key=f.object_key,
                                         timings=Timings(queue_wait_s=0, inference_s=0, total_s=0)) for f in frames}
        if not self.upload_s:
            return {job_id: Done(result) for job_id, result in results.items()}

        def upload(result):
            time.sleep(self.upload_s)
            self.events.append(("uploaded", len(frames), time.perf_counter()))
            return result
        return {job_id: Pending(self.io.submit(upload, result)) for job_id, result in results.items()}


def enqueue_frames(settings: Settings, line: str, frames: int) -> None:
    producer = Producer(settings, line, "cam-1")
    for i in range(frames):
        producer._enqueue(Frame(frame_id=f"f{i}", line_id=line, camera_id="cam-1", captured_at=datetime.now(UTC),
                                ext="png"))


def work_queue(settings: Settings, engine: SlowEngine, batch: int) -> list[tuple[str, float]]:
    """Work the queue in batches with ``engine`` until it is empty; (job id, time) of each heartbeat kept."""
    from steelsight.worker.service import make_worker

    worker = make_worker(settings.model_copy(update={"batch_size": batch}), engine)
    worker.claimed_heartbeat_s = 0.1
    beats, beat = [], worker.maintain_heartbeats
    worker.maintain_heartbeats = lambda job, execution: (beats.append((job.id, time.perf_counter())),
                                                         beat(job, execution))
    worker.work(burst=True, with_scheduler=False)
    return beats


def run_slow_worker(settings, engine: SlowEngine, frames: int, batch: int, line: str) -> list[tuple[str, float]]:
    """Queue ``frames`` frames of ``line`` and work them; (job id, time) of each heartbeat kept."""
    enqueue_frames(settings, line, frames)
    return work_queue(settings, engine, batch)


def wait_for(page, expression: str, timeout_s: float, dashboard: ChildProcess) -> None:
    """``page.wait_for_function``, failing with what the page showed, the dashboard's refresh metrics and its log."""
    from playwright.sync_api import TimeoutError as PageTimeout

    try:
        page.wait_for_function(expression, timeout=timeout_s * 1000)
    except PageTimeout:
        pytest.fail(f"not true within {timeout_s:g} s: {expression}\n{_diagnosis(page, dashboard)}")


def _diagnosis(page, dashboard: ChildProcess) -> str:
    """Each part on its own: one that fails (a dead dashboard refuses its metrics port) must not hide the others."""
    def attempt(what):
        try:
            return what()
        except Exception as exc:  # a diagnosis reports every failure instead of raising it
            return f"({type(exc).__name__}: {exc})"

    def scrape():
        port = dashboard.settings.dashboard_metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return [line for line in text.splitlines() if line.startswith(("steelsight_dashboard_refresh_seconds_",
                                                                       "steelsight_dashboard_image"))]

    attempt(lambda: page.screenshot(path=str(ARTIFACTS / "dashboard-timeout.png"), full_page=True))
    exited = dashboard.proc.poll()
    return (f"live stats: {attempt(lambda: page.inner_text('#live-stats', timeout=2000))!r}\n"
            f"dashboard metrics: {attempt(scrape)}\n"
            f"dashboard {'running' if exited is None else f'exited with {exited}'}; its log:\n"
            f"{attempt(dashboard.output)[-4000:]}")
