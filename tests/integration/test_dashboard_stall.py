"""The live tab with the object store stalled or failing: a refresh stays quick, and the images come back with
the store."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from prometheus_client import REGISTRY

from steelsight.clients import ObjectStore, redis_client
from steelsight.contract import FrameResult, Timings
from steelsight.devstack import wait_until

from ..faults import HttpFaultProxy
from ..helpers import SAMPLES

FRAMES = 6
STALL_S = 25.0  # longer than the S3 client's 20 s read timeout: every read through the proxy fails


def _publish(settings, conn, store: ObjectStore) -> None:
    image = (SAMPLES / "scratches" / "Sc_1.bmp").read_bytes()  # 200x200
    store.ensure_buckets()
    for i in range(FRAMES):
        store.put(settings.frames_bucket, f"f{i}.bmp", image, "image/bmp")
        store.put(settings.overlays_bucket, f"f{i}.bmp", image, "image/bmp")
        r = FrameResult(frame_id=f"f{i}", job_id=f"stall__cam__f{i}", line_id="stall", camera_id="cam",
                        captured_at=datetime.now(UTC), status="ok", label="scratches", confidence=0.9,
                        frame_key=f"f{i}.bmp", overlay_key=f"f{i}.bmp",
                        timings=Timings(queue_wait_s=0, inference_s=0, total_s=0), finished_at=datetime.now(UTC))
        conn.xadd(settings.results_stream, {"result": r.model_dump_json()})


def _shown(gallery) -> int:
    """Thumbnails that are the frames' own images."""
    return sum(image.shape[:2] == (200, 200) for image, _ in gallery)


def _counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def _dashboard(settings, proxy, predictor, **update):
    from steelsight.dashboard.app import Dashboard
    from steelsight.dashboard.data import LiveSource

    via = settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{proxy.port}", **update})
    conn = redis_client(via)
    _publish(via, conn, ObjectStore(settings))
    return Dashboard(via, source=LiveSource(via, connection=conn), predictor=predictor)


def test_a_stalled_store_never_stalls_a_refresh_and_the_images_return_with_it(services, settings, tiny_predictor):
    from steelsight.dashboard.app import LOADING
    from steelsight.dashboard.data import ALL, IMAGE_READS

    _, s3 = services
    proxy = HttpFaultProxy(s3.port, slow_s=STALL_S).start()
    try:
        app = _dashboard(settings, proxy, tiny_predictor)
        late = _counter("steelsight_dashboard_images_late_total")
        proxy.mode = "slow"
        for _ in range(3):  # each refresh while the store stalls returns within the wait, with "loading" tiles
            started = time.monotonic()
            gallery = app.refresh_live(ALL, ALL, ALL, 15)[0]
            took = time.monotonic() - started
            assert took < app.settings.dashboard_image_wait_s + 2.0, f"a refresh took {took:.1f} s, store stalled"
            assert len(gallery) == FRAMES and all(image is LOADING for image, _ in gallery)
        assert _counter("steelsight_dashboard_images_late_total") - late == 3 * FRAMES
        assert proxy.most_open == min(FRAMES, IMAGE_READS), "the reads did not run side by side"
        proxy.mode = None
        # the stalled reads fail at the client's read timeout and are not remembered as missing images:
        # a refresh after that reads them again
        started = time.monotonic()
        wait_until(lambda: _shown(app.refresh_live(ALL, ALL, ALL, 15)[0]) == FRAMES, 60,
                   "every thumbnail after the store recovers")
        print(f"thumbnails back {time.monotonic() - started:.1f} s after the store recovered")
    finally:
        proxy.stop()


def test_a_store_error_shows_no_image_this_time_logs_once_and_is_read_again(services, settings, tiny_predictor,
                                                                            caplog):
    from steelsight.dashboard.app import PLACEHOLDER
    from steelsight.dashboard.data import ALL

    _, s3 = services
    proxy = HttpFaultProxy(s3.port).start()
    try:
        app = _dashboard(settings, proxy, tiny_predictor, dashboard_image_wait_s=10.0)  # errors, not timing
        errors = _counter("steelsight_dashboard_image_errors_total")
        proxy.mode = "503"
        with caplog.at_level(logging.WARNING, logger="steelsight.dashboard.data"):
            for _ in range(2):
                gallery = app.refresh_live(ALL, ALL, ALL, 15)[0]
                assert all(image is PLACEHOLDER for image, _ in gallery)
        assert _counter("steelsight_dashboard_image_errors_total") - errors == 2 * FRAMES
        failures = [r for r in caplog.records if "failed" in r.getMessage()]
        assert len(failures) == 1 and "SlowDown" in failures[0].getMessage(), [r.getMessage() for r in failures]
        proxy.mode = None
        assert _shown(app.refresh_live(ALL, ALL, ALL, 15)[0]) == FRAMES
    finally:
        proxy.stop()
