"""Offline checks of the SeaweedFS deployment (deploy/k8s/seaweedfs/ and the compose profile `seaweedfs`).

Beyond the schema: the Raft peers, the replication placement against the volume servers that
must hold the copies, the S3 Service and NetworkPolicies against the pods they are meant to
reach, the identities' bucket scoping, and every `weed` flag against the pinned binary.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from steelsight.contract import FEEDBACK_PREFIX, MODELS_PREFIX, Settings
from steelsight.devstack import pinned_weed_version
from tests.integration.test_deploy_files import compose_schema

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
SEAWEEDFS = sorted((K8S / "seaweedfs").glob("*.yaml"))
EXAMPLE = K8S / "examples" / "seaweedfs-s3-identities.yaml"
PROFILE = "seaweedfs"
WORKLOADS = ("Deployment", "StatefulSet", "Job")
# `weed <sub> -flag=value ...` in a shell script; not `$weed`, a variable holding such a call
WEED_CALL = re.compile(r"(?<![$\w])(?:/usr/bin/)?weed[ \t]+(\w+)((?:[ \t]+-[\w.]+(?:=[^\s\"']+)?)*)")


def documents(paths) -> list[dict]:
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents(SEAWEEDFS) if d["kind"] == kind}


def workloads() -> list[dict]:
    return [d for d in documents(SEAWEEDFS) if d["kind"] in WORKLOADS]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def flags(args: list[str]) -> dict[str, str]:
    """``-name=value`` arguments as a dict (a bare ``-name`` maps to ``"true"``)."""
    out = {}
    for arg in args:
        assert arg.startswith("-"), f"not a flag: {arg!r}"
        name, _, value = arg[1:].partition("=")
        out[name] = value or "true"
    return out


def weed_calls(command: list[str], args: list[str]) -> list[tuple[str, list[str]]]:
    """Every ``weed <subcommand> <flags>`` a container runs: directly, or from its shell script."""
    if command and Path(command[0]).name == "weed":
        return [(args[0], args[1:])]
    script = " ".join(command + args)
    return [(sub, shlex.split(rest)) for sub, rest in WEED_CALL.findall(script)]


def container_calls(container: dict) -> list[tuple[str, list[str]]]:
    return weed_calls(container.get("command", []), container.get("args", []))


def the_call(workload: str, sub: str) -> dict[str, str]:
    spec = pod_spec(by_kind("StatefulSet").get(workload) or by_kind("Deployment")[workload])
    (call,) = [c for container in spec["containers"] for c in container_calls(container)]
    assert call[0] == sub
    return flags(call[1])


@functools.cache
def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    binary = str(beside) if beside.is_file() else shutil.which("weed")
    assert binary, "the pinned weed (deploy/seaweedfs-requirements.txt) is not installed"
    return binary


@functools.cache
def weed_flags(sub: str) -> frozenset[str]:
    """The flags ``weed <sub> -h`` lists, from the binary the tests run."""
    result = subprocess.run([weed_binary(), sub, "-h"], capture_output=True, text=True, timeout=30)
    names = frozenset(re.findall(r"^\s+-([\w.]+)", result.stdout + result.stderr, re.MULTILINE))
    assert len(names) > 5, f"`weed {sub} -h` listed no flags: {result.stdout[:200]} {result.stderr[:200]}"
    return names


def copies(replication: str) -> tuple[int, int, int]:
    """SeaweedFS placement "xyz": extra copies in other data centers, other racks, other servers."""
    assert re.fullmatch(r"[0-9]{3}", replication), replication
    return int(replication[0]), int(replication[1]), int(replication[2])


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("path", [*SEAWEEDFS, EXAMPLE], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_manifests_match_the_schema(path):
    import kubernetes_validate

    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_the_applied_folder_holds_no_secret():
    """`kubectl apply -f deploy/k8s/seaweedfs/` must never overwrite real keys with placeholders."""
    assert not [d for d in documents(SEAWEEDFS) if d["kind"] == "Secret"]
    assert {d["kind"] for d in documents([EXAMPLE])} == {"Secret"}


@pytest.mark.parametrize("workload", workloads(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_pods_are_hardened(workload):
    spec = pod_spec(workload)
    assert spec["automountServiceAccountToken"] is False
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    for container in spec["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        assert sc["readOnlyRootFilesystem"] is True
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
        assert container["image"].startswith("chrislusf/seaweedfs:")
    if workload["kind"] != "Job":
        for container in spec["containers"]:
            assert "readinessProbe" in container and "livenessProbe" in container, container["name"]


def test_images_pin_the_version_the_tests_run():
    tags = {c["image"].split(":", 1)[1] for w in workloads() for c in pod_spec(w)["containers"]}
    assert tags == {pinned_weed_version()}


def test_three_masters_name_each_other_as_raft_peers():
    (master,) = [s for s in by_kind("StatefulSet").values() if s["metadata"]["name"] == "seaweedfs-master"]
    replicas, service = master["spec"]["replicas"], master["spec"]["serviceName"]
    assert replicas == 3
    headless = by_kind("Service")[service]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    args = the_call("seaweedfs-master", "master")
    port = args["port"]
    expected = {f"seaweedfs-master-{i}.{service}:{port}" for i in range(replicas)}
    peers = args["peers"].split(",")
    assert len(peers) == len(set(peers)) and set(peers) == expected
    # each master advertises the very name its peers know it by
    assert args["ip"] == f"$(POD_NAME).{service}"
    (container,) = pod_spec(master)["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # every other component finds the same three masters
    assert set(the_call("seaweedfs-volume", "volume")["master"].split(",")) == expected
    assert set(the_call("seaweedfs-filer", "filer")["master"].split(",")) == expected
    job = by_kind("Job")["seaweedfs-buckets"]
    (job_container,) = pod_spec(job)["containers"]
    masters = {e["name"]: e.get("value") for e in job_container["env"]}["MASTERS"]
    assert set(masters.split(",")) == expected


def test_volume_servers_can_hold_every_copy_with_one_down():
    x, y, z = copies(the_call("seaweedfs-master", "master")["defaultReplication"])
    volumes = [s for s in by_kind("StatefulSet").values() if s["metadata"]["name"].startswith("seaweedfs-volume")]
    servers: dict[tuple[str, str], int] = {}
    for sts in volumes:
        (container,) = pod_spec(sts)["containers"]
        ((_, args),) = container_calls(container)
        placed = flags(args)
        key = (placed.get("dataCenter", ""), placed.get("rack", ""))
        servers[key] = servers.get(key, 0) + sts["spec"]["replicas"]
        anti = pod_spec(sts)["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert anti[0]["topologyKey"] == "kubernetes.io/hostname"  # two copies on one node are one copy
    data_centers = {dc for dc, _ in servers}
    racks_per_dc = min(sum(1 for dc2, _ in servers if dc2 == dc) for dc in data_centers)
    assert len(data_centers) >= x + 1, f"replication needs {x + 1} data centers, servers are in {data_centers}"
    assert racks_per_dc >= y + 1, f"replication needs {y + 1} racks per data center: {servers}"
    assert min(servers.values()) >= z + 1, f"replication needs {z + 1} servers per rack: {servers}"
    # one spare, so new volumes still get all their copies while a server is down
    assert sum(servers.values()) >= (x + 1) * (y + 1) * (z + 1) + 1, servers
    budget = by_kind("PodDisruptionBudget")["seaweedfs-volume"]
    assert budget["spec"]["maxUnavailable"] <= max(x, y, z)


def test_filer_keeps_its_metadata_on_a_volume():
    filer = by_kind("StatefulSet")["seaweedfs-filer"]
    store = the_call("seaweedfs-filer", "filer")["defaultStoreDir"]
    (container,) = pod_spec(filer)["containers"]
    claims = {c["metadata"]["name"] for c in filer["spec"]["volumeClaimTemplates"]}
    mounts = [m for m in container["volumeMounts"] if m["name"] in claims]
    assert any(Path(m["mountPath"]) in (Path(store), *Path(store).parents) for m in mounts), (store, mounts)


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_s3_service_reaches_the_gateways_on_the_endpoint_steelsight_uses():
    gateway = by_kind("Deployment")["seaweedfs-s3"]
    service = by_kind("Service")["seaweedfs-s3"]
    assert gateway["spec"]["replicas"] >= 2
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    # no other pod answers for the Service
    others = [w for w in workloads() if w["metadata"]["name"] != "seaweedfs-s3"]
    assert not [w for w in others if _selects({"matchLabels": service["spec"]["selector"]},
                                              w["spec"]["template"]["metadata"]["labels"])]
    (port,) = service["spec"]["ports"]
    (container,) = pod_spec(gateway)["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = the_call("seaweedfs-s3", "s3")
    assert named[port["targetPort"]] == port["port"] == int(args["port"]) == 8333
    # the filer the gateway asks is the filer Service
    host, _, filer_port = args["filer"].partition(":")
    filer_service = by_kind("Service")[host]
    assert int(filer_port) in {p["port"] for p in filer_service["spec"]["ports"]}
    # the identities file is the Secret's key, mounted where -config points
    config = Path(args["config"])
    volumes = {v["name"]: v for v in pod_spec(gateway)["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == config.parent]
    secret = volumes[mount["name"]]["secret"]
    assert [i["path"] for i in secret["items"]] == [config.name]
    example = documents([EXAMPLE])[0]
    assert secret["secretName"] == example["metadata"]["name"]
    assert [i["key"] for i in secret["items"]] == list(example["stringData"])


def test_identities_are_private_and_scoped_to_their_buckets():
    """Exactly these rights (tests/integration/test_deploy_files.py tries them on a real gateway)."""
    settings = Settings()
    frames, overlays, library = settings.frames_bucket, settings.overlays_bucket, settings.library_bucket
    (secret,) = documents([EXAMPLE])
    identities = json.loads(secret["stringData"]["s3.json"])["identities"]
    names = {i["name"] for i in identities}
    assert names == {"steelsight-producer", "steelsight-worker", "steelsight-dashboard", "steelsight-registry"}
    keys = [c["accessKey"] for i in identities for c in i["credentials"]]
    assert len(keys) == len(set(keys)) == 4
    for identity in identities:
        for cred in identity["credentials"]:
            assert "change-me" in cred["accessKey"] and "change-me" in cred["secretKey"]
    actions = {i["name"]: set(i["actions"]) for i in identities}
    # HEAD on a bucket needs Read on it; List only on the library (the registry's and feedback's listings)
    assert actions == {
        "steelsight-producer": {f"Write:{frames}", f"Read:{frames}", f"Read:{overlays}"},
        "steelsight-worker": {f"Read:{frames}", f"Read:{overlays}", f"Write:{overlays}", f"Read:{library}"},
        "steelsight-dashboard": {f"Read:{frames}", f"Read:{overlays}", f"Read:{library}",
                                 f"Write:{library}/{FEEDBACK_PREFIX}*", f"List:{library}"},
        "steelsight-registry": {f"Read:{frames}", f"Read:{overlays}", f"Read:{library}",
                                f"Write:{library}/{MODELS_PREFIX}*", f"List:{library}"},
    }


def test_the_buckets_job_creates_the_library_and_never_gives_it_a_ttl():
    """A TTL on /buckets/ as a whole would expire the models and the operators' feedback."""
    settings = Settings()
    (container,) = pod_spec(by_kind("Job")["seaweedfs-buckets"])["containers"]
    script = "\n".join(container["args"])
    created = re.search(r"s3\.bucket\.create -name %s\\n' ([\w -]+) \|", script).group(1).split()
    assert created == [settings.frames_bucket, settings.overlays_bucket, settings.library_bucket]
    assert re.findall(r"-locationPrefix=(\S+)", script) == ["/buckets/$bucket/"]
    (ttl_loop,) = re.findall(r"for bucket in ([\w -]+); do\n\s*echo \"fs\.configure", script)
    assert ttl_loop.split() == [settings.frames_bucket, settings.overlays_bucket]
    checked = re.findall(r"for bucket in ([\w -]+); do\n\s*echo \"\$listing\"", script)
    assert checked[0].split() == created


