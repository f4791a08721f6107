"""The live tab's time window shows the frames of that time, or says how much of it it shows."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from steelsight.clients import redis_client
from steelsight.contract import FrameResult, Timings


def _fill(settings, conn, n: int, span_s: float, now: float) -> None:
    """``n`` results evenly over the last ``span_s`` seconds, written with ids at their own times."""
    pipe = conn.pipeline(transaction=False)
    for i in range(n):
        at = now - span_s + span_s * (i + 0.5) / n
        r = FrameResult(frame_id=f"f{i}", job_id=f"l__c__f{i}", line_id="l", camera_id="c",
                        captured_at=datetime.fromtimestamp(at, UTC), status="ok", label="crazing", confidence=0.9,
                        frame_key="k", timings=Timings(queue_wait_s=0, inference_s=0, total_s=0),
                        finished_at=datetime.fromtimestamp(at, UTC))
        pipe.xadd(settings.results_stream, {"result": r.model_dump_json()}, id=f"{int(at * 1000)}-{i}")
    pipe.execute()


def test_a_fifteen_minute_window_at_twenty_frames_a_second(settings):
    """20 fps for 20 minutes: 24,000 results. A 15 min window holds 18,000 of them."""
    from steelsight.dashboard.data import LiveSource

    settings = settings.model_copy(update={"stream_maxlen": 50_000, "dashboard_window_max_frames": 20_000})
    conn = redis_client(settings)
    now = time.time()
    _fill(settings, conn, 24_000, 1200, now)
    source = LiveSource(settings, store=object(), connection=conn)
    window = source.window(900, now=now)
    assert len(window.results) == 18_000 and window.limited_by is None and window.covered_s == 900
    five = source.window(300, now=now)
    assert len(five.results) == 6_000
    assert all((now - r.finished_at.timestamp()) <= 300 for r in five.results)


def test_a_window_cut_short_says_what_it_shows(settings):
    from steelsight.dashboard.app import _stats_markdown
    from steelsight.dashboard.data import LiveSource

    conn = redis_client(settings)
    now = time.time()
    _fill(settings, conn, 3_000, 1200, now)  # 2.5 frames/s for 20 min
    state = {"queue_depth": 0, "workers_alive": 1, "failed_jobs": 0}

    # the read limit: 1,000 frames are the last 400 s of a 15 min window
    limited = LiveSource(settings.model_copy(update={"dashboard_window_max_frames": 1_000}), store=object(),
                         connection=conn).window(900, now=now)
    assert len(limited.results) == 1_000 and limited.limited_by == "read limit"
    assert abs(limited.covered_s - 400) < 2
    text = _stats_markdown(state, limited)
    assert "last 6.7 min of the 15 min window" in text and "1000" in text, text

    # the stream's length: a stream trimmed to 2,000 entries holds the last 800 s
    conn.xtrim(settings.results_stream, maxlen=2_000, approximate=False)
    trimmed = LiveSource(settings.model_copy(update={"stream_maxlen": 2_000}), store=object(),
                         connection=conn).window(900, now=now)
    assert len(trimmed.results) == 2_000 and trimmed.limited_by == "stream length"
    assert "last 13.3 min of the 15 min window" in _stats_markdown(state, trimmed)

    full = LiveSource(settings, store=object(), connection=conn).window(300, now=now)
    assert full.limited_by is None and "(5 min)" in _stats_markdown(state, full)

    # an empty window has no latency to show, rather than "nan"
    empty = _stats_markdown(state, LiveSource(settings, store=object(), connection=conn).window(1, now=now + 3600))
    assert "frames in window** 0" in empty and "**latency p50** – · **p95** –" in empty, empty
