"""Redis sized from the settings: the formula's figures hold, the deployed Redis has a limit and a policy
that evicts only expiring keys, and a full Redis drops old results without losing a queued frame."""

from __future__ import annotations

import re
import shutil
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
import yaml
from pydantic import SecretStr
from rq import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from steelsight.cli import main
from steelsight.contract import (
    REDIS_JOB_BYTES,
    REDIS_MAXMEMORY_POLICY,
    REDIS_RECORD_BYTES,
    REDIS_STREAM_ENTRY_BYTES,
    Settings,
    get_settings,
    redis_bytes_needed,
    safe_frame_id,
)
from steelsight.devstack import Service, free_port, wait_until
from steelsight.producer.service import Producer
from steelsight.sizing import parse_bytes

from ..helpers import SAMPLES, WorkerProcess

REPO = Path(__file__).resolve().parents[2]
REDIS_CONF = REPO / "deploy" / "redis" / "redis.conf"
# the frame rate the shipped deployment is sized for (deploy/redis/redis.conf, deploy/k8s/10-redis.yaml)
DESIGN_FPS = 16
OLD_RECORDS = 3_000  # ~3 MB: more than the 300 frames of the full-Redis test leave behind


def redis_with(workdir: Path, *extra: str) -> Service:
    port = free_port()
    args = [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
            "--save", "", "--appendonly", "no", *extra]
    return Service(args, port, workdir / f"redis-{port}.log").start()


def sample_frames() -> list[bytes]:
    return [p.read_bytes() for p in sorted(SAMPLES.rglob("*.bmp"))]


def conf_value(name: str) -> str:
    (value,) = re.findall(rf"^{name}\s+(\S+)\s*$", REDIS_CONF.read_text(), re.M)
    return value


# --- the deployed configuration ---

