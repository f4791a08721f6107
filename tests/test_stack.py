"""`steelsight up` headless with a bounded frame count, then Ctrl-C leaves nothing behind."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

from steelsight.contract import Settings
from steelsight.devstack import free_port, wait_until

from .helpers import records


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_runs_the_stack_and_ctrl_c_stops_it(tmp_path, pipeline_checkpoint):
    offset = free_port() % 1000 + 30000 - 7860  # a free-ish range away from the defaults
    frames = 6
    env_checkpoint = {"STEELSIGHT_CHECKPOINT": str(pipeline_checkpoint), "STEELSIGHT_DEVICE": "cpu",
                      "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin:/usr/local/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "steelsight.cli", "up", "--data", str(tmp_path / "stack"),
                             "--frames", str(frames), "--fps", "20", "--port-offset", str(offset)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_checkpoint)
    lines = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "steelsight up exited early:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("ready"):
                break
        output = "".join(lines)
        assert "NON-PERSISTENT" in output and "dashboard  http://127.0.0.1:" in output
        settings = Settings(redis_url=f"redis://127.0.0.1:{16379 + offset}/0")
        from steelsight.clients import redis_client

        conn = redis_client(settings)
        wait_until(lambda: len(records(settings, conn)) == frames, 180, f"{frames} results")
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, rest
    assert "stopped:" in rest
    ports = [16379, 19000, 7860, 9100, 9110, 9102, 9103]
    assert not [p + offset for p in ports if port_open(p + offset)]
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert leftovers == []
