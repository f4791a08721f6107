"""Operator feedback and the review queue against real Redis and SeaweedFS (steelsight/feedback.py)."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import pytest

from steelsight import feedback
from steelsight.clients import ObjectStore, redis_client
from steelsight.contract import FEEDBACK_NOTE_MAX, Frame, FrameResult, Timings

from ..helpers import SAMPLES

FRAME_BYTES = (SAMPLES / "scratches" / "Sc_1.bmp").read_bytes()


@pytest.fixture()
def env(settings):
    settings = settings.model_copy(update={"library_bucket": f"lib-{settings.key_prefix}",
                                           "review_max_per_line_hour": 3})
    store = ObjectStore(settings)
    store.ensure_buckets()
    if not store.client.bucket_exists(settings.library_bucket):  # until ensure_buckets creates it everywhere
        store.client.make_bucket(settings.library_bucket)
    return settings, store, redis_client(settings)


def live_result(settings, store, n: int = 0, line: str = "line-1", label: str = "crazing", unknown: bool = False,
                upload: bool = True) -> FrameResult:
    frame = Frame(frame_id=f"f{n}", line_id=line, camera_id="cam-1",
                  captured_at=datetime(2026, 11, 30, 8, 0, n % 60, tzinfo=UTC), ext="bmp")
    if upload:
        store.put(settings.frames_bucket, frame.object_key, FRAME_BYTES, "image/bmp")
    return FrameResult(frame_id=frame.frame_id, job_id=frame.job_id, line_id=line, camera_id="cam-1",
                       captured_at=frame.captured_at, status="ok", label=label, confidence=0.8,
                       probabilities={label: 0.8}, unknown=unknown, unknown_reason="ood_score" if unknown else None,
                       frame_key=frame.object_key, timings=Timings(queue_wait_s=0, inference_s=0, total_s=0),
                       checkpoint_sha256="ab" * 32)


def test_a_mark_is_kept_in_the_store_and_indexed(env):
    settings, store, conn = env
    result = live_result(settings, store)
    mark = feedback.record(store, conn, settings, result, correct=False, true_class="scratches", note="long streak",
                           operator="anna")
    assert mark.feedback_key == f"feedback/line-1/cam-1/{result.job_id}.bmp"
    assert store.get(settings.library_bucket, mark.feedback_key) == FRAME_BYTES
    stored = json.loads(store.get(settings.library_bucket, mark.json_key))
    assert stored["true_class"] == "scratches" and stored["verdict"] == "crazing" and stored["operator"] == "anna"
    assert stored["checkpoint_sha256"] == "ab" * 32 and stored["frame_key"] == result.frame_key
    assert stored["captured_at"].startswith("2026-11-30T08:00:00")
    assert conn.ttl(settings.feedback_key(result.job_id)) == -1  # kept until undone
    assert [m.job_id for m in feedback.list_feedback(conn, settings)] == [result.job_id]

    # marking the same frame again replaces the mark, in the store and in the index
    again = feedback.record(store, conn, settings, result, correct=True, operator="ben")
    assert again.true_class == "crazing"  # right: the verdict's class
    assert conn.zcard(settings.feedback_index_key) == 1
    assert feedback.get(conn, settings, result.job_id).operator == "ben"
    assert json.loads(store.get(settings.library_bucket, mark.json_key))["correct"] is True

    # undo: out of the index, the store's JSON kept and marked undone
    feedback.undo(store, conn, settings, result.job_id, operator="ben")
    assert feedback.list_feedback(conn, settings) == [] and feedback.get(conn, settings, result.job_id) is None
    audit = json.loads(store.get(settings.library_bucket, mark.json_key))
    assert audit["undone_at"] and audit["undone_by"] == "ben"
    assert feedback.read_library(store, settings) == []
    assert len(feedback.read_library(store, settings, include_undone=True)) == 1
    with pytest.raises(feedback.FeedbackError, match="no mark to undo"):
        feedback.undo(store, conn, settings, result.job_id)


def test_bad_marks_are_refused_before_anything_is_written(env):
    settings, store, conn = env
    result = live_result(settings, store, 1)
    cases = [
        (dict(correct=False, true_class="rust"), "not one of"),
        (dict(correct=False, true_class="scratches", note="x" * (FEEDBACK_NOTE_MAX + 1)), "at most"),
        (dict(correct=False), "choose the true class"),
        (dict(correct=False, true_class="crazing"), "mark it right"),
        (dict(correct=True, true_class="patches"), "mark it wrong"),
    ]
    for kwargs, message in cases:
        with pytest.raises(feedback.FeedbackError, match=message):
            feedback.record(store, conn, settings, result, **kwargs)
    gone = live_result(settings, store, 2, upload=False)
    with pytest.raises(feedback.FeedbackError, match="no longer in"):
        feedback.record(store, conn, settings, gone, correct=False, true_class="other")
    unknown = live_result(settings, store, 3, unknown=True)
    with pytest.raises(feedback.FeedbackError, match="names no class"):
        feedback.record(store, conn, settings, unknown, correct=True)
    assert conn.zcard(settings.feedback_index_key) == 0
    assert store.list_keys(settings.library_bucket, "feedback/") == []
    # an unknown verdict is labelled with the class it really is
    assert feedback.record(store, conn, settings, unknown, correct=False, true_class="other").true_class == "other"


def test_an_upload_is_filed_by_its_bytes_hash(env):
    settings, store, conn = env
    frame_id = feedback.upload_frame_id(FRAME_BYTES)
    result = feedback.upload_result(frame_id, "Sc_1.bmp", "crazing", 0.7, checkpoint_sha256="cd" * 32)
    mark = feedback.record(store, conn, settings, result, correct=False, true_class="scratches", source="upload",
                           frame_bytes=FRAME_BYTES, file_name="Sc_1.bmp")
    assert mark.line_id == "upload" and mark.file_name == "Sc_1.bmp" and mark.frame_key == ""
    assert store.get(settings.library_bucket, mark.feedback_key) == FRAME_BYTES
    same = feedback.upload_result(feedback.upload_frame_id(FRAME_BYTES[:]), "copy.bmp", "crazing", 0.7)
    assert same.job_id == result.job_id  # the same file again replaces its mark
    with pytest.raises(feedback.FeedbackError, match="image extension"):
        feedback.upload_result("u0", "notes.txt", "crazing", 0.7)
    with pytest.raises(feedback.FeedbackError, match="not the file"):
        feedback.record(store, conn, settings, result, correct=True, source="upload", frame_bytes=b"other",
                        file_name="Sc_1.bmp")


def test_correction_rates_per_line_and_class(env):
    settings, store, conn = env
    marks = [(0, "line-1", "crazing", False, "patches"), (1, "line-1", "crazing", True, None),
             (2, "line-2", "patches", False, "clean"), (3, "line-2", "crazing", True, None)]
    for n, line, label, correct, true in marks:
        feedback.record(store, conn, settings, live_result(settings, store, n, line, label), correct=correct,
                        true_class=true)
    rates = feedback.correction_rates(feedback.list_feedback(conn, settings))
    assert [(r.key, r.reviewed, r.wrong) for r in rates["line"]] == [("line-1", 2, 1), ("line-2", 2, 1)]
    assert [(r.key, r.reviewed, r.wrong, r.rate) for r in rates["class"]] == [
        ("crazing", 3, 1, pytest.approx(1 / 3)), ("patches", 1, 1, 1.0)]
    assert len(feedback.list_feedback(conn, settings, line="line-2", correct=False)) == 1
    assert [m.true_class for m in feedback.list_feedback(conn, settings, true_class="clean")] == ["clean"]
    assert feedback.list_feedback(conn, settings, source="review") == []

    # the store is the durable copy: a lost index is rebuilt from it
    conn.delete(settings.feedback_index_key, *(settings.feedback_key(m.job_id) for m in
                                               feedback.read_library(store, settings)))
    assert feedback.reindex(store, conn, settings) == 4
    assert len(feedback.list_feedback(conn, settings)) == 4


def test_review_queue_bound_per_line_and_hour_and_no_frame_twice(env):
    settings, store, conn = env
    now = datetime(2026, 11, 30, 8, 15, tzinfo=UTC)
    line1 = [live_result(settings, store, n, "line-1", upload=False) for n in range(6)]
    sent = [feedback.enqueue_for_review(conn, settings, r, "random", now=now) for r in line1]
    assert sent == [True, True, True, False, False, False]  # review_max_per_line_hour = 3
    # another line has its own bound; the same frame is never queued twice
    assert feedback.enqueue_for_review(conn, settings, live_result(settings, store, 0, "line-2", upload=False),
                                       "unknown", now=now)
    assert not feedback.enqueue_for_review(conn, settings, line1[0], "unknown", now=now + timedelta(hours=1))
    # the next clock hour has room again
    assert feedback.enqueue_for_review(conn, settings, line1[4], "low_margin", now=now + timedelta(hours=1))
    pending = feedback.list_review(conn, settings)
    assert len(pending) == 5 and pending[0].result.job_id == line1[0].job_id  # oldest first
    assert [i.reason for i in feedback.list_review(conn, settings, line="line-2")] == ["unknown"]

    # labelling records a review mark and takes the frame off the queue for good
    item = pending[0]
    store.put(settings.frames_bucket, item.result.frame_key, FRAME_BYTES, "image/bmp")
    mark = feedback.label_review(store, conn, settings, item, correct=False, true_class="other", operator="anna")
    assert mark.source == "review" and mark.review_reason == "random"
    assert item.result.job_id not in [i.result.job_id for i in feedback.list_review(conn, settings)]
    feedback.undo(store, conn, settings, item.result.job_id)
    assert not feedback.enqueue_for_review(conn, settings, item.result, "random", now=now + timedelta(hours=3))
    # a frame an operator already marked is not sent
    marked = live_result(settings, store, 30, "line-3")
    feedback.record(store, conn, settings, marked, correct=True)
    assert not feedback.enqueue_for_review(conn, settings, marked, "random", now=now)
    assert feedback.dismiss_review(conn, settings, pending[1].result.job_id)
    assert len(feedback.list_review(conn, settings)) == 3


def test_review_bound_holds_under_concurrent_callers(env):
    settings, store, conn = env
    settings = settings.model_copy(update={"review_max_per_line_hour": 7})
    now = datetime.now(UTC)
    results = [live_result(settings, store, n, "line-c", upload=False) for n in range(40)]
    outcomes: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def caller(i: int) -> None:
        conn_i = redis_client(settings)  # each its own connection, as separate workers have
        start.wait()
        for r in results[i::4]:  # every frame offered by two callers
            sent = feedback.enqueue_for_review(conn_i, settings, r, "random", now=now)
            with lock:
                outcomes.append(sent)

    threads = [threading.Thread(target=caller, args=(i % 4,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(outcomes) == 7 and len(outcomes) == 80
    queued = [i.result.job_id for i in feedback.list_review(conn, settings)]
    assert len(queued) == len(set(queued)) == 7


@pytest.mark.filterwarnings("ignore:notes.txt")  # the refused file, warned about in the page
def test_an_upload_on_the_dashboard_can_be_marked_and_undone(env, tiny_predictor, tmp_path):
    from types import SimpleNamespace

    from steelsight.dashboard.app import Dashboard
    from steelsight.dashboard.data import LiveSource

    settings, store, conn = env
    board = Dashboard(settings, LiveSource(settings, store, conn), tiny_predictor)
    good, text = tmp_path / "Sc_1.bmp", tmp_path / "notes.txt"
    good.write_bytes(FRAME_BYTES)
    text.write_bytes(b"not an image")
    board.explain_uploads([str(good), str(text)], "gradcam")
    choices, known, model = board.feedback.upload_choices([str(good), str(text)])
    assert choices["choices"] == ["Sc_1.bmp"] and tiny_predictor.checkpoint.sha256[:12] in model
    request = SimpleNamespace(username="ben")
    said = board.feedback.submit_upload("Sc_1.bmp", known, "wrong", "other", "odd glare", request)
    assert said.startswith("recorded"), said
    mark = feedback.list_feedback(conn, settings, source="upload")[0]
    assert (mark.operator, mark.true_class, mark.file_name) == ("ben", "other", "Sc_1.bmp")
    assert mark.checkpoint_sha256 == tiny_predictor.checkpoint.sha256
    assert "choose right or wrong" in board.feedback.submit_upload("Sc_1.bmp", known, None, "other", "", request)
    assert board.feedback.undo_upload("Sc_1.bmp", known, request).startswith("undone")
    assert feedback.list_feedback(conn, settings) == []