def test_network_policies_fence_the_store():
    policies = by_kind("NetworkPolicy")
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads()}
    steelsight = {d["spec"]["template"]["metadata"]["labels"]["app"] for d in documents(sorted(K8S.glob("*.yaml")))
                  if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("steelsight-")}
    assert {"steelsight-worker", "steelsight-dashboard"} <= steelsight

    s3 = policies["seaweedfs-s3"]["spec"]
    assert _selects(s3["podSelector"], pods["seaweedfs-s3"])
    assert [name for name, labels in pods.items() if _selects(s3["podSelector"], labels)] == ["seaweedfs-s3"]
    (rule,) = s3["ingress"]
    assert [p["port"] for p in rule["ports"]] == [8333]
    for app in steelsight:
        assert any(_selects(peer["podSelector"], {"app": app}) for peer in rule["from"]), app
    for name, labels in pods.items():  # the store's own pods need no S3 access
        assert not any(_selects(peer["podSelector"], labels) for peer in rule["from"]), name

    internal = policies["seaweedfs-internal"]["spec"]
    fenced = {name for name, labels in pods.items() if _selects(internal["podSelector"], labels)}
    assert fenced == {"seaweedfs-master", "seaweedfs-volume", "seaweedfs-filer"}
    (rule,) = internal["ingress"]
    for name, labels in pods.items():  # every SeaweedFS pod, the gateways and the Job included, gets in
        assert any(_selects(peer["podSelector"], labels) for peer in rule["from"]), name
    for app in steelsight:  # and no steelsight pod does
        assert not any(_selects(peer["podSelector"], {"app": app}) for peer in rule["from"]), app
    service_ports = {p["port"] for s in by_kind("Service").values() if s["metadata"]["name"] != "seaweedfs-s3"
                     for p in s["spec"]["ports"]}
    assert {p["port"] for p in rule["ports"]} == service_ports


