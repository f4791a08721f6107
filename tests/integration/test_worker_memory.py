"""A batch of the largest frames the decoder accepts stays within a stated memory bound in the worker."""

from __future__ import annotations

import signal
from pathlib import Path

import cv2
import numpy as np

from steelsight.clients import redis_client
from steelsight.devstack import free_port, wait_until
from steelsight.producer.service import Producer

from ..helpers import WorkerProcess, records

SIDE = 6300  # 39.7 Mpx, just under the decoder's 40 Mpx limit
FRAMES = 8  # one full batch at the default batch size
PEAK_ABOVE_IDLE_MB = 700  # frames shrunk on decode stay well under; a batch kept at full size takes several GB


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def big_png(seed: int) -> bytes:
    """A steel-like 6300 x 6300 gray PNG of a few hundred KB: the size the issue's 0.2 MB probe had."""
    rng = np.random.default_rng(seed)
    tile = rng.integers(90, 140, (63, 63), dtype=np.uint8)
    ok, data = cv2.imencode(".png", np.tile(tile, (SIDE // 63, SIDE // 63)), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok
    return data.tobytes()


def test_a_batch_of_the_largest_frames_stays_within_the_memory_bound(settings, tmp_path):
    # one tile per frame: the decode-then-shrink path whose memory this bounds (tiled frames are bounded by
    # max_tiles_per_frame, checked from the header before decoding)
    settings = settings.model_copy(update={"batch_size": FRAMES, "job_timeout_s": 120, "tile_size": SIDE,
                                           "metrics_port": free_port()})
    conn = redis_client(settings)
    worker = WorkerProcess(settings, tmp_path, "big")
    try:
        wait_until(lambda: conn.scard("rq:workers") > 0, 90, "the worker to load its model")
        pid = worker.proc.pid
        idle_kb = status_kb(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
        producer = Producer(settings, "line-big", "cam-1")
        for i in range(FRAMES):
            assert producer.send(big_png(i), f"big{i}", "png") == "enqueued"
        wait_until(lambda: len(records(settings, conn)) == FRAMES, 300, f"{FRAMES} results", 0.5)
        peak_kb = status_kb(pid, "VmHWM")
    finally:
        worker.kill(signal.SIGTERM)
    results = records(settings, conn)
    above_mb = (peak_kb - idle_kb) / 1024
    print(f"{FRAMES} frames of {SIDE}x{SIDE}: worker RSS idle {idle_kb / 1024:.0f} MB, peak {peak_kb / 1024:.0f} MB "
          f"(+{above_mb:.0f} MB)")
    assert all(r["status"] == "ok" for r in results.values()), results
    assert above_mb < PEAK_ABOVE_IDLE_MB
