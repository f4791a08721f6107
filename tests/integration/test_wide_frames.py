"""Wide line-camera frames through producer -> S3 -> worker -> result: tiles in the record, a full-size overlay."""

from __future__ import annotations

import io
import signal

import cv2
import numpy as np
from PIL import Image
from rq.job import Job
from rq.results import Result

from steelsight.clients import ObjectStore, redis_client
from steelsight.contract import REDIS_JOB_BYTES, REDIS_RECORD_BYTES, REDIS_TILE_BYTES
from steelsight.devstack import wait_until
from steelsight.producer.service import Producer

from ..helpers import SAMPLES, WorkerProcess, records


def _png(gray: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", gray)
    assert ok
    return data.tobytes()


def _strip(width: int, height: int) -> np.ndarray:
    """NEU samples side by side, cut to ``width`` x ``height``: real steel texture across a wide frame."""
    tiles = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(SAMPLES.rglob("*.bmp"))]
    row = np.concatenate([cv2.resize(t, (200, 200)) for t in tiles] * (width // (200 * len(tiles)) + 1), axis=1)
    return np.concatenate([row] * (height // 200 + 1), axis=0)[:height, :width]


def test_a_wide_frame_comes_back_tile_by_tile_with_a_full_size_overlay(settings, tmp_path):
    # the single frame takes the on-device explain path (on CPU tensors here), the wide one the CPU path
    settings = settings.model_copy(update={"max_tiles_per_frame": 20, "explain_on_device": "on"})
    conn = redis_client(settings)
    producer = Producer(settings, "line-w", "cam-1")
    dark = np.full((256, 100), 5, np.uint8)  # the dark margins beside the strip
    wide = np.concatenate([dark, _strip(1400, 256), dark], axis=1)  # 1600 x 256
    assert producer.send(_png(wide), "wide", "png") == "enqueued"
    assert producer.send(_png(_strip(200, 200)), "single", "png") == "enqueued"
    assert producer.send(_png(_strip(4000, 800)), "huge", "png") == "enqueued"  # 20 x 4 tiles: over 20

    worker = WorkerProcess(settings, tmp_path, "w-wide")
    try:
        wait_until(lambda: len(records(settings, conn)) == 3, 120, "3 results")
    finally:
        worker.kill(signal.SIGTERM)
    assert "explaining single-tile frames on cpu" in worker.output()
    results = {k.rsplit("__", 1)[1]: r for k, r in records(settings, conn).items()}

    wide_result = results["wide"]
    assert wide_result["status"] == "ok"
    tiles = wide_result["tiles"]
    assert len(tiles) >= 8 and all({"x", "y", "w", "h", "label", "confidence", "unknown"} <= set(t) for t in tiles)
    margins = [t for t in tiles if t["x"] == 0 or t["x"] + t["w"] == 1600]
    assert margins and all(t["label"] == "background" and t["w"] == 100 for t in margins)
    assert all(t["label"] != "background" for t in tiles if t not in margins)  # textured steel is never background
    covered = np.zeros((256, 1600), bool)
    for t in tiles:
        covered[t["y"] : t["y"] + t["h"], t["x"] : t["x"] + t["w"]] = True
    assert covered.all()  # every pixel of the frame belongs to a tile
    defects = [t for t in tiles if t["label"] != "background" and not t["unknown"]]
    assert sum(wide_result["defect_counts"].values()) == len(defects)
    if defects:
        top = max(defects, key=lambda t: t["confidence"])
        assert wide_result["label"] == top["label"] == wide_result["top_defect"]["label"]
    else:
        assert wide_result["label"] in ("unknown", "background") and wide_result["top_defect"] is None
    overlay = ObjectStore(settings).get(settings.overlays_bucket, wide_result["overlay_key"])
    with Image.open(io.BytesIO(overlay)) as img:
        assert img.size == (1600, 256)  # stored at the frame's own size

    single = results["single"]
    assert single["status"] == "ok" and single["tiles"] == [] and single["top_defect"] is None
    with Image.open(io.BytesIO(ObjectStore(settings).get(settings.overlays_bucket, single["overlay_key"]))) as img:
        assert img.format == "JPEG" and img.size == (200, 200)

    # Redis sizing counts each tile's verdict in the record, RQ's copy and the stream entry (the record's JSON)
    job_id = next(k for k in records(settings, conn) if k.endswith("__wide"))
    extra = {"record": conn.memory_usage(settings.result_key(job_id)) - REDIS_RECORD_BYTES,
             "job": conn.memory_usage(Job.key_for(job_id)) + conn.memory_usage(
                 Result.get_key(job_id)) - REDIS_JOB_BYTES}
    assert all(v <= len(tiles) * REDIS_TILE_BYTES for v in extra.values()), (extra, len(tiles))

    huge = results["huge"]
    assert huge["status"] == "rejected" and huge["reason"].startswith("too_many_tiles")
