"""The Metrics tab's drift table, read from a tiny fake Prometheus answering the recording rules' queries."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from steelsight.contract import Settings
from steelsight.dashboard.app import Dashboard

LINE = "line-<b>1</b>|x"  # a producer's line id: the table must escape it
SERIES = {
    "line:steelsight_confidence_mean:30m": [({"line": LINE}, 0.61)],
    "line:steelsight_confidence_mean:6h": [({"line": LINE}, 0.83)],
    'line_verdict:steelsight_share:30m{verdict="unknown"}': [({"line": LINE, "verdict": "unknown"}, 0.25)],
    'line_verdict:steelsight_share:6h{verdict="unknown"}': [({"line": LINE, "verdict": "unknown"}, "NaN")],
    "line:steelsight_class_mix_distance:30m": [({"line": LINE}, 0.4)],
    "line_verdict:steelsight_class_share:30m": [({"line": LINE, "verdict": "scratches"}, 0.7),
                                                ({"line": LINE, "verdict": "patches"}, 0.3)],
    "max by (verdict) (steelsight_training_class_share)": [({"verdict": v}, 0.25) for v in
                                                           ("scratches", "patches", "inclusion", "crazing")],
    "line_stat:steelsight_input_mean:30m": [({"line": LINE, "stat": "contrast"}, 52.0),
                                            ({"line": LINE, "stat": "brightness"}, 130.0)],
    "line_stat:steelsight_input_drift_sigmas:30m": [({"line": LINE, "stat": "contrast"}, 2.75),
                                                    ({"line": LINE, "stat": "brightness"}, 0.1)],
    "max by (stat, quantity) (steelsight_training_input_stat)": [
        ({"stat": "contrast", "quantity": "mean"}, 30.0), ({"stat": "contrast", "quantity": "std"}, 8.0),
        ({"stat": "brightness", "quantity": "mean"}, 128.0), ({"stat": "brightness", "quantity": "std"}, 20.0)],
}
ALERTS = [{"labels": {"alertname": "InputDrift", "line": LINE, "stat": "contrast", "severity": "warning"},
           "state": "pending", "annotations": {"summary": "s"}, "activeAt": "2024-01-01T00:00:00Z"},
          {"labels": {"alertname": "CameraBlindedOrDirty", "line": LINE, "camera": "c", "severity": "critical"},
           "state": "firing", "annotations": {"summary": "s"}, "activeAt": "2024-01-01T00:00:00Z"}]


class FakePrometheus(BaseHTTPRequestHandler):
    def do_GET(self):
        path, _, qs = self.path.partition("?")
        if path == "/api/v1/alerts":
            body = {"status": "success", "data": {"alerts": ALERTS}}
        elif path == "/api/v1/query":
            expr = urllib.parse.parse_qs(qs)["query"][0]
            body = {"status": "success", "data": {"resultType": "vector", "result": [
                {"metric": m, "value": [0, str(v)]} for m, v in SERIES.get(expr, [])]}}
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def prometheus_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakePrometheus)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def board(url: str | None) -> Dashboard:
    return Dashboard(Settings(prometheus_url=url), None, None)


def test_the_drift_table_shows_each_line_against_its_baselines_and_flags_what_the_alerts_judge(prometheus_url):
    table = board(prometheus_url).drift_html()
    assert "<b>1</b>" not in table and "line-&lt;b&gt;1&lt;/b&gt;|x" in table, table
    assert "0.61 <small>(6 h 0.83)</small>" in table
    assert "25.0% <small>(6 h —)</small>" in table  # a NaN baseline (no frames in 6 h) is shown as missing
    assert "TV 0.40 · scratches 70.0% vs 25.0%" in table
    assert "130.00 <small>(128.00 ± 20.00 · 0.1 σ)</small>" in table
    # contrast is flagged (InputDrift pending on it), brightness and the camera alert's line cells are not
    flagged = [c for c in table.split("<td") if "#fde68a" in c]
    assert len(flagged) == 1 and "52.00" in flagged[0] and "InputDrift pending" in flagged[0], flagged
    assert table.index("brightness") < table.index("contrast")


def test_without_a_reachable_prometheus_the_table_says_so_in_one_line():
    assert "no Prometheus configured" in board(None).drift_html()
    said = board("http://127.0.0.1:9").drift_html()  # nothing listens on the discard port
    assert "does not answer" in said and "\n" not in said
