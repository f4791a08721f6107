"""The dashboard's memory with the largest frames the pipeline allows, and its upload limits.

Peaks are measured in a child process that does what the live tab does (fetch a
result's image from S3 and decode it for display) and reads its own VmHWM from
/proc/self/status, reset before each frame through /proc/self/clear_refs.
"""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import zlib
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from steelsight.clients import ObjectStore
from steelsight.contract import FrameResult, Settings, Timings
from steelsight.devstack import wait_until

from ..helpers import SAMPLES, ChildProcess

MB = 1024 * 1024
LARGEST_SIDE = 6324  # 6324² = 39,992,976 pixels: just inside the 40 Mpixel decode limit
# Peak growth allowed while the dashboard shows one frame, per kind, in MB above the RSS before it.
# A PNG must be inflated whole once (Pillow holds RGB at 4 bytes a pixel); a JPEG decodes at 1/8 scale.
PEAK_BOUND_MB = {"bomb_png": 10, "gray_png": 60, "rgb_png": 200, "rgb_jpeg": 20}

PROBE = r"""
import gc, json, sys
from steelsight.contract import FrameResult, Settings
from steelsight.dashboard.data import LiveSource

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

source = LiveSource(Settings())
warm, *frames = [FrameResult.model_validate_json(line) for line in sys.stdin]
source.original(warm)  # libraries and their first allocations belong to the baseline
out = {"frames": []}
start = status("VmRSS")
for r in frames:
    gc.collect()
    reset_peak()
    before = status("VmRSS")
    image = source.overlay(r) if r.overlay_key else source.original(r)
    out["frames"].append({"id": r.frame_id, "before_mb": before, "peak_mb": status("VmHWM"),
                          "shape": None if image is None else list(image.shape)})
    del image
gc.collect()
out["retained_mb"] = status("VmRSS") - start
out["cache_bytes"] = getattr(source, "cache_bytes", None)
print(json.dumps(out))
"""


def png_stream(width: int, height: int, colour: bool) -> bytes:
    """A PNG of a flat surface with a dark stripe, compressed row by row: tiny file, huge canvas."""
    channels = 3 if colour else 1
    row = bytearray(b"\0" + bytes([140]) * (width * channels))
    row[1 : 1 + channels * min(width, 40)] = b"\x10" * channels * min(width, 40)
    deflate, idat = zlib.compressobj(9), []
    for _ in range(height):
        idat.append(deflate.compress(bytes(row)))
    idat.append(deflate.flush())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2 if colour else 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat))
            + chunk(b"IEND", b""))


