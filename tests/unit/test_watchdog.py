"""A test that SIGALRM cannot stop ends the run within seconds, naming the test and its stack."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

STUCK = '''
import signal, time
import pytest

@pytest.mark.timeout(1)
def test_stuck_where_sigalrm_cannot_reach():
    signal.signal(signal.SIGALRM, signal.SIG_IGN)  # as an in-process RQ worker's job timeout leaves it
    while True:
        time.sleep(0.1)

def test_after_it_in_the_same_file():
    pass
'''

FINE = '''
import time

def test_one():
    time.sleep(2)

def test_two():
    pass
'''


def test_a_hung_worker_fails_the_run_with_its_stack_instead_of_stalling_it(tmp_path):
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.watchdog"]\n')
    (tmp_path / "test_stuck.py").write_text(textwrap.dedent(STUCK))
    (tmp_path / "test_fine.py").write_text(textwrap.dedent(FINE))
    (tmp_path / "test_more.py").write_text("def test_three():\n    pass\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), STEELSIGHT_TEST_ARTIFACTS=str(tmp_path / "artifacts"))
    began = time.monotonic()
    # the flags make test uses; -p no:cacheprovider keeps the repo's cache out of it
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile",
                          "--max-worker-restart=0", "-o", "timeout_method=signal", str(tmp_path)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - began
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert took < 60, f"the run took {took:.0f} s"  # the watchdog fires 1 + 5 s into the stuck test
    assert "test_stuck.py::test_stuck_where_sigalrm_cannot_reach was running when this worker ended" in out, out
    assert "Timeout (0:00:06)!" in out and "line 9 in test_stuck_where_sigalrm_cannot_reach" in out, out
    assert "3 passed" in out, out  # the other worker ran every other file
