"""The producer's metrics listen on the configured host only, not on every interface, and say when its
camera last sent a frame."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import time
import urllib.request
from pathlib import Path

from steelsight.devstack import free_port, wait_until

from ..helpers import SAMPLES, ChildProcess


def listening(port: int) -> set[str]:
    """Local addresses of the IPv4 sockets listening on ``port``, from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return found


def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def last_frame(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        (value,) = re.findall(r'^steelsight_producer_last_frame_timestamp_seconds'
                              r'\{camera="cam-1",line="line-m"\} (\S+)$', r.read().decode(), re.M)
    return float(value)


def test_producer_metrics_bind_the_configured_host_only(settings, tmp_path):
    settings = settings.model_copy(update={"metrics_host": "127.0.0.1"})
    port = free_port()
    folder = tmp_path / "camera"
    folder.mkdir()
    proc = ChildProcess(settings, tmp_path, "producer-metrics",
                        ["produce", "--watch", "--source", str(folder), "--line", "line-m", "--camera", "cam-1",
                         "--metrics-port", str(port)])
    try:
        wait_until(lambda: listening(port) or proc.proc.poll() is not None, 60, "the metrics server")
        assert proc.proc.poll() is None, proc.output()[-2000:]
        assert listening(port) == {"127.0.0.1"}
        assert not reachable("127.0.0.2", port)  # another loopback address: refused when bound to one host
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert b"steelsight_producer_frames_total" in r.read()
        # CameraSilent's input: set at start (a camera silent across a restart still shows), then on each frame
        started = last_frame(port)
        assert time.time() - 60 < started <= time.time()
        time.sleep(0.05)
        shutil.copy(next(SAMPLES.rglob("*.bmp")), folder / "frame-1.bmp")
        wait_until(lambda: last_frame(port) > started, 20, "the camera's last-frame time to move")
    finally:
        proc.kill(signal.SIGTERM)