def rgb_jpeg(side: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.zeros((side, side, 3), np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def result_for(frame_id: str, frame_key: str, overlay_key: str | None = None) -> FrameResult:
    return FrameResult(frame_id=frame_id, job_id=f"mem__cam__{frame_id}", line_id="mem", camera_id="cam",
                       captured_at=datetime.now(UTC), status="ok" if overlay_key else "rejected",
                       frame_key=frame_key, overlay_key=overlay_key, timings=Timings(queue_wait_s=0, inference_s=0,
                                                                                     total_s=0))


def run_probe(settings: Settings, results: list[FrameResult]) -> dict:
    import os

    env = dict(os.environ) | settings.to_env() | {"OMP_NUM_THREADS": "1"}
    stdin = "\n".join(r.model_dump_json() for r in results)
    done = subprocess.run([sys.executable, "-c", PROBE], input=stdin, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def put_frames(settings: Settings, store: ObjectStore, items: dict[str, bytes]) -> None:
    store.ensure_buckets()
    for key, data in items.items():
        bucket = settings.overlays_bucket if key.startswith("overlay/") else settings.frames_bucket
        store.put(bucket, key, data, "application/octet-stream")


def test_largest_allowed_frames_stay_within_the_peak_bound(settings):
    store = ObjectStore(settings)
    side = LARGEST_SIDE
    items = {"warm.bmp": (SAMPLES / "scratches" / "Sc_1.bmp").read_bytes(),
             "bomb_png.png": png_stream(12000, 12000, colour=False),  # 144 Mpx in a few hundred kB
             "gray_png.png": png_stream(side, side, colour=False),
             "rgb_png.png": png_stream(side, side, colour=True),
             "overlay/rgb_jpeg.jpg": rgb_jpeg(side)}
    assert len(items["bomb_png.png"]) < 1 * MB
    put_frames(settings, store, items)
    results = [result_for("warm", "warm.bmp"), result_for("bomb_png", "bomb_png.png"),
               result_for("gray_png", "gray_png.png"), result_for("rgb_png", "rgb_png.png"),
               result_for("rgb_jpeg", "gray_png.png", overlay_key="overlay/rgb_jpeg.jpg")]
    probe = run_probe(settings, results)
    print(json.dumps(probe, indent=1))
    growth = {f["id"]: round(f["peak_mb"] - f["before_mb"], 1) for f in probe["frames"]}
    shapes = {f["id"]: f["shape"] for f in probe["frames"]}
    over = {k: (v, PEAK_BOUND_MB[k]) for k, v in growth.items() if v > PEAK_BOUND_MB[k]}
    assert not over, f"peak growth over its bound (MB, bound): {over}; all: {growth}"
    assert shapes["bomb_png"] is None  # over the pixel limit: never decoded, shown as a placeholder
    for kind in ("gray_png", "rgb_png", "rgb_jpeg"):  # shown, at display size
        assert shapes[kind] is not None and max(shapes[kind][:2]) <= settings.dashboard_image_max_side, (
            kind, shapes[kind])


def test_image_cache_stays_within_its_byte_bound(settings):
    """Ordinary 2048x2048 camera frames: forty different ones shown, the cache keeps what fits its bound."""
    bound = 16 * MB
    settings = settings.model_copy(update={"dashboard_cache_bytes": bound})
    store = ObjectStore(settings)
    frame = png_stream(2048, 2048, colour=False)
    keys = {f"cam/{i}.png": frame for i in range(40)}
    put_frames(settings, store, {"warm.bmp": (SAMPLES / "scratches" / "Sc_1.bmp").read_bytes()} | keys)
    results = [result_for("warm", "warm.bmp")] + [result_for(f"f{i}", key) for i, key in enumerate(keys)]
    probe = run_probe(settings, results)
    print(json.dumps({k: v for k, v in probe.items() if k != "frames"}))
    assert all(f["shape"] is not None for f in probe["frames"])
    assert probe["cache_bytes"] is not None and probe["cache_bytes"] <= bound
    # what stays in the process after forty frames (500 MB if each were kept whole): the cache, and the
    # allocator's slack (glibc keeps freed buffers up to its 32 MB dynamic mmap threshold on its heap)
    assert probe["retained_mb"] <= bound / MB + 40, probe["retained_mb"]


def test_byte_cache_evicts_least_recently_used():
    from steelsight.dashboard.data import ByteBoundedCache

    bound = 2 * (1000 + ByteBoundedCache.ENTRY_OVERHEAD) + 500  # room for two of the arrays below
    cache = ByteBoundedCache(max_bytes=bound)
    a, b, c = np.zeros(1000, np.uint8), np.zeros(1000, np.uint8), np.zeros(1000, np.uint8)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # a is now the most recent
    cache.put("c", c)  # over the bound: b, the least recent, goes
    assert cache.get("b", "missing") == "missing" and cache.get("a") is a and cache.get("c") is c
    assert cache.bytes <= bound and len(cache) == 2
    cache.put("huge", np.zeros(5000, np.uint8))  # larger than the whole cache: not kept
    assert cache.get("huge", "missing") == "missing" and cache.bytes <= bound
    cache.put("gone", None)  # a missing image is remembered too, at a small cost
    assert cache.get("gone", "missing") is None


def test_too_many_or_too_large_uploads_are_refused_by_the_handler(settings, tiny_predictor, tmp_path):
    from steelsight.dashboard.app import Dashboard

    settings = settings.model_copy(update={"max_upload_files": 3, "max_upload_total_bytes": 300_000})
    app = Dashboard(settings, source=None, predictor=tiny_predictor)
    good = (SAMPLES / "scratches" / "Sc_1.bmp").read_bytes()
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"f{i}.bmp")
        paths[-1].write_bytes(good)
    gallery, report = app.explain_uploads([str(p) for p in paths], "gradcam")
    assert gallery == [] and "4 files" in report and "at most 3" in report, report
    big = tmp_path / "big.png"
    big.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    gallery, report = app.explain_uploads([str(big), str(big)], "gradcam")
    assert gallery == [] and "400000 bytes" in report and "300000" in report, report
    gallery, report = app.explain_uploads([str(paths[0])], "gradcam")
    assert len(gallery) == 1 and "upload-label" in report


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "----steelsight-test-boundary"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _post(url: str, body: bytes, content_type: str) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def test_upload_requests_with_too_many_or_too_large_files_are_refused(settings, tmp_path):
    """Over HTTP, on the upload route every browser upload goes through; a loopback dashboard needs no login."""
    settings = settings.model_copy(update={"max_upload_files": 3, "max_upload_bytes": 150_000,
                                           "max_upload_total_bytes": 200_000})
    dashboard = ChildProcess(settings, tmp_path, "dashboard-limits", ["dashboard"])
    base = f"http://127.0.0.1:{settings.dashboard_port}"
    upload = base + "/gradio_api/upload"
    try:
        wait_until(lambda: urllib.request.urlopen(base + "/", timeout=2).status == 200, 120, "the dashboard")
        small = (SAMPLES / "scratches" / "Sc_1.bmp").read_bytes()
        status, text = _post(upload, *_multipart([(f"f{i}.bmp", small) for i in range(4)]))
        assert status == 413 and "more than 3 files" in text, (status, text)
        chunk = bytes(120_000)
        status, text = _post(upload, *_multipart([("a.bmp", chunk), ("b.bmp", chunk)]))
        assert status == 413 and "200000" in text, (status, text)
        status, text = _post(upload, *_multipart([("ok.bmp", small)]))
        assert status == 200 and len(json.loads(text)) == 1, (status, text)
    finally:
        dashboard.kill(signal.SIGTERM)
    assert "Traceback" not in dashboard.output()



# soak helpers: memory of the services a test started, with large frames in the mix ---------------------

def process_memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak since start, or since the last clear_refs) of a process, in MB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0]) / 1024
    return out


