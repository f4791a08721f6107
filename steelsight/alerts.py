"""The alert rules (``deploy/prometheus/rules.yml``): checking them, shipping them to Kubernetes, reading alerts.

``python -m steelsight.alerts --k8s`` rewrites ``deploy/k8s/60-prometheus-rules.yaml``, the
Prometheus operator's ``PrometheusRule`` holding the same groups, from the rules file;
``--check`` exits 1 when that manifest is stale (tests/integration/test_deploy_files.py).
:func:`active_alerts` and :func:`drift_summary` read a running Prometheus for the dashboard's Metrics tab.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .contract import Settings

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
K8S_RULES = REPO / "deploy" / "k8s" / "60-prometheus-rules.yaml"
K8S_HEADER = ("# Generated from deploy/prometheus/rules.yml by `python -m steelsight.alerts --k8s`: edit that file.\n"
              "# For the Prometheus operator (monitoring.coreos.com); without it, mount rules.yml into Prometheus.\n")


def rules_path(settings: Settings) -> Path:
    return Path(settings.alert_rules) if settings.alert_rules else RULES


def check_rules(path: Path) -> None:
    """``promtool check rules``; a file that does not parse raises ValueError with promtool's words."""
    promtool = shutil.which("promtool")
    if promtool is None:
        raise FileNotFoundError("promtool is not installed: run ./deploy/install-system-deps.sh (Debian's prometheus)")
    if not path.is_file():
        raise FileNotFoundError(f"alert rules {path} not found (STEELSIGHT_ALERT_RULES)")
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        detail = "\n".join(line.strip() for line in (check.stdout + check.stderr).splitlines()
                           if line.strip() and not line.startswith("Checking"))
        raise ValueError(f"alert rules {path} do not parse:\n{detail}")


def prometheus_rule(rules_text: str) -> dict:
    import yaml

    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "steelsight", "namespace": "steelsight",
                         "labels": {"app.kubernetes.io/part-of": "steelsight", "release": "prometheus"}},
            "spec": {"groups": yaml.safe_load(rules_text)["groups"]}}


def k8s_manifest(rules_text: str) -> str:
    import yaml

    return K8S_HEADER + yaml.safe_dump(prometheus_rule(rules_text), sort_keys=False, width=120)


@dataclass(frozen=True)
class Alert:
    name: str
    state: str  # pending or firing
    severity: str
    summary: str
    labels: dict
    active_since: str


def active_alerts(url: str, timeout: float = 2.0) -> list[Alert]:
    """Pending and firing alerts from Prometheus's API, firing first; raises OSError when it does not answer."""
    with urllib.request.urlopen(url.rstrip("/") + "/api/v1/alerts", timeout=timeout) as response:
        body = json.load(response)
    alerts = []
    for a in body.get("data", {}).get("alerts", []):
        labels = dict(a.get("labels", {}))
        alerts.append(Alert(labels.pop("alertname", "?"), a.get("state", "?"), labels.pop("severity", ""),
                            a.get("annotations", {}).get("summary", ""), labels, a.get("activeAt", "")))
    return sorted(alerts, key=lambda a: (a.state != "firing", a.name, sorted(a.labels.items())))


def query(url: str, expr: str, timeout: float = 2.0) -> list[tuple[dict, float]]:
    """An instant PromQL query's samples as (labels, value); NaN (a share of no frames) is left out.
    Raises OSError when Prometheus does not answer, ValueError when it refuses the query."""
    address = url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(address, timeout=timeout) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise ValueError(f"{expr}: {body.get('error', 'query failed')}")
    out = []
    for sample in body.get("data", {}).get("result", []):
        value = float(sample["value"][1])
        if math.isfinite(value):
            out.append((sample.get("metric", {}), value))
    return out


# the drift alerts (rules.yml's steelsight-drift group) and the cell of the drift table each one judges
DRIFT_ALERTS = {"ConfidenceDrift": "confidence", "UnknownRateDrift": "unknown", "ClassMixDrift": "class_mix",
                "InputDrift": "input"}


@dataclass(frozen=True)
class InputStat:
    mean: float | None  # the line's mean over the window
    training_mean: float | None
    training_std: float | None
    sigmas: float | None  # |mean - training mean| / training std, as InputDrift reads it


