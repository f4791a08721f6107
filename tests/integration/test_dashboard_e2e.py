"""End to end in a real browser: producer -> worker -> dashboard, driven by Playwright in Debian's Chromium."""

from __future__ import annotations

import re
import shutil
import signal
import urllib.request

import pytest

from steelsight.clients import redis_client
from steelsight.devstack import wait_until
from steelsight.producer.service import Producer, replay

from ..helpers import ARTIFACTS, SAMPLES, ChildProcess, WorkerProcess, records, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
FRAMES = 6


@pytest.fixture()
def browser():
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: run ./deploy/install-system-deps.sh --test")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def class_counts(page) -> dict[str, int]:
    text = page.inner_text("#live-counts")
    return {name: int(n) for name, n in re.findall(r"([\w-]+): (\d+)", text)}


def test_live_gallery_counts_and_uploads(settings, tmp_path, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    producer = Producer(settings, "line-e2e", "cam-9")
    one_per_class = [item for item in replay(SAMPLES) if item.path.stem.endswith("_1")]
    assert [producer.send_file(item) for item in one_per_class] == ["enqueued"] * FRAMES
    worker = WorkerProcess(settings, tmp_path, "e2e-worker")
    dashboard = ChildProcess(settings, tmp_path, "dashboard", ["dashboard"])
    conn = redis_client(settings)
    try:
        url = f"http://127.0.0.1:{settings.dashboard_port}/"
        wait_until(lambda: urllib.request.urlopen(url, timeout=2).status == 200, 120, "the dashboard")
        wait_until(lambda: len(records(settings, conn)) == FRAMES, 120, "the worker's results")
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.goto(url)

        # live tab: the gallery fills with every produced frame, and the counts match
        wait_for(page, f"document.querySelectorAll('#live-gallery img').length >= {FRAMES}", 30, dashboard)
        counts = class_counts(page)
        assert sum(counts.values()) == FRAMES
        produced = {r["label"] if not r["unknown"] else "unknown" for r in records(settings, conn).values()}
        assert {name for name, n in counts.items() if n} == produced
        assert "line-e2e/cam-9" in page.inner_text("#live-gallery")
        # selecting a frame shows its original, its overlay and its probabilities
        first = page.locator("#live-gallery .thumbnail-item").first
        frame_name = re.search(r"line-e2e/cam-9/(\w+)", first.inner_text()).group(1)
        first.click()
        wait_for(page, f"document.querySelector('#selected-detail').innerText.includes('line-e2e/cam-9/{frame_name}')",
                 20, dashboard)
        page.screenshot(path=str(ARTIFACTS / "dashboard-live.png"), full_page=True)

        # upload tab: one good image gets a label, bars and an overlay
        page.get_by_role("tab", name="Upload").click()
        page.locator("#upload-files input[type=file]").set_input_files(str(SAMPLES / "scratches" / "Sc_1.bmp"))
        page.wait_for_selector("#upload-report .upload-label", timeout=60_000)
        assert page.locator("#upload-gallery img").count() >= 1
        assert page.locator("#upload-report .bar").count() == 6
        page.screenshot(path=str(ARTIFACTS / "dashboard-upload.png"), full_page=True)

        # a corrupt upload is answered in the page, and the app keeps serving
        bad = tmp_path / "corrupt.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
        page.reload()
        page.get_by_role("tab", name="Upload").click()
        page.locator("#upload-files input[type=file]").set_input_files(str(bad))
        page.wait_for_selector("#upload-report .upload-error", timeout=60_000)
        assert "not_an_image" in page.inner_text("#upload-report")
        page.screenshot(path=str(ARTIFACTS / "dashboard-upload-error.png"), full_page=True)
        assert urllib.request.urlopen(url, timeout=5).status == 200

        scraped = urllib.request.urlopen(f"http://127.0.0.1:{settings.dashboard_metrics_port}/metrics").read().decode()
        assert 'steelsight_dashboard_uploads_total{outcome="rejected"} 1.0' in scraped
    finally:
        dashboard.kill(signal.SIGTERM)
        worker.kill(signal.SIGTERM)


def test_login_when_enabled(settings, tmp_path):
    import urllib.error
    import urllib.parse

    settings = settings.model_copy(update={"dashboard_user": "operator", "dashboard_password": "s3cret-pass"})
    dashboard = ChildProcess(settings, tmp_path, "dashboard-auth", ["dashboard"])
    base = f"http://127.0.0.1:{settings.dashboard_port}"
    try:
        wait_until(lambda: urllib.request.urlopen(base + "/", timeout=2).status == 200, 120, "the dashboard")

        def login(password: str) -> int:
            data = urllib.parse.urlencode({"username": "operator", "password": password}).encode()
            try:
                return urllib.request.urlopen(base + "/login", data=data, timeout=10).status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert login("wrong") == 400
        assert login("s3cret-pass") == 200
        with pytest.raises(urllib.error.HTTPError) as denied:  # the app's config is behind the login
            urllib.request.urlopen(base + "/config", timeout=10)
        assert denied.value.code == 401
    finally:
        dashboard.kill(signal.SIGTERM)


def test_unknown_banner_gives_the_score_against_its_threshold():
    from steelsight.dashboard.app import _bars_html
    from steelsight.model.inference.predictor import Prediction

    pred = Prediction(label="crazing", confidence=0.4, probabilities={"crazing": 0.4, "patches": 0.6},
                      ood_score=22.86, unknown=True, unknown_reason="ood_score")
    banner = _bars_html("drawing.png", pred, threshold=10.98, val_share=1.0)
    assert "UNKNOWN" in banner and "not what the model knows" in banner
    assert "OOD score 22.86, above the threshold 10.98; higher than 100.0% of the model's" in banner
    assert "class='ood-threshold' style='left:" in banner  # the gauge marks the threshold
    steel = _bars_html("steel.png", Prediction("crazing", 1.0, {"crazing": 1.0}, 1.2), threshold=10.98, val_share=0.4)
    assert "UNKNOWN" not in steel and "below the threshold 10.98; higher than 40.0%" in steel
    # the blended score is centred near 0 and can be negative: the bar starts at the lowest val score
    import re

    low = _bars_html("steel.png", Prediction("crazing", 1.0, {"crazing": 1.0}, -1.5), threshold=1.3, floor=-1.8)
    fill = float(re.search(r"ood-fill below' style='width:([0-9.]+)%", low).group(1))
    mark = float(re.search(r"ood-threshold' style='left:([0-9.]+)%", low).group(1))
    assert 0 < fill < mark < 100
    # a camera fault says what to check, not "another material"
    blurred = Prediction("crazing", 0.9, {"crazing": 0.9}, 14.0, unknown=True, unknown_reason="blurred")
    camera = _bars_html("blurred.png", blurred, threshold=10.98)
    assert "camera problem (blurred)" in camera and "focus" in camera and "not what the model knows" not in camera


def _near(pixels, rgb, tolerance=40):
    """Pixels within ``tolerance`` of a colour on every channel (the browser gets lossy WebP)."""
    import numpy as np

    return int((np.abs(pixels[..., :3].astype(int) - np.array(rgb)).max(axis=-1) <= tolerance).sum())


def _aspect_on_screen(page, selector) -> float:
    """Width over height of the image element as laid out, once it has loaded."""
    page.wait_for_function(f"(() => {{ const e = document.querySelector({selector!r}); "
                           "return e && e.complete && e.naturalWidth > 0 && e.clientHeight > 0; })()",
                           timeout=30_000)
    return page.eval_on_selector(selector, "e => e.clientWidth / e.clientHeight")


def _shown_image(page, selector):
    import io

    import numpy as np
    from PIL import Image

    src = page.get_attribute(selector, "src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def test_wide_frame_tiles_are_boxed_and_summed_live_and_on_upload(settings, tmp_path, browser):
    """A 1600x256 frame's tiled result: class-coloured boxes over its overlay, whole (not cropped), and its
    defect classes by tile count, on the live tab (a result as a worker writes it) and the upload tab."""
    from datetime import UTC, datetime

    import cv2
    import numpy as np

    from steelsight.clients import ObjectStore
    from steelsight.contract import Frame, FrameResult, TileVerdict, Timings
    from steelsight.dashboard.tiles import CLASS_COLOURS, UNKNOWN_COLOUR
    from steelsight.model.inference.imageio import encode_png
    from steelsight.worker.jobs import publish

    frame = Frame(frame_id="wide-1", line_id="line-w", camera_id="cam-w", captured_at=datetime.now(UTC), ext="png")
    store = ObjectStore(settings)
    store.ensure_buckets()
    store.put(settings.overlays_bucket, frame.overlay_key("png"), encode_png(np.full((256, 1600, 3), 128, np.uint8)),
              "image/png")
    labels = ["crazing", "crazing", "background", "background", "background", "scratches", "background",
              "background", "background", "background"]
    tiles = [TileVerdict(x=160 * i, y=0, w=160, h=256, label=label, confidence=0.9 - 0.01 * i,
                         unknown=i == 8, unknown_reason="ood_score" if i == 8 else None)
             for i, label in enumerate(labels)]
    publish(FrameResult(frame_id=frame.frame_id, job_id=frame.job_id, line_id=frame.line_id,
                        camera_id=frame.camera_id, captured_at=frame.captured_at, status="ok", label="crazing",
                        confidence=0.9, frame_key=frame.object_key, overlay_key=frame.overlay_key("png"),
                        timings=Timings(queue_wait_s=0, inference_s=0, total_s=0), tiles=tiles,
                        defect_counts={"crazing": 2, "scratches": 1}, top_defect=tiles[0]),
            redis_client(settings), settings)
    dashboard = ChildProcess(settings, tmp_path, "dashboard-tiles", ["dashboard"])
    try:
        url = f"http://127.0.0.1:{settings.dashboard_port}/"
        wait_until(lambda: urllib.request.urlopen(url, timeout=2).status == 200, 120, "the dashboard")
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.goto(url)
        # the frame itself, not the placeholder shown while it is still on its way from the store
        wait_for(page, "(() => { const i = document.querySelector('#live-gallery img'); "
                       "return i !== null && i.naturalWidth > 3 * i.naturalHeight; })()", 30, dashboard)
        assert "10 tiles (crazing 2, scratches 1)" in page.inner_text("#live-gallery")
        assert "scratches" in page.inner_text("#live-legend")
        thumb = "#live-gallery img"
        assert page.eval_on_selector(thumb, "e => getComputedStyle(e).objectFit") == "contain"
        # shown at its own aspect ratio, not in a square cell
        assert _aspect_on_screen(page, thumb) == pytest.approx(1600 / 256, rel=0.1)
        shown = _shown_image(page, thumb)
        assert shown.shape[1] / shown.shape[0] == pytest.approx(1600 / 256, rel=0.02)  # the whole frame
        scale = shown.shape[1] / 1600
        column = lambda i: shown[:, round(160 * i * scale): round(160 * (i + 1) * scale)]  # noqa: E731
        assert _near(column(0), CLASS_COLOURS["crazing"]) > 50 and _near(column(1), CLASS_COLOURS["crazing"]) > 50
        assert _near(column(5), CLASS_COLOURS["scratches"]) > 50
        assert _near(column(8), UNKNOWN_COLOUR, 25) > 20  # the unknown tile: dashed grey
        background = column(3)[10:-10, 10:-10]
        assert all(_near(background, rgb) == 0 for rgb in CLASS_COLOURS.values())  # background: no box
        page.locator("#live-gallery .thumbnail-item").first.click()
        wait_for(page, "document.querySelector('#selected-detail').innerText.includes('top defect')", 20, dashboard)
        detail = page.inner_text("#selected-detail")
        assert "defect tiles: crazing 2, scratches 1" in detail and "top defect: crazing" in detail
        page.screenshot(path=str(ARTIFACTS / "dashboard-live-tiles.png"), full_page=True)

        # upload tab: a 1600x256 frame of eight samples runs the tiled path of the dashboard's predictor
        samples = sorted((SAMPLES / "scratches").glob("*.bmp"))[:4] + sorted((SAMPLES / "inclusion").glob("*.bmp"))[:4]
        strip = np.hstack([cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (200, 256)) for p in samples])
        assert strip.shape == (256, 1600)
        wide = tmp_path / "wide.png"
        cv2.imwrite(str(wide), strip)
        page.get_by_role("tab", name="Upload").click()
        page.locator("#upload-files input[type=file]").set_input_files(str(wide))
        page.wait_for_selector("#upload-report .tile-summary", timeout=120_000)
        report = page.inner_text("#upload-report")
        assert "wide.png" in report and re.search(r"\d+ tiles", report)
        assert _aspect_on_screen(page, "#upload-gallery img") == pytest.approx(1600 / 256, rel=0.1)
        uploaded = _shown_image(page, "#upload-gallery img")
        assert uploaded.shape[1] / uploaded.shape[0] == pytest.approx(1600 / 256, rel=0.02)
        page.screenshot(path=str(ARTIFACTS / "dashboard-upload-tiles.png"), full_page=True)
    finally:
        dashboard.kill(signal.SIGTERM)