def redis_memory_mb(conn) -> dict[str, float]:
    """What Redis holds (used_memory), its peak, and the RSS of redis-server, in MB."""
    info = conn.info("memory")
    return {k: info[k] / MB for k in ("used_memory", "used_memory_peak", "used_memory_rss")}


def test_redis_and_dashboard_memory_with_large_frames_in_the_mix(settings, tmp_path):
    """Ordinary frames, 2048² camera frames, the largest allowed frame and a 144 Mpx bomb through a worker,
    while the live tab refreshes: the dashboard's peak stays bounded and Redis grows by the results only."""
    from gradio_client import Client

    from steelsight.clients import redis_client
    from steelsight.producer.service import Producer

    from ..helpers import WorkerProcess, records

    # frames of one tile, so the largest allowed frame is answered (tiled, it would need over 1,000 tiles and be
    # refused): the dashboard then shows every large frame of the mix
    settings = settings.model_copy(update={"tile_size": LARGEST_SIDE})
    conn = redis_client(settings)
    producer = Producer(settings, "line-mem", "cam-1")
    small = sorted(SAMPLES.rglob("*.bmp"))[:12]
    mix = [(p.read_bytes(), f"s{i}", "bmp") for i, p in enumerate(small)]
    mix += [(png_stream(2048, 2048, colour=False), f"cam2048-{i}", "png") for i in range(4)]
    mix += [(png_stream(LARGEST_SIDE, LARGEST_SIDE, colour=False), "largest", "png"),
            (png_stream(12000, 12000, colour=False), "bomb", "png")]
    dashboard = ChildProcess(settings, tmp_path, "dashboard-soak", ["dashboard"])
    worker = WorkerProcess(settings, tmp_path, "mem-worker")
    url = f"http://127.0.0.1:{settings.dashboard_port}/"
    try:
        wait_until(lambda: urllib.request.urlopen(url, timeout=2).status == 200, 120, "the dashboard")
        client = Client(url, verbose=False)

        def refresh():
            return client.predict("all", "all", "all", 15, api_name="/refresh_live")

        assert producer.send(*mix[0]) == "enqueued"
        wait_until(lambda: len(records(settings, conn)) == 1, 120, "the first result")
        refresh()  # model, decoders and Gradio's caches warm: the baseline
        dash_before, redis_before = process_memory_mb(dashboard.proc.pid), redis_memory_mb(conn)
        Path(f"/proc/{dashboard.proc.pid}/clear_refs").write_text("5")
        for item in mix[1:]:
            assert producer.send(*item) == "enqueued"
        wait_until(lambda: len(records(settings, conn)) == len(mix), 300, f"{len(mix)} results")
        def late() -> float:
            scraped = urllib.request.urlopen(f"http://127.0.0.1:{settings.dashboard_metrics_port}/metrics").read()
            return float(re.search(rb"^steelsight_dashboard_images_late_total (\S+)$", scraped, re.M).group(1))

        def all_shown() -> bool:  # a refresh with no thumbnail still loading: every decode has happened
            before = late()
            refresh()
            return late() == before

        # the newest twelve, the large ones among them, are fetched, decoded and shown
        wait_until(all_shown, 120, "a refresh with every thumbnail read")
        dash_after, redis_after = process_memory_mb(dashboard.proc.pid), redis_memory_mb(conn)
    finally:
        worker.kill(signal.SIGTERM)
        dashboard.kill(signal.SIGTERM)
    results = records(settings, conn)
    assert results["line-mem__cam-1__bomb"]["reason"].startswith("too_many_pixels")
    assert results["line-mem__cam-1__largest"]["status"] == "ok"
    peak = dash_after["VmHWM"] - dash_before["VmRSS"]
    per_frame_kb = (redis_after["used_memory"] - redis_before["used_memory"]) * 1024 / (len(mix) - 1)
    print(json.dumps({"dashboard_mb": {"before": dash_before, "after": dash_after, "peak_growth": peak},
                      "redis_mb": {"before": redis_before, "after": redis_after}, "redis_kb_per_frame": per_frame_kb}))
    assert peak < 250, f"dashboard peak grew {peak:.0f} MB showing the mix"
    # records, stream entries and RQ's job hashes (~9 KB a frame): none of it scales with the frame's pixels
    assert per_frame_kb < 32, per_frame_kb