# ---------------------------------------------------------------- compose profile


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def profile_services() -> dict[str, dict]:
    return {name: s for name, s in compose()["services"].items() if PROFILE in s.get("profiles", [])}


def compose_calls(service: dict) -> list[tuple[str, list[str]]]:
    def as_list(value):
        return shlex.split(value) if isinstance(value, str) else list(value or [])
    return weed_calls(as_list(service.get("entrypoint")), as_list(service.get("command")))


def test_compose_profile_is_a_replicated_cluster_beside_minio():
    spec = compose()
    jsonschema.Draft201909Validator(compose_schema()).validate(spec)
    services = profile_services()
    calls = {name: compose_calls(s) for name, s in services.items()}
    masters = {n: flags(c[0][1]) for n, c in calls.items() if c and c[0][0] == "master"}
    volumes = {n: flags(c[0][1]) for n, c in calls.items() if c and c[0][0] == "volume"}
    assert len(masters) == 3 and len(volumes) >= 3
    assert [c[0][0] for c in calls.values() if c].count("filer") == 1
    assert [c[0][0] for c in calls.values() if c].count("s3") == 1
    peers = {args["peers"] for args in masters.values()}
    assert len(peers) == 1
    (peers,) = peers
    assert {p.split(":")[0] for p in peers.split(",")} == set(masters)
    for name, args in masters.items():
        assert args["ip"] == name
    for args in volumes.values():
        assert set(args["master"].split(",")) == set(peers.split(","))
    x, y, z = copies(next(iter(masters.values()))["defaultReplication"])
    assert (x, y) == (0, 0) and len(volumes) >= z + 2
    # the default stack is untouched: MinIO, and nothing outside the profile waits for SeaweedFS
    assert "minio" in spec["services"] and not spec["services"]["minio"].get("profiles")
    for name, service in spec["services"].items():
        if name not in services:
            assert not set(service.get("depends_on", {})) & set(services), name
    for name in services:
        assert name.startswith("seaweedfs-")
    assert {s["image"] for s in services.values()} == {f"chrislusf/seaweedfs:{pinned_weed_version()}"}
    # one identity, scoped to the three buckets: no Admin or anonymous access, List on the library only
    gateway = " ".join(services["seaweedfs-s3"]["command"])
    settings = Settings()
    actions = set(re.findall(r'"(\w+(?::[\w-]+)?)"', gateway.split('"actions":', 1)[1].split("]", 1)[0]))
    assert actions == {f"{verb}:{bucket}" for verb in ("Read", "Write")
                       for bucket in (settings.frames_bucket, settings.overlays_bucket, settings.library_bucket)
                       } | {f"List:{settings.library_bucket}"}
    assert "anonymous" not in gateway and "Admin" not in gateway
    # the buckets job creates and checks the library too, and compose sets no TTL (none on the library)
    job = " ".join(services["seaweedfs-buckets"]["command"])
    for bucket in (settings.frames_bucket, settings.overlays_bucket, settings.library_bucket):
        assert job.count(bucket) == 2, bucket  # created, then found in the listing
    assert "fs.configure" not in job and "-ttl" not in job


# ---------------------------------------------------------------- flags against the binary


def every_weed_call() -> list[tuple[str, str, list[str]]]:
    out = []
    for workload in workloads():
        for container in pod_spec(workload)["containers"]:
            for sub, args in container_calls(container):
                out.append((f"k8s {workload['metadata']['name']}", sub, args))
    for name, service in profile_services().items():
        for sub, args in compose_calls(service):
            out.append((f"compose {name}", sub, args))
    return out


def test_every_weed_flag_exists_in_the_pinned_binary():
    calls = every_weed_call()
    assert {sub for _, sub, _ in calls} >= {"master", "volume", "filer", "s3", "shell"}
    version = subprocess.run([weed_binary(), "version"], capture_output=True, text=True, timeout=30).stdout
    assert pinned_weed_version() in version.split()
    unknown = [f"{where}: weed {sub} -{name}" for where, sub, args in calls for name in flags(args)
               if name not in weed_flags(sub)]
    assert not unknown, unknown


def test_flag_check_catches_a_misspelt_flag():
    """The check above would let anything through if the help parsing found nothing."""
    assert "peers" in weed_flags("master") and "defaultReplication" in weed_flags("master")
    assert "peer" not in weed_flags("master") and "replication" not in weed_flags("master")