def test_deployed_redis_has_a_maxmemory_that_fits_the_design_rate_and_a_safe_policy():
    assert conf_value("maxmemory-policy") == REDIS_MAXMEMORY_POLICY
    maxmemory = parse_bytes(conf_value("maxmemory"))
    assert maxmemory >= redis_bytes_needed(Settings(), DESIGN_FPS), "the default settings do not fit the design rate"
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "k8s" / "10-redis.yaml").read_text()) if d]
    (statefulset,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (redis_container,) = [c for c in statefulset["spec"]["template"]["spec"]["containers"] if c["name"] == "redis"]
    limit = parse_bytes(redis_container["resources"]["limits"]["memory"].replace("Gi", "gib").replace("Mi", "mib"))
    # fragmentation and the AOF rewrite's copy-on-write live above maxmemory, inside the container limit
    assert limit >= 1.25 * maxmemory, (limit, maxmemory)
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["data"]["redis.conf"] == REDIS_CONF.read_text(), "k8s and compose must run the same redis.conf"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert any("deploy/redis/redis.conf" in v for v in compose["services"]["redis"]["volumes"])


def test_check_sizing_refuses_a_redis_too_small_for_the_rate(capsys):
    assert main(["check-sizing", "--fps", "16", "--redis-maxmemory", "1gb"]) == 1
    err = capsys.readouterr().err
    assert "needs" in err and "STEELSIGHT_RESULT_TTL_S" in err
    assert main(["check-sizing", "--fps", str(DESIGN_FPS), "--redis-maxmemory", conf_value("maxmemory")]) == 0


def test_event_sink_outboxes_count_in_the_sizing(monkeypatch, capsys):
    """A sink's outbox and dead letters have no TTL, so volatile-lru cannot evict them: they must fit."""
    events = 200_000  # a long outage's worth, waiting for the webhook
    without = redis_bytes_needed(Settings(), DESIGN_FPS)
    monkeypatch.setenv("STEELSIGHT_WEBHOOK_URL", "https://plant.example/events")
    monkeypatch.setenv("STEELSIGHT_WEBHOOK_SECRET", "x")
    monkeypatch.setenv("STEELSIGHT_SINK_QUEUE_MAX", str(events))
    get_settings.cache_clear()
    try:
        status = main(["check-sizing", "--fps", str(DESIGN_FPS), "--redis-maxmemory", conf_value("maxmemory")])
        with_sink = redis_bytes_needed(get_settings(), DESIGN_FPS)
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr()
    assert with_sink - without >= 2 * events * REDIS_STREAM_ENTRY_BYTES
    assert status == 1 and "event sinks (webhook; up to 200000 events waiting" in out.out, out
    assert "needs" in out.err


@pytest.mark.parametrize(("extra", "expected"), [
    ((), "no maxmemory"),
    (("--maxmemory", "3gb", "--maxmemory-policy", "allkeys-lru"), "evict queued jobs"),
    (("--maxmemory", "3gb", "--maxmemory-policy", "noeviction"), "line stops"),
    (("--maxmemory", "3gb", "--maxmemory-policy", REDIS_MAXMEMORY_POLICY), None),
], ids=["unlimited", "allkeys", "noeviction", "right"])
def test_check_sizing_reads_the_live_redis(tmp_path, monkeypatch, capsys, extra, expected):
    server = redis_with(tmp_path, *extra)
    try:
        monkeypatch.setenv("STEELSIGHT_REDIS_URL", f"redis://127.0.0.1:{server.port}/0")
        get_settings.cache_clear()
        status = main(["check-sizing", "--fps", "2"])
    finally:
        get_settings.cache_clear()
        server.stop()
    err = capsys.readouterr().err
    if expected is None:
        assert status == 0, err
    else:
        assert status == 1 and expected in err, err


# --- the formula's per-frame figures, measured on real frames through a real worker ---

def test_per_frame_figures_cover_what_redis_really_holds(settings, tmp_path):
    conn = redis.Redis.from_url(settings.redis_url.get_secret_value())
    producer = Producer(settings, "line-1", "cam-1")
    paths = sorted(SAMPLES.rglob("*.bmp"))
    for path in paths:  # ids as the producer makes them from file names: a readable part and a hash
        assert producer.send(path.read_bytes(), safe_frame_id(path.name, datetime.now(UTC)), "bmp") == "enqueued"
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    job_ids = queue.job_ids
    assert len(job_ids) == len(paths)
    # what a volatile-* policy never evicts: the queue and waiting jobs carry no TTL
    assert conn.ttl(queue.key) == -1 and all(conn.ttl(f"rq:job:{j}") == -1 for j in job_ids)
    worker = WorkerProcess(settings, tmp_path, "sizing", burst=True)
    worker.proc.wait(timeout=240)
    worker.kill()
    records = [settings.result_key(j) for j in job_ids]
    assert all(conn.exists(k) for k in records), worker.output()[-2000:]
    record_bytes = max(conn.memory_usage(k) for k in records)
    job_bytes = max(conn.memory_usage(f"rq:job:{j}") + (conn.memory_usage(f"rq:results:{j}") or 0)
                    for j in job_ids)
    stream_bytes = conn.memory_usage(settings.results_stream) / conn.xlen(settings.results_stream)
    print(f"per frame: record {record_bytes} B, RQ job + result {job_bytes} B, stream entry {stream_bytes:.0f} B")
    assert record_bytes <= REDIS_RECORD_BYTES
    assert job_bytes <= REDIS_JOB_BYTES
    assert stream_bytes <= REDIS_STREAM_ENTRY_BYTES
    # what it may evict: finished records and jobs expire
    assert all(0 < conn.ttl(k) <= settings.result_ttl_s for k in records)
    assert all(0 < conn.ttl(f"rq:job:{j}") <= settings.job_result_ttl_s for j in job_ids)


# --- a full Redis ---

def test_full_redis_drops_old_results_and_loses_no_queued_frame(settings, tiny_checkpoint, tmp_path):
    """A Redis full of an earlier shift's results gets 300 more frames: old records are evicted by policy, every
    frame enqueued gets exactly one result, nothing fails, and Redis stays under its limit. A backlog of 20 frames
    queued for another line before (as idle as the old records) survives and is worked after."""
    server = redis_with(tmp_path, "--maxmemory", "64mb", "--maxmemory-policy", REDIS_MAXMEMORY_POLICY,
                        "--maxmemory-samples", conf_value("maxmemory-samples"))
    worker = None
    try:
        s = settings.model_copy(update={"redis_url": SecretStr(f"redis://127.0.0.1:{server.port}/0"),
                                        "checkpoint": str(tiny_checkpoint), "stream_maxlen": 50,
                                        "max_queue_depth": 20})
        conn = redis.Redis(port=server.port)
        producer = Producer(s, "line-1", "cam-1")
        worker = WorkerProcess(s, tmp_path, "full")
        seen: list[str] = []
        done = threading.Event()

        def read_stream():  # as the dashboard does; the stream is capped, so read while frames flow
            last = "0-0"
            reader = redis.Redis(port=server.port)
            while not done.is_set():
                for _, entries in reader.xread({s.results_stream: last}, block=200) or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        seen.append(fields[b"result"].decode())

        thread = threading.Thread(target=read_stream, daemon=True)
        thread.start()
        frames = sample_frames()
        sent = []
        for i in range(5):  # warm up: the worker's model loaded, its keys and RQ's scripts in place
            assert producer.send(frames[i], f"warm{i}", "bmp") == "enqueued"
            sent.append(f"warm{i}")
        wait_until(lambda: len(seen) == 5, 120, "the warm-up results")
        backlog = s.model_copy(update={"queue_name": f"{s.queue_name}-backlog", "metrics_port": free_port()})
        waiting = Producer(backlog, "line-2", "cam-1")
        for i in range(20):
            assert waiting.send(frames[i], f"b{i}", "bmp") == "enqueued"
            sent.append(f"b{i}")
        # results of an earlier shift, as a Redis sized by the formula holds hours of them
        with conn.pipeline(transaction=False) as pipe:
            for i in range(OLD_RECORDS):
                pipe.set(s.result_key(f"line-0__cam-1__old{i}"), b"r" * 900, ex=s.result_ttl_s)
            pipe.execute()
        time.sleep(2.5)  # Redis's LRU clock ticks in seconds: the backlog and the old records are now idle
        limit = conn.info("memory")["used_memory"] + 100 * 1024
        conn.config_set("maxmemory", limit)
        for i in range(300):
            outcome = producer.send(frames[i % len(frames)], f"f{i}", "bmp")
            assert outcome == "enqueued", outcome
            sent.append(f"f{i}")
        wait_until(lambda: len(seen) >= len(sent) - 20, 180, "a result for every frame", interval=0.5)
        assert conn.info()["evicted_keys"] > 0, "Redis never filled: the test proved nothing"
        later = WorkerProcess(backlog, tmp_path, "backlog", burst=True)
        later.proc.wait(timeout=180)
        later.kill()
        wait_until(lambda: len(seen) >= len(sent), 30, "a result for every backlog frame", interval=0.5)
        time.sleep(1)  # a duplicate stream entry would arrive now
        done.set()
        thread.join(timeout=5)
        info = conn.info()
        old_left = sum(conn.exists(s.result_key(f"line-0__cam-1__old{i}")) for i in range(OLD_RECORDS))
        results = [re.search(r'"frame_id":"([^"]+)"', r).group(1) for r in seen]
        print(f"{len(sent)} sent, {len(results)} results, {info['evicted_keys']} keys evicted, "
              f"{OLD_RECORDS - old_left} of {OLD_RECORDS} old records, "
              f"used {info['used_memory']} of {limit} B")
        assert sorted(results) == sorted(sent), "a queued frame was lost or processed twice"
        assert old_left < OLD_RECORDS, "no old record was evicted"
        assert all('"status":"ok"' in r for r in seen)
        assert info["used_memory"] <= limit
        for queue_name in (s.queue_name, backlog.queue_name):
            assert FailedJobRegistry(queue_name, connection=conn, serializer=JSONSerializer).count == 0
            assert StartedJobRegistry(queue_name, connection=conn, serializer=JSONSerializer).count == 0
            assert Queue(queue_name, connection=conn, serializer=JSONSerializer).count == 0
        assert "OOM" not in worker.output()
    finally:
        if worker:
            worker.kill()
        server.stop()
