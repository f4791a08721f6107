"""The bad-frame corpus through the producer, the worker and the dashboard's upload tab.

Every item must end with a specific reason (or a documented conversion), and each
service must keep answering good frames afterwards.
"""

from __future__ import annotations

import re
import signal
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from steelsight.clients import ObjectStore, redis_client
from steelsight.contract import Frame, validate_id
from steelsight.devstack import wait_until
from steelsight.producer.service import Producer, safe_frame_id

from .. import corpus
from ..helpers import SAMPLES, ChildProcess, WorkerProcess, records

GOOD = SAMPLES / "scratches" / "Sc_1.bmp"
SIZE_LIMIT = 200_000
OVERSIZE = corpus.noise_png(600)  # about 360 kB


def test_corpus_is_broad_enough():
    kinds = {frame.kind for frame in corpus.CORPUS} | {"over-size-limit", "missing-object", "odd-names"}
    assert len(kinds) >= 15 and len(OVERSIZE) > SIZE_LIMIT


def test_bad_frames_through_producer_and_worker(settings, tmp_path):
    # PNG overlays here (the default, JPEG, is checked in test_pipeline.py)
    settings = settings.model_copy(update={"max_frame_bytes": SIZE_LIMIT, "overlay_format": "png"})
    conn = redis_client(settings)
    producer = Producer(settings, "line-bad", "cam-1")
    for frame in corpus.CORPUS:
        assert producer.send(frame.data, frame.kind, frame.ext) == "enqueued"
    assert producer.send(OVERSIZE, "over-size-limit", "png") == "too_large"  # refused before upload
    # the worker's own checks, for objects that did not come through our producer
    store = ObjectStore(settings)
    at = datetime(2026, 1, 2, tzinfo=UTC)
    oversize = Frame(frame_id="oversize-object", line_id="line-bad", camera_id="cam-1", captured_at=at, ext="png")
    store.put(settings.frames_bucket, oversize.object_key, OVERSIZE, "image/png")
    producer._enqueue(oversize)
    producer._enqueue(Frame(frame_id="missing-object", line_id="line-bad", camera_id="cam-1", captured_at=at,
                            ext="png"))
    odd_ids = [safe_frame_id(Path(name).stem) for name in corpus.ODD_NAMES]
    for frame_id in dict.fromkeys(odd_ids):
        assert producer.send(GOOD.read_bytes(), frame_id, "bmp") == "enqueued"

    worker = WorkerProcess(settings, tmp_path, "bad-frames")
    expected = len(corpus.CORPUS) + 2 + len(set(odd_ids))
    try:
        wait_until(lambda: len(records(settings, conn)) == expected, 120, f"{expected} results")
        # still serving: a good frame after the corpus gets a normal answer
        assert producer.send(GOOD.read_bytes(), "after-the-corpus", "bmp") == "enqueued"
        wait_until(lambda: "line-bad__cam-1__after-the-corpus" in records(settings, conn), 60, "the good frame")
        assert worker.proc.poll() is None
    finally:
        worker.kill(signal.SIGTERM)

    results = records(settings, conn)
    for frame in corpus.CORPUS:
        result = results[f"line-bad__cam-1__{frame.kind}"]
        if frame.reason is None:
            assert result["status"] == "ok" and result["label"], frame.kind
        else:
            assert result["status"] == "rejected" and result["reason"].startswith(frame.reason.value), (
                frame.kind, result["reason"])
    assert results["line-bad__cam-1__oversize-object"]["reason"].startswith("too_many_bytes")
    assert results["line-bad__cam-1__missing-object"]["reason"].startswith("missing_object")
    assert all(results[f"line-bad__cam-1__{i}"]["status"] == "ok" for i in odd_ids)
    assert results["line-bad__cam-1__after-the-corpus"]["status"] == "ok"
    overlay_key = results["line-bad__cam-1__after-the-corpus"]["overlay_key"]
    assert overlay_key.endswith(".png") and store.get(settings.overlays_bucket, overlay_key)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", corpus.ODD_NAMES)
def test_odd_names_become_safe_ids_and_raw_ids_are_refused(name):
    frame_id = safe_frame_id(Path(name).stem)
    assert validate_id(frame_id) == frame_id
    frame = Frame(frame_id=frame_id, line_id="l", camera_id="c", captured_at=datetime.now(UTC), ext="png")
    assert ".." not in frame.object_key and frame.object_key.count("/") == 5
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) or "__" in name:
        with pytest.raises(ValidationError):
            Frame(frame_id=name, line_id="l", camera_id="c", captured_at=datetime.now(UTC), ext="png")
    with pytest.raises(ValidationError):
        Frame(frame_id="ok", line_id="../..", camera_id="c", captured_at=datetime.now(UTC), ext="png")
    with pytest.raises(ValidationError):
        Frame(frame_id="ok", line_id="l", camera_id="c", captured_at=datetime.now(UTC), ext="png/../../x")


def test_bad_frames_through_the_upload_tab(settings, tmp_path):
    from gradio_client import Client, handle_file

    settings = settings.model_copy(update={"max_upload_bytes": SIZE_LIMIT})
    folder = tmp_path / "uploads"
    folder.mkdir()
    paths = []
    for frame in corpus.CORPUS:
        path = folder / f"{frame.kind}.{frame.ext}"
        path.write_bytes(frame.data)
        paths.append(path)
    dashboard = ChildProcess(settings, tmp_path, "dashboard", ["dashboard"])
    url = f"http://127.0.0.1:{settings.dashboard_port}/"
    try:
        wait_until(lambda: urllib.request.urlopen(url, timeout=2).status == 200, 120, "the dashboard")
        client = Client(url, verbose=False)
        gallery, report = client.predict([handle_file(p) for p in paths], "gradcam", api_name="/explain_uploads")
        with pytest.raises(Exception, match=r"(?i)size|large|exceed"):
            big = folder / "over-size-limit.png"
            big.write_bytes(OVERSIZE)
            client.predict([handle_file(big)], "gradcam", api_name="/explain_uploads")
        good_gallery, good_report = client.predict([handle_file(GOOD)], "gradcam", api_name="/explain_uploads")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{settings.dashboard_metrics_port}/metrics").read().decode()
    finally:
        dashboard.kill(signal.SIGTERM)

    for frame in corpus.REJECTED:
        block = re.search(rf"<h4>{re.escape(frame.kind)}\.{frame.ext}</h4><p class='upload-error'>Rejected: ([a-z_]+)",
                          report)
        assert block and block.group(1) == frame.reason.value, frame.kind
    assert len(gallery) == len(corpus.CONVERTED)
    assert {Path(item["caption"].split(":")[0]).stem for item in gallery} == {f.kind for f in corpus.CONVERTED}
    assert len(good_gallery) == 1 and "upload-label" in good_report
    assert f'steelsight_dashboard_uploads_total{{outcome="rejected"}} {float(len(corpus.REJECTED))}' in metrics
