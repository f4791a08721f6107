"""A test that SIGALRM cannot stop ends the run within seconds, naming the test and its stack."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# a test stuck where SIGALRM cannot end it, as an in-process RQ worker's job timeout leaves the signal
STUCK_IN_CALL = '''
import signal, time
import pytest

@pytest.mark.timeout(1)
def test_stuck():
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    while True:
        time.sleep(0.1)

def test_after_it_in_the_same_file():
    pass
'''

# it fails first (pytest cancels faulthandler's timer then), and then its fixture hangs in teardown
STUCK_IN_TEARDOWN = '''
import signal, time
import pytest

@pytest.fixture
def server():
    yield
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    while True:
        time.sleep(0.1)

@pytest.mark.timeout(1)
def test_stuck(server):
    assert False, "fails before its teardown hangs"
'''

# a failed subtest makes pytest cancel the timer inside the call phase; then the test hangs
STUCK_AFTER_A_FAILED_SUBTEST = '''
import signal, time
import pytest

@pytest.mark.timeout(1)
def test_stuck(subtests):
    with subtests.test("fails"):
        assert False
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    while True:
        time.sleep(0.1)
'''

FINE = '''
import time

def test_one():
    time.sleep(2)

def test_two():
    pass
'''


def nested_run(tmp_path: Path, stuck: str, xdist: bool) -> tuple[subprocess.CompletedProcess, float]:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.watchdog"]\n')
    (tmp_path / "test_stuck.py").write_text(textwrap.dedent(stuck))
    (tmp_path / "test_fine.py").write_text(textwrap.dedent(FINE))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "STEELSIGHT_"))}
    env |= {"PYTHONPATH": str(REPO), "STEELSIGHT_TEST_ARTIFACTS": str(tmp_path / "artifacts")}
    # make test's flags; -p no:cacheprovider keeps the repo's cache out of it
    flags = ["-n", "2", "--dist", "loadfile", "--max-worker-restart=0"] if xdist else ["-p", "no:xdist"]
    began = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *flags, "-o",
                          "timeout_method=signal", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    return run, time.monotonic() - began


@pytest.mark.parametrize(("stuck", "phase", "line"), [(STUCK_IN_CALL, "call", 9), (STUCK_IN_TEARDOWN, "teardown", 10)],
                         ids=["call", "teardown-after-a-failure"])
def test_a_hung_xdist_worker_fails_the_run_with_its_stack_in_the_summary(tmp_path, stuck, phase, line):
    run, took = nested_run(tmp_path, stuck, xdist=True)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert took < 60, f"the run took {took:.0f} s"  # the watchdog fires at most 1 + 5 s into each phase
    summary = run.stdout.split("short test summary info")[0].rsplit("slowest", 1)[-1]
    assert f"test_stuck.py::test_stuck ({phase}) was running when this worker ended" in summary, out
    assert f"line {line} in " in summary and "Timeout (0:00:" in summary, out
    assert "2 passed" in out, out  # the other worker ran the other file


@pytest.mark.parametrize(("stuck", "line"), [(STUCK_IN_CALL, 9), (STUCK_AFTER_A_FAILED_SUBTEST, 11)],
                         ids=["call", "after-a-failed-subtest"])
def test_a_hung_test_in_a_plain_run_prints_its_stack_and_ends_the_run(tmp_path, stuck, line):
    run, took = nested_run(tmp_path, stuck, xdist=False)
    assert run.returncode != 0 and took < 60, (took, run.stdout + run.stderr)
    assert "Timeout (0:00:0" in run.stderr and f"line {line} in test_stuck" in run.stderr, run.stderr