@dataclass(frozen=True)
class LineDrift:
    """One line's drift over the recording rules' windows (30 minutes against 6 hours or the training set)."""
    line: str
    confidence: float | None = None
    confidence_6h: float | None = None
    unknown: float | None = None
    unknown_6h: float | None = None
    mix_distance: float | None = None  # total variation distance to the training prior
    mix_class: str | None = None  # the class whose share is furthest from its training share
    mix_share: float | None = None
    mix_prior: float | None = None
    inputs: dict = field(default_factory=dict)  # stat -> InputStat
    # cell ("confidence", "unknown", "class_mix", "input:<stat>") -> the state of the alert judging it
    flags: dict = field(default_factory=dict)


def drift_summary(url: str, timeout: float = 2.0) -> list[LineDrift]:
    """Each line's drift as the recording rules of rules.yml compute it, flagged where the drift alert
    judging the cell is pending or firing (its condition holds now, thresholds as Prometheus loaded them).
    Raises OSError when Prometheus does not answer."""
    def by(expr: str, *keys: str) -> dict:
        found: dict = {}
        for labels, value in query(url, expr, timeout):
            if all(k in labels for k in keys):
                node = found
                for k in keys[:-1]:
                    node = node.setdefault(labels[k], {})
                node[labels[keys[-1]]] = value
        return found

    confidence = by("line:steelsight_confidence_mean:30m", "line")
    confidence_6h = by("line:steelsight_confidence_mean:6h", "line")
    unknown = by('line_verdict:steelsight_share:30m{verdict="unknown"}', "line")
    unknown_6h = by('line_verdict:steelsight_share:6h{verdict="unknown"}', "line")
    distance = by("line:steelsight_class_mix_distance:30m", "line")
    shares = by("line_verdict:steelsight_class_share:30m", "line", "verdict")
    prior = by("max by (verdict) (steelsight_training_class_share)", "verdict")
    means = by("line_stat:steelsight_input_mean:30m", "line", "stat")
    sigmas = by("line_stat:steelsight_input_drift_sigmas:30m", "line", "stat")
    training = by("max by (stat, quantity) (steelsight_training_input_stat)", "stat", "quantity")
    flags: dict = {}
    for a in active_alerts(url, timeout):
        if a.name in DRIFT_ALERTS and "line" in a.labels:
            cell = DRIFT_ALERTS[a.name] + (f":{a.labels['stat']}" if a.name == "InputDrift" else "")
            here = flags.setdefault(a.labels["line"], {})
            if here.get(cell) != "firing":
                here[cell] = a.state
    lines = sorted(set(confidence) | set(unknown) | set(distance) | set(shares) | set(means) | set(flags))
    out = []
    for line in lines:
        mix = (None, None, None)
        if line in shares and prior:
            seen = shares[line]
            verdict = max(sorted(set(seen) | set(prior)), key=lambda v: abs(seen.get(v, 0.0) - prior.get(v, 0.0)))
            mix = (verdict, seen.get(verdict, 0.0), prior.get(verdict, 0.0))
        stats = sorted(set(means.get(line, {})) | set(training))
        inputs = {s: InputStat(means.get(line, {}).get(s), training.get(s, {}).get("mean"),
                               training.get(s, {}).get("std"), sigmas.get(line, {}).get(s)) for s in stats}
        out.append(LineDrift(line, confidence.get(line), confidence_6h.get(line), unknown.get(line),
                             unknown_6h.get(line), distance.get(line), *mix, inputs=inputs,
                             flags=flags.get(line, {})))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steelsight.alerts", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--k8s", action="store_true", help=f"rewrite {K8S_RULES.relative_to(REPO)}")
    mode.add_argument("--check", action="store_true", help="exit 1 when that manifest differs from the rules")
    args = parser.parse_args(argv)
    text = k8s_manifest(RULES.read_text())
    if args.k8s:
        K8S_RULES.write_text(text)
        print(f"wrote {K8S_RULES}")
        return 0
    if not K8S_RULES.exists() or K8S_RULES.read_text() != text:
        print(f"{K8S_RULES} is stale: run python -m steelsight.alerts --k8s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
