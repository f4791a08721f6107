"""The live tab's image reads against a store that stalls on command: bounded, never in a click's way."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from steelsight.clients import MissingObject
from steelsight.contract import Settings
from steelsight.dashboard.data import IMAGE_READS, LiveSource

PNG = cv2.imencode(".png", np.full((40, 40), 128, np.uint8))[1].tobytes()


class GatedStore:
    """Answers a PNG for every key; keys under ``stall/`` wait until ``release`` is set, ``gone/`` are missing."""

    def __init__(self, delay_s: float = 0.0):
        self.release, self.delay_s = threading.Event(), delay_s
        self.reads, self.open, self.most_open = 0, 0, 0
        self._lock = threading.Lock()

    def get(self, bucket: str, key: str, max_bytes: int | None = None) -> bytes:
        with self._lock:
            self.reads += 1
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        try:
            if key.startswith("gone/"):
                raise MissingObject(key)
            if key.startswith("stall/"):
                self.release.wait(30)
            time.sleep(self.delay_s)
            return PNG
        finally:
            with self._lock:
                self.open -= 1


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture()
def source():
    store = GatedStore()
    live = LiveSource(Settings(), store=store, connection=object())
    yield live, store
    store.release.set()
    live.close()


def test_reads_queued_for_a_stalled_store_stay_bounded_and_a_click_does_not_wait_behind_them(source):
    live, store = source
    for refresh in range(10):  # ten refreshes, each with twelve new frames, while the store stalls
        started = time.monotonic()
        answer = live.images([("b", f"stall/{refresh}-{i}") for i in range(12)], wait_s=0.2)
        assert answer == {} and time.monotonic() - started < 1.0
        assert len(live._loading) <= 24  # two galleries' worth, however long the store stalls
    assert store.most_open == IMAGE_READS
    started = time.monotonic()
    image = live._image(("b", "click/frame"))  # what a click on a frame reads
    assert image is not None and time.monotonic() - started < 1.0
    store.release.set()
    wait_for(lambda: not any(not read.future.done() for read in live._loading.values()))
    assert store.reads <= 24 + 1  # the queue itself held no more than the bound: 24 reads and the click


def test_a_refresh_waits_only_for_the_reads_it_started(source):
    live, _ = source
    refs = [("b", f"stall/{i}") for i in range(12)]
    started = time.monotonic()
    assert live.images(refs, wait_s=1.0) == {}
    assert time.monotonic() - started >= 1.0
    started = time.monotonic()
    assert live.images(refs, wait_s=1.0) == {}  # the same frames, still loading: late already, not waited for
    assert time.monotonic() - started < 0.3


def test_queued_reads_of_frames_no_refresh_asks_for_any_more_are_dropped():
    store = GatedStore()
    live = LiveSource(Settings(dashboard_refresh_s=0.1), store=store, connection=object())
    try:
        live.images([("b", f"stall/old-{i}") for i in range(12)], wait_s=0)  # 4 running, 8 queued
        time.sleep(0.5)  # more than three refresh periods
        live.images([("b", f"stall/new-{i}") for i in range(12)], wait_s=0)
        store.release.set()
        wait_for(lambda: not any(not read.future.done() for read in live._loading.values()))
        assert store.reads == IMAGE_READS + 12  # the old frames' queued reads never ran
    finally:
        store.release.set()
        live.close()


def test_one_decode_at_a_time_clicks_included(source, monkeypatch):
    from steelsight.dashboard import data

    live, _ = source
    running, most = [0], [0]
    lock = threading.Lock()
    decode = data.decode_rgb

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.05)
            return decode(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(data, "decode_rgb", counted)
    clicks = [threading.Thread(target=live._image, args=(("b", f"click/{i}"),)) for i in range(2)]
    for click in clicks:
        click.start()
    shown = live.images([("b", f"ok/{i}") for i in range(8)], wait_s=10)
    for click in clicks:
        click.join()
    assert len(shown) == 8 and all(image is not None for image in shown.values())
    assert most[0] == 1


def test_a_read_finished_for_one_tab_is_not_taken_from_it_by_another():
    store = GatedStore()
    live = LiveSource(Settings(dashboard_cache_bytes=0), store=store, connection=object())  # no cache to fall back on
    try:
        answers = {}
        tab_a = threading.Thread(target=lambda: answers.update(live.images([("b", "ok/x"), ("b", "stall/y")], 1.0)))
        tab_a.start()
        time.sleep(0.3)  # tab A waits on its reads; x is done by now
        live.images([("b", "ok/z")], wait_s=0.5)  # tab B: x is not among its frames
        tab_a.join()
        assert answers.get(("b", "ok/x")) is not None
    finally:
        store.release.set()
        live.close()


def test_a_closed_source_answers_nothing_and_reads_nothing(source):
    live, store = source
    live.close()
    assert live.images([("b", "ok/x")], wait_s=0.1) == {} and store.reads == 0


def test_a_late_read_is_shown_by_a_later_refresh_even_when_the_cache_cannot_hold_it():
    store = GatedStore(delay_s=0.3)
    live = LiveSource(Settings(dashboard_cache_bytes=0), store=store, connection=object())
    try:
        ref = ("b", "slow/frame")
        assert live.images([ref], wait_s=0.05) == {}
        wait_for(lambda: live._loading[ref].future.done())
        shown = live.images([ref], wait_s=0.05)
        assert shown[ref] is not None and shown[ref].shape[:2] == (40, 40)
        assert store.reads == 1  # handed over from the finished read, not read again
    finally:
        live.close()


def test_a_missing_object_is_remembered_and_duplicates_are_read_once(source):
    live, store = source
    refs = [("b", "gone/frame"), ("b", "ok/frame"), ("b", "ok/frame")]
    first = live.images(refs, wait_s=5)
    assert first[("b", "gone/frame")] is None and first[("b", "ok/frame")] is not None
    assert live.images(refs, wait_s=5) == first and store.reads == 2


def test_close_drops_the_reads_still_queued(source):
    live, store = source
    live.images([("b", f"stall/{i}") for i in range(20)], wait_s=0)
    live.close()
    store.release.set()
    time.sleep(0.5)
    assert store.reads == IMAGE_READS  # only those already running were read
