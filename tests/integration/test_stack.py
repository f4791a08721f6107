"""`steelsight up` headless: frames flow, Ctrl-C leaves nothing behind, and a second run finds the first's data."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from steelsight.clients import ObjectStore, redis_client
from steelsight.contract import Settings
from steelsight.devstack import free_port, wait_until
from steelsight.stack import PROMETHEUS_PORT, S3_PORT, SEAWEEDFS_PORTS

from ..helpers import records


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Up:
    """One `steelsight up` run, read until it says ready."""

    def __init__(self, data: Path, offset: int, frames: int, checkpoint: Path):
        env = {"STEELSIGHT_CHECKPOINT": str(checkpoint), "STEELSIGHT_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
               "PATH": "/usr/bin:/bin:/usr/local/bin"}
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "steelsight.cli", "up", "--data", str(data),
                                      "--frames", str(frames), "--fps", "20", "--port-offset", str(offset)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            assert line, "steelsight up exited early:\n" + "".join(self.lines)
            self.lines.append(line)
            if line.startswith("ready"):
                return
        raise AssertionError("steelsight up never said ready:\n" + "".join(self.lines))

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        rest = self.proc.communicate(timeout=90)[0]
        assert self.proc.returncode == 0, rest
        assert "stopped:" in rest
        return rest


def scraped(prometheus: str) -> set[tuple[str, str]]:
    """(job, up) of each target Prometheus scrapes."""
    query = urllib.parse.quote("up")
    result = json.load(urllib.request.urlopen(f"{prometheus}/api/v1/query?query={query}", timeout=2))["data"]["result"]
    return {(r["metric"]["job"], r["value"][1]) for r in result}


def test_up_refuses_alert_rules_that_do_not_parse(tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text("groups:\n  - name: x\n    rules:\n      - alert: Broken\n        expr: sum(rate(x[5m])\n")
    env = {"STEELSIGHT_ALERT_RULES": str(rules), "PATH": "/usr/bin:/bin:/usr/local/bin"}
    run = subprocess.run([sys.executable, "-m", "steelsight.cli", "up", "--data", str(tmp_path / "stack")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"steelsight up: alert rules {rules} do not parse" in run.stderr and "Broken" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "stack").exists()  # nothing started


def stack_settings(data: Path, offset: int) -> Settings:
    """What a user's shell would set to reach the running stack: its ports and its private credentials."""
    cred = json.loads((data / "s3-identities.json").read_text())["identities"][0]["credentials"][0]
    return Settings(redis_url=f"redis://127.0.0.1:{16379 + offset}/0", s3_endpoint=f"127.0.0.1:{S3_PORT + offset}",
                    s3_access_key=cred["accessKey"], s3_secret_key=cred["secretKey"])


def test_up_runs_keeps_its_data_and_ctrl_c_stops_it(tmp_path, pipeline_checkpoint):
    # away from the defaults, below devstack.PORT_FLOOR (free_port's picks for other tests' servers) and below
    # the ephemeral range (32768-), where outgoing connections sit
    offset = 2000 + free_port() % 1000
    frames, data = 6, tmp_path / "stack"
    up = Up(data, offset, frames, pipeline_checkpoint)
    try:
        output = "".join(up.lines)
        assert "SeaweedFS" in output and "dashboard  http://127.0.0.1:" in output
        prometheus = f"http://127.0.0.1:{PROMETHEUS_PORT + offset}"
        assert f"prometheus {prometheus}/alerts — rules " in output
        assert (data / "s3-identities.json").stat().st_mode & 0o777 == 0o600
        settings = stack_settings(data, offset)
        conn = redis_client(settings)
        wait_until(lambda: len(records(settings, conn)) == frames, 180, f"{frames} results")
        results = records(settings, conn)
        # the producer starts once the workers have their model: no frame waits out a model load
        assert max(r["timings"]["queue_wait_s"] for r in results.values()) < 5.0, results
        job_id, first = sorted(results.items())[0]
        store = ObjectStore(settings)
        frame = store.get(settings.frames_bucket, first["frame_key"])
        meta = store.client.stat_object(settings.frames_bucket, first["frame_key"]).metadata
        assert (meta["x-amz-meta-line"], meta["x-amz-meta-camera"]) == (first["line_id"], first["camera_id"])
        overlay = store.get(settings.overlays_bucket, first["overlay_key"])
        # Prometheus scrapes both workers and the dashboard, with the rules loaded
        wait_until(lambda: scraped(prometheus) >= {("steelsight-worker", "1"), ("steelsight-dashboard", "1")}, 30,
                   "Prometheus to scrape the workers and the dashboard")
        rules = json.load(urllib.request.urlopen(f"{prometheus}/api/v1/rules"))["data"]["groups"]
        assert "CameraBlindedOrDirty" in {r["name"] for g in rules for r in g["rules"]}
    finally:
        up.stop()
    ports = [16379, S3_PORT, *SEAWEEDFS_PORTS.values(), 7860, 9100, 9110, 9102, 9103, PROMETHEUS_PORT]
    assert not [p + offset for p in ports if port_open(p + offset)]
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split() == []

    again = Up(data, offset, 0, pipeline_checkpoint)  # the same data folder, no new frames
    try:
        settings = stack_settings(data, offset)
        assert records(settings, redis_client(settings))[job_id]["frame_key"] == first["frame_key"]
        store = ObjectStore(settings)
        for bucket, key, before in ((settings.frames_bucket, first["frame_key"], frame),
                                    (settings.overlays_bucket, first["overlay_key"], overlay)):
            url = store.presigned_url(bucket, key)  # an expiring link to the old object
            assert "X-Amz-Expires=" in url
            assert urllib.request.urlopen(url).read() == before
    finally:
        again.stop()
