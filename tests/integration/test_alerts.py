"""The alert rules in a real Prometheus, scraping a real worker that reads frames from the producer.

One camera sends noise frames (the input-quality gate answers them unknown), another
sends steel. Prometheus runs ``deploy/prometheus/rules.yml`` with its time windows
scaled down (minutes to seconds) so the test takes seconds: the expressions are the
shipped ones. The noise camera's CameraBlindedOrDirty alert must fire within the rule's
``for`` plus one scrape and one evaluation interval of the worker exporting enough
unknown frames for it; the steel camera's must not. The worker also exports what
InputDrift reads (each frame's input statistics, and its checkpoint's training
reference), InputDrift fires on the noise's contrast, and the dashboard's Metrics tab
lists the alert and shows the line's drift.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from steelsight.alerts import RULES, check_rules
from steelsight.devstack import prometheus_server, wait_until
from steelsight.producer.service import Producer

from ..helpers import SAMPLES, WorkerProcess

SCRAPE_S = 1.0
FOR_S = 3.0
# rules.yml's windows, scaled so the test runs in seconds
WINDOWS = {"10m": "20s", "30m": "30s", "5m": "10s", "15m": "15s", "6h": "2m"}
VOLUME = 10  # line_camera:steelsight_frames:increase10m >= 10 in the rule
# the checkpoint's training images' input statistics (CheckpointMeta.input_stats), as training records them
TRAINING_INPUTS = {"brightness": {"mean": 128.0, "std": 20.0}, "contrast": {"mean": 30.0, "std": 8.0},
                   "sharpness": {"mean": 0.9, "std": 0.2}}


def scaled_rules(path) -> str:
    text = RULES.read_text()
    text = re.sub(r"\[(\w+)\]", lambda m: f"[{WINDOWS.get(m.group(1), m.group(1))}]", text)
    text = re.sub(r"(?m)^(\s+for: )\w+$", rf"\g<1>{FOR_S:g}s", text)
    path.write_text(text)
    check_rules(path)
    return text


def noise_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (200, 200), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def checkpoint_with_input_stats(folder) -> str:
    import torch

    from steelsight.model.inference.checkpoint import CheckpointMeta, save_checkpoint
    from steelsight.model.inference.network import AttentionResNet50

    torch.manual_seed(0)
    path = folder / "with-input-stats.safetensors"
    save_checkpoint(AttentionResNet50().eval(), CheckpointMeta(input_size=96, input_stats=TRAINING_INPUTS), path)
    return str(path)


def scrape(metrics_port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).read().decode()


def samples(text: str, name: str, **labels: str) -> list[float]:
    """Values of the samples of ``name`` carrying ``labels`` (among others) in a /metrics page."""
    found = []
    for sample_labels, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', sample_labels))
        if all(have.get(k) == v for k, v in labels.items()):
            found.append(float(value))
    return found


def unknown_count(metrics_port: int, camera: str) -> float:
    return sum(samples(scrape(metrics_port), "steelsight_verdicts_total", camera=camera, verdict="unknown"))


def query(url: str, expr: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?query={urllib.parse.quote(expr)}", timeout=2) as response:
        return json.load(response)["data"]["result"]


def worker_ready(settings, prometheus_url: str) -> bool:
    from rq import Worker

    from steelsight.clients import redis_client

    if not Worker.all(connection=redis_client(settings)):  # it registers once its model is loaded
        return False
    return [r["value"][1] for r in query(prometheus_url, 'up{job="steelsight-worker"}')] == ["1"]


def alerts(url: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/alerts", timeout=2) as response:
        return json.load(response)["data"]["alerts"]


@pytest.mark.skipif(__import__("shutil").which("prometheus") is None, reason="prometheus not installed")
def test_a_blinded_camera_fires_its_alert_in_a_real_prometheus(settings, tmp_path):
    rules = tmp_path / "rules.yml"
    scaled_rules(rules)
    settings = settings.model_copy(update={"checkpoint": checkpoint_with_input_stats(tmp_path)})
    worker = WorkerProcess(settings, tmp_path, "alerts-worker")
    targets = {"steelsight-worker": [f"127.0.0.1:{settings.metrics_port}"]}
    prometheus = prometheus_server(tmp_path / "prometheus", targets, rules, scrape_interval_s=SCRAPE_S,
                                   evaluation_interval_s=SCRAPE_S).start()
    stop = threading.Event()
    try:
        # frames only once the worker reads and Prometheus scrapes it: a backlog read in one burst before the
        # first scrape would show up as the series' first value, which no increase() counts
        wait_until(lambda: worker_ready(settings, prometheus.url), 120, "the worker to load and be scraped",
                   interval=0.2)
        good = Producer(settings, "line-1", "cam-steel")
        noisy = Producer(settings, "line-1", "cam-noise")
        steel = sorted(SAMPLES.rglob("*.bmp"))

        def produce():
            for i in range(400):
                if stop.is_set():
                    return
                good.send(steel[i % len(steel)].read_bytes(), f"steel{i}", "bmp")
                noisy.send(noise_png(i), f"noise{i}", "png")
                time.sleep(0.4)

        threading.Thread(target=produce, daemon=True).start()
        wait_until(lambda: unknown_count(settings.metrics_port, "cam-noise") >= VOLUME + 1, 120,
                   "the worker to export enough unknown frames", interval=0.05)
        enough = time.monotonic()
        firing = []

        def fired() -> bool:
            firing[:] = [a for a in alerts(prometheus.url) if a["labels"]["alertname"] == "CameraBlindedOrDirty"]
            return any(a["state"] == "firing" for a in firing)

        # for, a scrape, an evaluation, a scrape's jitter on a loaded machine, and the API's answer
        budget = FOR_S + 3 * SCRAPE_S + 1.0
        wait_until(fired, 30, "CameraBlindedOrDirty to fire", interval=0.1)
        took = time.monotonic() - enough
        assert took <= budget, f"fired {took:.1f}s after the worker had the frames (budget {budget:.1f}s)"
        assert {a["labels"]["camera"] for a in firing} == {"cam-noise"}, firing
        (alert,) = firing
        assert alert["labels"]["line"] == "line-1" and alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["runbook"] == "docs/alerts.md#camerablindedordirty"
        assert unknown_count(settings.metrics_port, "cam-steel") == 0
        # what InputDrift reads: every frame's input statistics per line, and the checkpoint's training reference
        text = scrape(settings.metrics_port)
        for stat, reference in TRAINING_INPUTS.items():
            assert sum(samples(text, "steelsight_input_stat_count", line="line-1", stat=stat)) >= 2 * VOLUME, stat
            for quantity, value in reference.items():
                assert samples(text, "steelsight_training_input_stat", stat=stat, quantity=quantity) == [value]
        drift = {}

        def drift_recorded() -> bool:
            drift.update({r["metric"]["stat"]: float(r["value"][1])
                          for r in query(prometheus.url, 'line_stat:steelsight_input_drift_sigmas:30m{line="line-1"}')})
            return set(drift) == set(TRAINING_INPUTS)

        wait_until(drift_recorded, 10, "Prometheus to record the input drift of line-1", interval=0.2)
        # half the frames are noise (contrast ~74 gray levels): the line's contrast is far off the training's 30 +- 8
        assert drift["contrast"] > 1, drift
        wait_until(lambda: any(a["labels"]["alertname"] == "InputDrift" and a["labels"]["stat"] == "contrast"
                               and a["state"] == "firing" for a in alerts(prometheus.url)), 10, "InputDrift to fire")
        # the dashboard's Metrics tab lists it
        from steelsight.dashboard.app import Dashboard

        board = Dashboard(settings.model_copy(update={"prometheus_url": prometheus.url}), None, None)
        listed = board.alerts_markdown()
        assert "| firing | critical | CameraBlindedOrDirty | camera=cam-noise, line=line-1 |" in listed, listed
        # and its drift table shows line-1's input statistics from the recording rules, contrast flagged
        drift = board.drift_html()
        assert "<td>line-1</td>" in drift and all(f"<th>{stat} " in drift for stat in TRAINING_INPUTS), drift
        assert "30.00 ± 8.00" in drift and "InputDrift firing" in drift, drift
    finally:
        stop.set()
        prometheus.stop()
        worker.kill()
