"""Frame ids: distinct files never share an id, and the same file re-sent is still recognised."""

from __future__ import annotations

import io
import os
import shutil
import signal
from datetime import UTC, datetime, timedelta

from PIL import Image

from steelsight.clients import redis_client
from steelsight.contract import Frame, validate_id
from steelsight.devstack import wait_until
from steelsight.producer.service import Producer, replay, safe_frame_id

from ..helpers import SAMPLES, WorkerProcess, records

# every group held names that the old id merged into one: a b / a.b / a_b / a__b -> a_b,
# Kratzer_ä / Kratzer_ö -> Kratzer, names sharing their first 80 characters, one stem in two formats
COLLIDING = ["a b.png", "a.b.png", "a_b.png", "a__b.png", "Kratzer_ä.png", "Kratzer_ö.png",
             "x" * 80 + "-1.png", "x" * 80 + "-2.png", "img0001.png", "img0001.bmp"]
DAY1 = datetime(2026, 3, 1, 6, 0, tzinfo=UTC)


def png(seed: int, fmt: str = "PNG") -> bytes:
    """A small real image, different per seed."""
    image = Image.open(SAMPLES / "crazing" / "Cr_1.bmp").convert("L").rotate(seed * 7)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def write(path, data: bytes, at: datetime) -> None:
    path.write_bytes(data)
    os.utime(path, (at.timestamp(), at.timestamp()))


def test_distinct_names_and_capture_times_give_distinct_valid_ids():
    ids = [safe_frame_id(name, DAY1) for name in COLLIDING]
    assert len(set(ids)) == len(COLLIDING)
    assert all(validate_id(i) == i for i in ids)
    # the readable part survives: folded accents, no extension
    assert ids[4].startswith("Kratzer_a-") and ids[5].startswith("Kratzer_o-") and ids[8].startswith("img0001-")
    assert safe_frame_id("img0001.png", DAY1) != safe_frame_id("img0001.png", DAY1 + timedelta(days=1))
    assert safe_frame_id("img0001.png", DAY1) != safe_frame_id("img0001.png", DAY1, occurrence="pass-1")
    assert safe_frame_id("day1/img0001.png", DAY1) != safe_frame_id("day2/img0001.png", DAY1)
    # deterministic: the same file at the same capture time is the same frame (re-sends are duplicates)
    assert safe_frame_id("a b.png", DAY1) == safe_frame_id("a b.png", DAY1)
    assert len(safe_frame_id("y" * 300 + ".png", DAY1)) <= 96
    job = Frame(frame_id=ids[0], line_id="l", camera_id="c", captured_at=DAY1, ext="png").job_id
    assert validate_id(job.split("__")[2]) and job.count("__") == 2


def test_each_colliding_name_gets_its_own_result(settings, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, name in enumerate(COLLIDING):
        write(folder / name, png(i, "BMP" if name.endswith(".bmp") else "PNG"), DAY1)
    producer = Producer(settings, "line-id", "cam-1")
    conn = redis_client(settings)
    assert [producer.send_file(item) for item in replay(folder)] == ["enqueued"] * len(COLLIDING)
    # the same files again: recognised, nothing sent twice
    assert [producer.send_file(item) for item in replay(folder)] == ["duplicate"] * len(COLLIDING)
    # img0001.png captured again the next day (the camera's counter wrapped): a new frame
    write(folder / "img0001.png", png(99), DAY1 + timedelta(days=1))
    assert [producer.send_file(item) for item in replay(folder) if item.path.name == "img0001.png"] == ["enqueued"]
    # the same name under another folder is another frame too
    (folder / "day2").mkdir()
    shutil.copy2(folder / "a b.png", folder / "day2" / "a b.png")
    assert [producer.send_file(item) for item in replay(folder) if "day2" in item.path.parts] == ["enqueued"]

    expected = len(COLLIDING) + 2
    worker = WorkerProcess(settings, tmp_path, "ids", burst=True)
    try:
        worker.proc.wait(timeout=180)
        wait_until(lambda: len(records(settings, conn)) == expected, 10, f"{expected} results")
    finally:
        worker.kill(signal.SIGTERM)
    results = records(settings, conn)
    assert len(results) == expected, worker.output()[-2000:]
    assert all(r["status"] == "ok" for r in results.values()), results
    assert len({r["frame_key"] for r in results.values()}) == expected  # no object overwrote another
    assert conn.xlen(settings.results_stream) == expected
