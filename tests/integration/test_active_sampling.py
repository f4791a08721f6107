"""Active sampling through a real worker: picked frames reach the review queue, bounded per line and hour."""

from __future__ import annotations

from steelsight.clients import redis_client
from steelsight.feedback import list_review
from steelsight.producer.service import Producer, replay, run_producer

from ..helpers import SAMPLES, WorkerProcess, records


def test_the_worker_queues_frames_for_review_within_the_line_bound(settings, tmp_path):
    settings = settings.model_copy(update={"review_random_share": 1.0, "review_low_margin_share": 1.0,
                                           "review_unknown_share": 1.0, "review_max_per_line_hour": 5})
    conn = redis_client(settings)
    run_producer(Producer(settings, "line-a", "cam-1"), replay(SAMPLES, limit=8))
    run_producer(Producer(settings, "line-b", "cam-1"), replay(SAMPLES, limit=3))
    worker = WorkerProcess(settings, tmp_path, "sampler", burst=True)
    assert worker.proc.wait(timeout=180) == 0, worker.output()[-2000:]
    worker.kill()
    assert len(records(settings, conn)) == 11
    queued = list_review(conn, settings)
    by_line = {line: [i.result.job_id for i in queued if i.result.line_id == line] for line in ("line-a", "line-b")}
    assert len(by_line["line-a"]) == 5 and len(by_line["line-b"]) == 3  # line-a hit its bound, line-b did not
    assert len({i.result.job_id for i in queued}) == len(queued)
    assert all(i.reason in ("unknown", "low_margin", "random") for i in queued)
