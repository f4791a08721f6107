"""The worker refuses what its producer never sets: callbacks, webhooks, dependencies; and it says when it quits."""

from __future__ import annotations

import http.server
import signal
import threading
from datetime import UTC, datetime
from pathlib import Path

from rq import Callback, Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.webhook import Webhook

from steelsight.clients import redis_client
from steelsight.contract import JOB_FUNCTION, Frame
from steelsight.devstack import wait_until
from steelsight.producer.service import Producer, replay

from ..helpers import SAMPLES, WorkerProcess, records

MARKER_CALLBACK = f"{__name__}.touch_marker"


def touch_marker(job, connection, *args) -> None:
    """A callback that leaves a file behind if it ever runs (path in the job's meta)."""
    Path(job.meta["marker"]).write_text(f"ran for {job.id}")


def failed(settings, conn) -> dict[str, str]:
    registry = FailedJobRegistry(settings.queue_name, connection=conn, serializer=JSONSerializer)
    return {i: Job.fetch(i, connection=conn, serializer=JSONSerializer).latest_result().exc_string or ""
            for i in registry.get_job_ids()}


def frame_payload(producer: Producer, frame_id: str) -> dict:
    item = next(i for i in replay(SAMPLES, limit=1))
    frame = Frame(frame_id=frame_id, line_id=producer.line_id, camera_id=producer.camera_id,
                  captured_at=datetime.now(UTC), ext="bmp")
    producer.store.put(producer.settings.frames_bucket, frame.object_key, item.path.read_bytes(), "image/bmp")
    return frame.model_dump(mode="json")


class Hits(http.server.BaseHTTPRequestHandler):
    count = 0

    def do_GET(self):
        Hits.count += 1
        self.send_response(200)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_jobs_with_callbacks_webhooks_or_dependencies_are_refused_before_anything_runs(settings, tmp_path):
    conn = redis_client(settings)
    producer = Producer(settings, "line-g", "cam-1")
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hits)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hook.server_address[1]}/hook"
    markers = {name: tmp_path / name for name in ("foreign", "success", "failure", "stopped", "print")}
    # a foreign function whose refusal would call its failure callback
    queue.enqueue("os.getcwd", job_id="foreign", on_failure=Callback(MARKER_CALLBACK),
                  meta={"marker": str(markers["foreign"])})
    queue.enqueue("os.getcwd", job_id="print", on_failure=Callback("builtins.print"),
                  meta={"marker": str(markers["print"])})
    # the frame job itself, carrying what the producer never sets
    for name, extra in {"success": {"on_success": Callback(MARKER_CALLBACK)},
                        "failure": {"on_failure": Callback(MARKER_CALLBACK)},
                        "stopped": {"on_stopped": Callback(MARKER_CALLBACK)},
                        "webhook": {"webhooks": [Webhook(url, "finished"), Webhook(url, "failed")]}}.items():
        queue.enqueue(JOB_FUNCTION, frame=frame_payload(producer, name), job_id=f"line-g__cam-1__{name}",
                      meta={"marker": str(markers.get(name, tmp_path / name))}, **extra)
    queue.enqueue(JOB_FUNCTION, frame=frame_payload(producer, "good"), job_id="line-g__cam-1__good")
    queue.enqueue(JOB_FUNCTION, frame=frame_payload(producer, "later"), job_id="line-g__cam-1__later",
                  depends_on="line-g__cam-1__good")
    worker = WorkerProcess(settings, tmp_path, "guard", burst=True)
    try:
        worker.proc.wait(timeout=120)
    finally:
        worker.kill()
        hook.shutdown()
    assert not [m.name for m in markers.values() if m.exists()], worker.output()
    assert Hits.count == 0  # no webhook sent
    refused = failed(settings, conn)
    assert set(refused) == {"foreign", "print", "line-g__cam-1__success", "line-g__cam-1__failure",
                            "line-g__cam-1__stopped", "line-g__cam-1__webhook", "line-g__cam-1__later"}, refused
    assert all("refusing" in reason for reason in refused.values()), refused
    assert set(records(settings, conn)) == {"line-g__cam-1__good"}
    assert worker.proc.returncode == 0, worker.output()


