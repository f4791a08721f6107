"""Helpers for tests that run steelsight processes against real services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from steelsight.contract import Settings

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"
ARTIFACTS = Path(os.environ.get("STEELSIGHT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))


class ChildProcess:
    """``python -m steelsight.cli ARGS`` with the settings in its environment, logging to a file."""

    def __init__(self, settings: Settings, tmp: Path, name: str, args: list[str]):
        self.log_path = tmp / f"{name}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in kill()
        env = dict(os.environ) | settings.to_env() | {"OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "steelsight.cli", *args], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class WorkerProcess(ChildProcess):
    def __init__(self, settings: Settings, tmp: Path, name: str, burst: bool = False):
        super().__init__(settings, tmp, name, ["worker", "--name", name, *(["--burst"] if burst else [])])


def records(settings: Settings, conn) -> dict[str, dict]:
    keys = conn.keys(f"{settings.key_prefix}:result:*")
    return {k.decode().rsplit(":", 1)[1]: json.loads(conn.get(k)) for k in keys}
