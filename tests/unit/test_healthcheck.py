"""The images' HEALTHCHECK fails on a hung work loop: it asks /healthz, which /metrics never tells."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steelsight.devstack import free_port
from steelsight.worker.health import Liveness, serve

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def probe(dockerfile: str) -> list[str]:
    text = (DEPLOY / dockerfile).read_text()
    match = re.search(r"HEALTHCHECK [^\n]*\\\n\s*CMD (\[.*\])", text)
    assert match, f"no exec-form HEALTHCHECK in {dockerfile}"
    return json.loads(match.group(1))


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_image_healthcheck_fails_on_a_hung_work_loop(dockerfile):
    cmd = probe(dockerfile)
    assert cmd[0] == "python"
    port = free_port()
    liveness = Liveness(stale_after_s=0.5)
    server = serve("127.0.0.1", port, liveness)
    try:
        env = dict(os.environ) | {"STEELSIGHT_METRICS_PORT": str(port)}

        def healthy() -> bool:
            return subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30).returncode == 0

        liveness.beat()
        assert healthy()  # a beating loop
        time.sleep(1.0)  # the loop stopped beating; /metrics still answers 200
        assert not healthy()
    finally:
        server.shutdown()
