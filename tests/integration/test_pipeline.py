"""Producer -> S3 (SeaweedFS) -> Redis/RQ -> worker processes -> results, on loopback."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import urllib.request

from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import Worker

from steelsight.clients import ObjectStore, redis_client
from steelsight.contract import Frame, Settings
from steelsight.devstack import free_port, wait_until
from steelsight.producer.service import Producer, replay

from ..helpers import SAMPLES, SlowEngine, WorkerProcess, records, run_slow_worker


def test_frames_flow_to_results_overlays_and_metrics(settings, tmp_path):
    conn = redis_client(settings)
    producer = Producer(settings, "line-a", "cam-1")
    sent = [producer.send_file(item) for item in replay(SAMPLES, limit=6)]
    assert sent == ["enqueued"] * 6
    first = next(replay(SAMPLES))
    assert producer.send_file(first) == "duplicate"  # re-sent frame: skipped
    first_id = f"line-a__cam-1__{first.frame_id}"
    producer.send(b"\x89PNG\r\n\x1a\nthis is not really a png", "corrupt", "png")
    producer.send((SAMPLES / "crazing" / "Cr_1.bmp").read_bytes()[:3000], "truncated", "bmp")
    # a race past the producer's check: the same job enqueued twice still yields one result
    store = ObjectStore(settings)
    frame = Frame(frame_id="twice", line_id="line-a", camera_id="cam-1", captured_at="2026-01-02T03:04:05Z",
                  ext="bmp")
    store.put(settings.frames_bucket, frame.object_key, (SAMPLES / "patches" / "Pa_1.bmp").read_bytes(), "image/bmp")
    producer._enqueue(frame)
    producer._enqueue(frame)

    worker = WorkerProcess(settings, tmp_path, "w1")
    try:
        wait_until(lambda: len(records(settings, conn)) == 9, 120, "9 results")
        # the job enqueued twice has run twice (one RQ result per run) before the stream is counted
        twice = Job.fetch(frame.job_id, connection=conn, serializer=JSONSerializer)
        wait_until(lambda: len(twice.results()) == 2, 60, "the duplicate job to finish")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/metrics").read().decode()
    finally:
        worker.kill(signal.SIGTERM)

    results = records(settings, conn)
    ok = {k: r for k, r in results.items() if r["status"] == "ok"}
    rejected = {k: r for k, r in results.items() if r["status"] == "rejected"}
    assert len(ok) == 7 and set(rejected) == {"line-a__cam-1__corrupt", "line-a__cam-1__truncated"}
    assert rejected["line-a__cam-1__corrupt"]["reason"].startswith("not_an_image")
    assert rejected["line-a__cam-1__truncated"]["reason"].startswith("truncated")
    for result in ok.values():
        assert result["label"] in result["probabilities"] and store.exists(settings.overlays_bucket,
                                                                             result["overlay_key"])
        # the default overlay is a JPEG, stored as one
        assert store.get(settings.overlays_bucket, result["overlay_key"])[:3] == b"\xff\xd8\xff"
        assert result["overlay_key"].endswith(".jpg") and store.client.stat_object(
            settings.overlays_bucket, result["overlay_key"]).content_type == "image/jpeg"
        assert result["frame_key"].startswith("line-a/cam-1/") and result["timings"]["total_s"] > 0
    assert conn.xlen(settings.results_stream) == 9  # one stream entry per frame, duplicates included
    job = Job.fetch(first_id, connection=conn, serializer=JSONSerializer)
    assert job.return_value()["label"] == ok[first_id]["label"]
    # RQ's copy of the job expires after job_result_ttl_s, the per-frame record after result_ttl_s
    assert 0 < conn.ttl(job.key) <= settings.job_result_ttl_s < settings.result_ttl_s
    assert settings.job_result_ttl_s < conn.ttl(settings.result_key(job.id)) <= settings.result_ttl_s

    assert 'steelsight_worker_frames_total{label="none",status="rejected"} 2.0' in metrics
    ok_count = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("steelsight_worker_frames_total{") and 'status="ok"' in line)
    assert ok_count == 7
    assert "steelsight_model_info{checkpoint=" in metrics
    assert "steelsight_worker_batch_size_count" in metrics


def claimed_by(conn, worker_name: str, registry: StartedJobRegistry) -> set[str]:
    """Ids of jobs in the started registry that ``worker_name`` claimed."""
    ids = registry.get_job_ids(cleanup=False)
    return {job.id for job in Job.fetch_many(ids, connection=conn, serializer=JSONSerializer)
            if job is not None and job.worker_name == worker_name}


def test_killed_worker_loses_no_frame(settings, tmp_path):
    # the shipped timings, not the fixture's short ones: recovery must not depend on tuning
    defaults = {name: Settings.model_fields[name].default
                for name in ("job_timeout_s", "maintenance_interval_s")}
    settings = settings.model_copy(update=defaults)
    conn = redis_client(settings)
    started = StartedJobRegistry(settings.queue_name, connection=conn, serializer=JSONSerializer)
    survivor = WorkerProcess(settings.model_copy(update={"metrics_port": free_port()}), tmp_path, "survivor")
    victim = WorkerProcess(settings, tmp_path, "victim")
    total = 24
    try:
        wait_until(lambda: {w.name for w in Worker.all(connection=conn)} >= {"survivor", "victim"}, 90,
                   "both workers to load their model")
        producer = Producer(settings, "line-k", "cam-1")
        assert all(producer.send_file(i) == "enqueued" for i in replay(SAMPLES, loop=True, limit=total))
        wait_until(lambda: claimed_by(conn, "victim", started), 60, "the victim to claim a batch", 0.02)
        victim.kill(signal.SIGKILL)
        died = time.monotonic()
        orphans = claimed_by(conn, "victim", started)  # dead: what it held stays held until reclaimed
        done_at: dict[str, float] = {}

        def all_done() -> bool:
            done = records(settings, conn)
            done_at.update({job_id: time.monotonic() for job_id in orphans & set(done) if job_id not in done_at})
            return len(done) == total
        wait_until(all_done, 120, f"all {total} results", 0.05)
    finally:
        survivor.kill(signal.SIGTERM)
        victim.kill()
    recovery = max(done_at.values()) - died
    print(f"killed worker: {len(orphans)} claimed frames finished {recovery:.1f}s after its death")
    assert orphans and set(done_at) == orphans
    assert recovery <= 10.0, f"{len(orphans)} orphaned frames took {recovery:.1f}s"
    assert conn.xlen(settings.results_stream) == total  # one stream entry per frame
    # and each frame processed once: one successful execution per job
    jobs = Job.fetch_many(list(records(settings, conn)), connection=conn, serializer=JSONSerializer)
    assert [job.id for job in jobs if len(job.results()) != 1] == []
    assert FailedJobRegistry(settings.queue_name, connection=conn).count == 0


def test_pickled_and_foreign_jobs_never_execute(settings, tmp_path):
    conn = redis_client(settings)
    marker = tmp_path / "executed"
    # 1) a job pickled by RQ's default serializer, on our queue
    Queue(settings.queue_name, connection=conn).enqueue("os.system", f"touch {marker}", job_id="pickled")

    # 2) a raw pickle whose unpickling alone would run code
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    Queue(settings.queue_name, connection=conn).enqueue("os.getcwd", job_id="bomb")
    conn.hset("rq:job:bomb", "data", pickle.dumps(Payload()))
    # 3) valid JSON naming a function other than the frame job
    Queue(settings.queue_name, connection=conn, serializer=JSONSerializer).enqueue(
        "os.system", f"touch {marker}", job_id="foreign")
    worker = WorkerProcess(settings, tmp_path, "guard", burst=True)
    worker.proc.wait(timeout=90)
    worker.kill()
    assert not marker.exists(), worker.output()
    failed = FailedJobRegistry(settings.queue_name, connection=conn, serializer=JSONSerializer)
    assert set(failed.get_job_ids()) == {"pickled", "bomb", "foreign"}
    assert "refusing to run 'os.system'" in worker.output()


def test_producer_waits_when_the_queue_is_full(settings):
    settings = settings.model_copy(update={"max_queue_depth": 2})
    conn = redis_client(settings)
    producer = Producer(settings, "line-b", "cam-1")
    outcomes = []
    sender = threading.Thread(target=lambda: outcomes.extend(producer.send_file(i) for i in replay(SAMPLES, limit=5)))
    sender.start()
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    wait_until(lambda: queue.count == 3, 20, "the queue to fill")
    time.sleep(1.0)
    assert queue.count == 3 and sender.is_alive()  # blocked, not dropping
    while sender.is_alive():
        conn.lpop(queue.key)  # a stand-in worker draining the queue
        time.sleep(0.2)
    sender.join()
    assert outcomes == ["enqueued"] * 5


def test_result_record_and_stream_entry_are_written_together_once(settings):
    from types import SimpleNamespace

    from steelsight.worker.jobs import publish

    conn = redis_client(settings)
    settings = settings.model_copy(update={"stream_maxlen": 5})
    first = SimpleNamespace(job_id="line__cam__a", model_dump_json=lambda: '{"status": "ok"}')
    assert publish(first, conn, settings) is True
    assert publish(SimpleNamespace(job_id="line__cam__a", model_dump_json=lambda: '{"status": "late"}'), conn,
                   settings) is False  # a re-run of the same job: first write wins, no second entry
    assert conn.get(settings.result_key("line__cam__a")) == b'{"status": "ok"}'
    assert 0 < conn.ttl(settings.result_key("line__cam__a")) <= settings.result_ttl_s
    assert [e[1][b"result"] for e in conn.xrange(settings.results_stream)] == [b'{"status": "ok"}']
    for i in range(300):
        publish(SimpleNamespace(job_id=f"line__cam__{i}", model_dump_json=lambda: "{}"), conn, settings)
    assert conn.xlen(settings.results_stream) < 300  # capped (approximately, as XADD MAXLEN ~ does)


def test_worker_fetches_the_next_batch_while_one_computes_and_keeps_both_alive(settings):
    engine = SlowEngine()
    beats = run_slow_worker(settings, engine, frames=10, batch=4, line="line-p")
    # batches 4, 4, 2; each next batch is claimed and fetched while the one ahead of it computes (whether the
    # model thread logs its start before the claim does is up to the scheduler, so only the overlap is asserted)
    times = {kind: [(n, t) for k, n, t in engine.events if k == kind] for kind in ("fetch", "compute", "computed")}
    assert [n for n, _ in times["fetch"]] == [n for n, _ in times["compute"]] == [4, 4, 2]
    for i in range(2):
        assert times["compute"][i][1] <= times["computed"][i][1]
        assert times["fetch"][i + 1][1] < times["computed"][i][1]  # fetched while batch i computed
        assert times["computed"][i][1] <= times["compute"][i + 1][1]  # one model call at a time
    # jobs waiting on the model, this batch's and the next one's, kept their heartbeats alive
    assert {"line-p__cam-1__f0", "line-p__cam-1__f4", "line-p__cam-1__f8"} <= {job_id for job_id, _ in beats}
    conn = redis_client(settings)
    assert len(records(settings, conn)) == 10
    assert Queue(settings.queue_name, connection=conn).finished_job_registry.count == 10


def test_model_starts_the_next_batch_while_this_ones_overlays_upload(settings):
    engine = SlowEngine(upload_s=0.8)
    beats = run_slow_worker(settings, engine, frames=8, batch=4, line="line-u")
    order = [kind for kind, _, _ in engine.events]
    second_compute = [i for i, kind in enumerate(order) if kind == "compute"][1]
    assert second_compute < order.index("uploaded")  # the model did not wait for the first batch's uploads
    # the first batch's jobs kept their heartbeats while only their uploads were left
    second_computed = [t for kind, _, t in engine.events if kind == "computed"][1]
    assert any(job_id == "line-u__cam-1__f0" and t > second_computed for job_id, t in beats)
    assert order.count("uploaded") == 8
    conn = redis_client(settings)
    assert len(records(settings, conn)) == 8
