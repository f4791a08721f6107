"""Watch a folder for frames a camera writes, and send each complete file once, across restarts.

* **Durable**: what was sent is kept in a small SQLite file, so frames that arrive while
  the producer is down are sent when it starts again, and nothing is sent twice.
  A row is written only after its frame is enqueued; a crash in between re-sends the
  frame, which the producer recognises as a duplicate by its id.
* **Complete files only**: a file is sent when its size and mtime have stopped changing,
  no process has it open for writing (a Linux read lease, where the OS grants one), and
  its format's end marker is there (PNG, JPEG, GIF end markers; BMP and WebP sizes in
  the header). Formats without a marker (TIFF, PGM) also wait ``settle_s`` of quiet.
  Temporary names (dotfiles, ``~`` names, ``*.tmp``, ``*.part``) are never sent: write
  under one and rename.
* **One bad file stops nothing**: a file that cannot be read (another uid's, moved away)
  is counted ``unreadable``, read again ``UNREADABLE_TRIES`` times with growing waits,
  then left alone until it changes; the files after it go on.
* **Cheap and bounded**: only folders whose mtime changed are listed again, and only
  files not yet complete are stat'ed each poll; the whole tree is walked every
  ``rescan_s`` as a safety net and to forget files that were deleted. Memory and the
  state file hold the files now in the folder, not every file ever seen.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from steelsight.contract import safe_frame_id

from .service import FrameFile, is_frame_name

log = logging.getLogger("steelsight.producer")

POLL_S = 0.5
SETTLE_S = 2.0  # quiet time for a file no end marker or lease can vouch for
INCOMPLETE_WAIT_S = 30.0  # a file whose end marker never comes is sent after this much quiet (the worker says why)
RESCAN_S = 30.0
UNREADABLE_TRIES = 5  # reads of a file that fails them, before it is left alone until it changes
UNREADABLE_RETRY_S = 1.0  # first wait before reading it again, doubling each time (1+2+4+8 s)
RACY_S = 2.0  # a folder listed this soon after its mtime may get an entry in the same timestamp tick
MIN_QUIET_S = 0.25  # even a file with its end marker is seen unchanged twice, this far apart


def state_path(source: Path, line_id: str, camera_id: str) -> Path:
    """Default state file: beside the frames, in a dot-folder the watcher skips."""
    return source / ".steelsight" / f"sent-{line_id}__{camera_id}.sqlite"


class SentLog:
    """Files sent (path under the folder, mtime_ns, size), on disk."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit: each row is on disk once written
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS sent (path TEXT PRIMARY KEY, mtime_ns INTEGER, size INTEGER)")

    def load(self) -> dict[str, tuple[int, int]]:
        return {p: (m, s) for p, m, s in self.db.execute("SELECT path, mtime_ns, size FROM sent")}

    def add(self, path: str, mtime_ns: int, size: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO sent VALUES (?, ?, ?)", (path, mtime_ns, size))

    def remove(self, paths: list[str]) -> None:
        self.db.executemany("DELETE FROM sent WHERE path = ?", [(p,) for p in paths])

    def close(self) -> None:
        self.db.close()


def open_for_writing(path: Path) -> bool | None:
    """Whether any local process has ``path`` open for writing; None when the OS cannot tell us.

    A read lease is granted only when no one holds the file open for writing. It needs
    the file to be ours (or CAP_LEASE) and a local filesystem; elsewhere this says None.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    except OSError as exc:
        return True if exc.errno == errno.EAGAIN else None
    finally:
        os.close(fd)


def has_end(path: Path, size: int) -> bool | None:
    """Whether the format's own end marker or declared size is there; None for formats without one."""
    ext = path.suffix.lower().lstrip(".")
    if ext not in {"png", "jpg", "jpeg", "gif", "bmp", "webp"}:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            f.seek(max(0, size - 32))
            tail = f.read(32)
    except OSError:
        return None  # unreadable here: the producer's read says why, and retries it
    if ext == "png":
        return tail.endswith(b"IEND\xaeB`\x82")
    if ext in ("jpg", "jpeg"):
        return b"\xff\xd9" in tail  # EOI; some cameras pad after it
    if ext == "gif":
        return tail.endswith(b";")
    if ext == "bmp":
        declared = int.from_bytes(head[2:6], "little") if head[:2] == b"BM" else 0
        return None if declared == 0 else declared == size  # 0: the writer left the field out
    declared = int.from_bytes(head[4:8], "little") + 8 if head[:4] == b"RIFF" else 0
    return declared == size


@dataclass
class Pending:
    mtime_ns: int
    size: int
    quiet_since: float  # monotonic time its size and mtime were last seen to change
    tries: int = 0  # failed reads of this version of the file
    retry_at: float = 0.0  # monotonic time before which it is not offered again


class FolderWatcher:
    def __init__(self, folder: Path, sent: SentLog, settle_s: float = SETTLE_S,
                 incomplete_wait_s: float = INCOMPLETE_WAIT_S, rescan_s: float = RESCAN_S):
        self.folder, self.log = folder, sent
        self.settle_s, self.incomplete_wait_s, self.rescan_s = settle_s, incomplete_wait_s, rescan_s
        self.sent = sent.load()
        self.pending: dict[str, Pending] = {}
        self.dirs: dict[str, tuple[int, float]] = {}  # folder under root -> (mtime_ns when listed, listed at)
        self.rescanned = float("-inf")

    def _rel(self, path: str) -> str:
        return Path(path).relative_to(self.folder).as_posix()

    def _consider(self, rel: str, st: os.stat_result, now: float) -> None:
        if self.sent.get(rel) == (st.st_mtime_ns, st.st_size):
            return
        old = self.pending.get(rel)
        if old is None or (old.mtime_ns, old.size) != (st.st_mtime_ns, st.st_size):
            self.pending[rel] = Pending(st.st_mtime_ns, st.st_size, now)

    def _list(self, rel_dir: str, now: float, recursive: bool, present: set[str] | None = None) -> None:
        """List one folder: new files become pending, new sub-folders are listed too."""
        path = self.folder / rel_dir if rel_dir else self.folder
        try:
            mtime_ns = os.stat(path).st_mtime_ns
            entries = list(os.scandir(path))
        except FileNotFoundError:
            self.dirs.pop(rel_dir, None)
            return
        self.dirs[rel_dir] = (mtime_ns, time.time())
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive or rel not in self.dirs:
                        self._list(rel, now, recursive, present)
                elif is_frame_name(entry.name) and entry.is_file():
                    if present is not None:
                        present.add(rel)
                    if present is not None or (rel not in self.sent and rel not in self.pending):
                        self._consider(rel, entry.stat(), now)
            except FileNotFoundError:
                continue

    def _scan(self, now: float) -> None:
        if now - self.rescanned >= self.rescan_s:
            present: set[str] = set()
            self.dirs.clear()
            self._list("", now, recursive=True, present=present)
            gone = [rel for rel in self.sent if rel not in present]
            if gone:
                self.log.remove(gone)
                for rel in gone:
                    del self.sent[rel]
            for rel in [rel for rel in self.pending if rel not in present]:
                del self.pending[rel]
            self.rescanned = now
            return
        for rel_dir, (mtime_ns, listed_at) in list(self.dirs.items()):
            try:
                current = os.stat(self.folder / rel_dir if rel_dir else self.folder).st_mtime_ns
            except FileNotFoundError:
                self.dirs.pop(rel_dir, None)
                continue
            if current != mtime_ns or listed_at - current / 1e9 < RACY_S:
                self._list(rel_dir, now, recursive=False)

    def ready(self) -> list[tuple[str, int, int]]:
        """One poll: (path under the folder, mtime_ns, size) of each file now complete, oldest first."""
        now = time.monotonic()
        self._scan(now)
        done = []
        for rel, p in list(self.pending.items()):
            path = self.folder / rel
            if now < p.retry_at:
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                del self.pending[rel]  # renamed or deleted before it settled
                continue
            except OSError:
                continue  # not ours to see now; the rescan keeps or forgets it
            if (st.st_mtime_ns, st.st_size) != (p.mtime_ns, p.size):
                self.pending[rel] = Pending(st.st_mtime_ns, st.st_size, now)
                continue
            quiet = now - p.quiet_since
            if quiet < MIN_QUIET_S or st.st_size == 0 or open_for_writing(path):
                continue
            end = has_end(path, st.st_size)
            if end is None and quiet < self.settle_s:
                continue
            if end is False:
                if quiet < self.incomplete_wait_s:
                    continue
                log.warning("%s: no end marker after %.0f s without change; sending it as it is", rel, quiet)
            done.append((rel, st.st_mtime_ns, st.st_size))
        done.sort(key=lambda d: (d[1], d[0]))
        return done

    def mark_unreadable(self, rel: str, mtime_ns: int, size: int) -> None:
        """A read failed: offer the file again later, a bounded number of times, then leave it until it changes."""
        p = self.pending.get(rel)
        if p is None or (p.mtime_ns, p.size) != (mtime_ns, size):
            return  # gone or changed meanwhile: it is new again
        p.tries += 1
        if p.tries >= UNREADABLE_TRIES:
            log.error("%s: unreadable %d times: left alone until it changes", rel, p.tries)
            self.mark_sent(rel, mtime_ns, size)
        else:
            p.retry_at = time.monotonic() + UNREADABLE_RETRY_S * 2 ** (p.tries - 1)

    def mark_sent(self, rel: str, mtime_ns: int, size: int) -> None:
        self.log.add(rel, mtime_ns, size)
        self.sent[rel] = (mtime_ns, size)
        self.pending.pop(rel, None)


@dataclass(frozen=True)
class WatchedFile(FrameFile):
    rel: str = ""
    mtime_ns: int = 0
    size: int = 0


def watch(folder: Path, state: Path, poll_s: float = POLL_S, limit: int | None = None, settle_s: float = SETTLE_S,
          incomplete_wait_s: float = INCOMPLETE_WAIT_S, rescan_s: float = RESCAN_S,
          on_idle: Callable[[], object] | None = None,
          stop: Callable[[], bool] | None = None) -> tuple[Iterator[WatchedFile], Callable[[FrameFile, str], None]]:
    """Frames as they become complete, and the callback that records one as sent.

    Pass the callback to :func:`~producer.service.run_producer` as ``on_sent``; a frame
    is recorded only once the producer has enqueued it (or refused it for good).
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    watcher = FolderWatcher(folder, SentLog(state), settle_s, incomplete_wait_s, rescan_s)
    log.info("watching %s (%d files already sent, state in %s)", folder, len(watcher.sent), state)

    def frames() -> Iterator[WatchedFile]:
        n = 0
        try:
            while (limit is None or n < limit) and not (stop and stop()):
                for rel, mtime_ns, size in watcher.ready():
                    at = datetime.fromtimestamp(mtime_ns / 1e9, UTC)
                    yield WatchedFile(folder / rel, safe_frame_id(rel, at), at, rel, mtime_ns, size)
                    n += 1
                    if limit is not None and n >= limit:
                        return
                if on_idle:
                    on_idle()
                time.sleep(poll_s)
        finally:
            watcher.log.close()

    def on_sent(item: FrameFile, outcome: str) -> None:
        if isinstance(item, WatchedFile):
            if outcome == "unreadable":
                watcher.mark_unreadable(item.rel, item.mtime_ns, item.size)
            else:
                watcher.mark_sent(item.rel, item.mtime_ns, item.size)

    return frames(), on_sent
