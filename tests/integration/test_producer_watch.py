"""`steelsight produce --watch`: every complete frame sent once, across restarts, never half-written."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from steelsight.clients import ObjectStore, redis_client
from steelsight.devstack import wait_until
from steelsight.producer import watch as watch_module
from steelsight.producer.watch import FolderWatcher, SentLog

from .. import corpus
from ..helpers import ChildProcess, WorkerProcess, records


def frame_bytes(seed: int, fmt: str = "PNG", side: int = 64) -> bytes:
    """A real image, incompressible (so that half of it is not a valid file)."""
    return corpus.encode(corpus.Image.fromarray(corpus.np.random.default_rng(seed).integers(
        0, 256, (side, side), dtype=corpus.np.uint8)), fmt)


def drop(folder: Path, name: str, data: bytes) -> None:
    """As a camera should: write under a temporary name, then rename."""
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(data)
    tmp.rename(folder / name)


def producer(settings, tmp_path: Path, folder: Path, name: str) -> ChildProcess:
    """``produce --watch``, returned once it is watching (it creates the buckets just before)."""
    proc = ChildProcess(settings, tmp_path, name, ["produce", "--watch", "--source", str(folder),
                                                   "--line", "line-w", "--camera", "cam-1"])
    store = ObjectStore(settings)
    wait_until(lambda: store.client.bucket_exists(settings.overlays_bucket), 60, f"{name} to start")
    time.sleep(0.5)
    return proc


def logged(proc: ChildProcess, outcome: str) -> int:
    return len(re.findall(rf"INFO {outcome} ", proc.output()))


def run_burst_worker(settings, tmp_path: Path) -> None:
    worker = WorkerProcess(settings, tmp_path, "watch-worker", burst=True)
    try:
        worker.proc.wait(timeout=180)
    finally:
        worker.kill(signal.SIGTERM)


def test_watch_sends_every_frame_once_across_a_restart(settings, tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    conn = redis_client(settings)
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    drop(folder, "before-start.png", frame_bytes(0))  # there before the producer ever ran
    first = producer(settings, tmp_path, folder, "watch-1")
    try:
        for i in range(1, 3):
            drop(folder, f"f{i}.png", frame_bytes(i))
        (folder / ".hidden.png").write_bytes(frame_bytes(90))  # temporary names are never sent
        (folder / "partial.png.part").write_bytes(frame_bytes(91)[:100])
        wait_until(lambda: queue.count == 3, 60, "the first 3 frames")
        time.sleep(1.0)
    finally:
        first.kill(signal.SIGKILL)
    # frames arriving while the producer is down, one in a new sub-folder
    for i in range(3, 5):
        drop(folder, f"f{i}.png", frame_bytes(i))
    (folder / "day2").mkdir()
    drop(folder / "day2", "f1.png", frame_bytes(100))  # an old name in another folder: another frame
    second = producer(settings, tmp_path, folder, "watch-2")
    try:
        for i in range(5, 7):
            drop(folder, f"f{i}.png", frame_bytes(i))
        wait_until(lambda: queue.count == 8, 60, "8 frames")
        time.sleep(2.0)  # nothing else comes
        assert queue.count == 8
    finally:
        second.kill(signal.SIGTERM)
    # each frame enqueued exactly once over both runs: the state file said what was sent
    assert logged(first, "enqueued") + logged(second, "enqueued") == 8, second.output()[-3000:]
    assert logged(first, "duplicate") + logged(second, "duplicate") == 0

    run_burst_worker(settings, tmp_path)
    results = records(settings, conn)
    assert len(results) == 8 and all(r["status"] == "ok" for r in results.values()), results
    assert conn.xlen(settings.results_stream) == 8
    names = {Path(r["frame_key"]).name.split("-")[0] for r in results.values()}
    assert names == {"before", "f1", "f2", "f3", "f4", "f5", "f6"}


def slow_write(path: Path, data: bytes, pieces: int, pause_s: float, keep_open: bool) -> None:
    step = -(-len(data) // pieces)
    f = open(path, "wb") if keep_open else None  # noqa: SIM115 - closed below
    try:
        for i in range(pieces):
            chunk = data[i * step:(i + 1) * step]
            if f is not None:
                f.write(chunk)
                f.flush()
            else:
                with open(path, "ab") as g:
                    g.write(chunk)
            time.sleep(pause_s)
    finally:
        if f is not None:
            f.close()


def test_watch_waits_for_slowly_written_files(settings, tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    conn = redis_client(settings)
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    png, tif = frame_bytes(1, "PNG", 160), frame_bytes(2, "TIFF", 160)
    proc = producer(settings, tmp_path, folder, "watch-slow")
    try:
        # a PNG appended in pieces, the file closed between them, pausing longer than the old 0.5 s check
        # (only its end marker tells it is unfinished); a TIFF held open by its writer, pausing longer than
        # the 2 s settle time (only the open file tells)
        writers = [threading.Thread(target=slow_write, args=(folder / "slow-png.png", png, 4, 1.2, False)),
                   threading.Thread(target=slow_write, args=(folder / "slow-tif.tif", tif, 3, 2.5, True))]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        wait_until(lambda: queue.count == 2, 30, "both frames")
        time.sleep(1.5)
    finally:
        proc.kill(signal.SIGTERM)
    assert logged(proc, "enqueued") == 2, proc.output()[-3000:]
    run_burst_worker(settings, tmp_path)
    results = records(settings, conn)
    assert sorted(r["status"] for r in results.values()) == ["ok", "ok"], results
    assert conn.xlen(settings.results_stream) == 2


def test_watcher_polls_cheaply_and_forgets_deleted_files(tmp_path, monkeypatch):
    folder = tmp_path / "camera"
    (folder / "a" / "b").mkdir(parents=True)
    paths = [folder / "x.png", folder / "a" / "y.png", folder / "a" / "b" / "z.png"]
    for i, path in enumerate(paths):
        path.write_bytes(frame_bytes(i))
        old = time.time() - 60  # folders quiet for a minute: past the racy window
        os.utime(path, (old, old))
    for d in (folder / "a" / "b", folder / "a", folder):
        os.utime(d, (old, old))
    state = SentLog(tmp_path / "state.sqlite")
    watcher = FolderWatcher(folder, state, settle_s=0.0, rescan_s=3600)
    watcher.ready()  # first poll: a full walk finds all three
    time.sleep(0.3)
    ready = watcher.ready()
    assert sorted(rel for rel, _, _ in ready) == ["a/b/z.png", "a/y.png", "x.png"]
    for item in ready:
        watcher.mark_sent(*item)

    listings = []
    real_scandir = os.scandir
    monkeypatch.setattr(watch_module.os, "scandir", lambda p: listings.append(p) or real_scandir(p))
    for _ in range(20):
        assert watcher.ready() == []
    assert listings == []  # no folder changed: nothing listed, no file stat'ed
    (folder / "a" / "new.png").write_bytes(frame_bytes(7))
    watcher.ready()
    assert listings == [folder / "a"]  # only the folder that changed
    time.sleep(0.3)
    assert [rel for rel, _, _ in watcher.ready()] == ["a/new.png"]

    # deleted files leave memory and the state file at the next full walk
    for path in paths:
        path.unlink()
    watcher.rescan_s = 0
    watcher.ready()
    assert set(watcher.sent) == set() and SentLog(tmp_path / "state.sqlite").load() == {}
    assert set(watcher.pending) == {"a/new.png"}


# sysfs attributes without a read method refuse every open for reading with EACCES, root included
WRITE_ONLY = [Path("/sys/bus/pci/rescan"), Path("/sys/bus/pci/drivers_probe"), Path("/sys/kernel/mm/ksm/run")]


def unreadable_target() -> Path | None:
    for path in WRITE_ONLY:
        try:
            path.read_bytes()
        except PermissionError:
            return path
        except OSError:
            continue
    return None


def test_watch_goes_on_past_an_unreadable_file(settings, tmp_path):
    target = unreadable_target()
    if target is None:
        pytest.skip("no file here that even root cannot read")
    folder = tmp_path / "camera"
    folder.mkdir()
    conn = redis_client(settings)
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    # as a camera writing as another uid: a complete-looking file this process may not read, oldest of all
    (folder / "a-denied.png").symlink_to(target)
    drop(folder, "f0.png", frame_bytes(0))
    proc = producer(settings, tmp_path, folder, "watch-denied")
    try:
        for i in range(1, 4):
            drop(folder, f"f{i}.png", frame_bytes(i))
        wait_until(lambda: queue.count == 4 or proc.proc.poll() is not None, 60, "4 frames")
        time.sleep(3.0)  # a few retries of the unreadable file
        assert proc.proc.poll() is None, proc.output()[-3000:]
    finally:
        proc.kill(signal.SIGTERM)
    out = proc.output()
    assert queue.count == 4 and logged(proc, "enqueued") == 4, out[-3000:]
    assert 1 <= len(re.findall(r"a-denied\.png.*Permission denied", out)) <= watch_module.UNREADABLE_TRIES, out
    run_burst_worker(settings, tmp_path)
    results = records(settings, conn)
    assert len(results) == 4 and all(r["status"] == "ok" for r in results.values()), results


def test_a_file_gone_between_ready_and_read_is_skipped_and_the_rest_sent(settings, tmp_path):
    from steelsight.producer.service import Producer, run_producer

    folder = tmp_path / "camera"
    folder.mkdir()
    for i in range(4):
        drop(folder, f"f{i}.png", frame_bytes(i))
    frames, on_sent = watch_module.watch(folder, tmp_path / "state.sqlite", poll_s=0.1, limit=4)

    def moved_away(items):
        for item in items:
            if item.path.name == "f1.png":
                item.path.rename(tmp_path / "elsewhere.png")  # after the watcher found it complete
            yield item

    counts = run_producer(Producer(settings, "line-w", "cam-1"), moved_away(frames), on_sent=on_sent)
    assert counts == {"enqueued": 3, "unreadable": 1}
    conn = redis_client(settings)
    assert Queue(settings.queue_name, connection=conn, serializer=JSONSerializer).count == 3
