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


def test_a_late_read_is_shown_by_a_later_refresh_even_when_the_cache_cannot_hold_it():
    store = GatedStore(delay_s=0.3)
    live = LiveSource(Settings(dashboard_cache_bytes=0), store=store, connection=object())
    try:
        ref = ("b", "slow/frame")
        assert live.images([ref], wait_s=0.05) == {}
        time.sleep(0.5)
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