def test_a_refused_job_in_a_batch_leaves_the_worker_and_its_batch_mates_alone(settings, tmp_path):
    conn = redis_client(settings)
    producer = Producer(settings, "line-c", "cam-1")
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    for i in range(4):  # one batch of 4 (settings.batch_size), the bad one in the middle
        extra = {"on_success": Callback("no_such_module.fn")} if i == 2 else {}
        queue.enqueue(JOB_FUNCTION, frame=frame_payload(producer, f"f{i}"), job_id=f"line-c__cam-1__f{i}", **extra)
    worker = WorkerProcess(settings, tmp_path, "cobatch")
    try:
        wait_until(lambda: len(records(settings, conn)) == 3 and len(failed(settings, conn)) == 1, 90,
                   "3 results and 1 refusal", interval=0.2)
        assert worker.proc.poll() is None, worker.output()  # still working
        assert producer.send_file(next(replay(SAMPLES, limit=1))) == "enqueued"
        wait_until(lambda: len(records(settings, conn)) == 4, 60, "the next frame's result")
        assert worker.proc.poll() is None, worker.output()
    finally:
        worker.kill(signal.SIGTERM)
    assert set(records(settings, conn)) >= {f"line-c__cam-1__f{i}" for i in (0, 1, 3)}
    assert "refusing" in failed(settings, conn)["line-c__cam-1__f2"]
    assert StartedJobRegistry(settings.queue_name, connection=conn).get_job_ids(cleanup=False) == []


def test_a_worker_that_quits_on_an_unhandled_error_exits_non_zero(settings, tmp_path):
    conn = redis_client(settings)
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    conn.set(queue.intermediate_queue_key, "not a list")  # every dequeue now fails with WRONGTYPE
    Producer(settings, "line-e", "cam-1").send_file(next(replay(SAMPLES, limit=1)))
    worker = WorkerProcess(settings, tmp_path, "broken")
    try:
        code = worker.proc.wait(timeout=90)
    finally:
        worker.kill()
    assert code != 0, worker.output()
    assert "WRONGTYPE" in worker.output()


def test_jobs_asking_to_repeat_outlive_their_ttls_or_claim_another_frames_id_are_refused(settings):
    from rq import Repeat

    from steelsight.worker import service

    from ..helpers import SlowEngine

    conn = redis_client(settings)
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)

    def payload(frame_id: str) -> dict:  # the engine is a stand-in: no frame in S3 needed
        return Frame(frame_id=frame_id, line_id="line-t", camera_id="cam-1", captured_at=datetime.now(UTC),
                     ext="bmp").model_dump(mode="json")

    ttls = {"result_ttl": settings.job_result_ttl_s, "failure_ttl": settings.failure_ttl_s}
    odd = {"repeat": {"repeat": Repeat(times=5, interval=0)},  # re-enqueued after every success
           "result-forever": {"result_ttl": -1}, "failure-forever": {"failure_ttl": -1},
           "result-year": {"result_ttl": 365 * 86400},
           "queue-ttl": {"ttl": 3600}}  # a queued frame with a TTL can vanish unprocessed
    for name, extra in odd.items():
        queue.enqueue(JOB_FUNCTION, frame=payload(name), job_id=f"line-t__cam-1__{name}", **(ttls | extra))
    queue.enqueue(JOB_FUNCTION, frame=payload("other"), job_id="line-t__cam-1__impostor", **ttls)
    queue.enqueue(JOB_FUNCTION, frame=payload("good"), job_id="line-t__cam-1__good", **ttls)
    assert service.work(settings, SlowEngine(compute_s=0.01), burst=True) is True
    refused = failed(settings, conn)
    assert set(refused) == {f"line-t__cam-1__{name}" for name in [*odd, "impostor"]}, refused
    assert all("refusing" in reason for reason in refused.values()), refused
    assert set(records(settings, conn)) == {"line-t__cam-1__good"}  # no result under the impostor's id
    assert queue.count == 0 and ScheduledJobRegistry(settings.queue_name, connection=conn).count == 0
    # every key a refused job left behind expires, within the worker's own failure TTL
    for job_id in refused:
        assert 0 < conn.ttl(Job.key_for(job_id)) <= settings.failure_ttl_s, job_id
