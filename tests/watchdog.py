"""A hung test ends its xdist worker, and its stacks reach the end of the run's output.

pytest-timeout's SIGALRM fails a hung test in place, but not one stuck in C code, nor one
whose in-process RQ worker took SIGALRM for its own job timeout. For those, each test arms
``faulthandler`` to write every thread's stack to a file and exit the worker a little after
the test's timeout (a tenth of it, at least 5 s). The controller names the test when the
worker goes down and prints the stacks in the summary, where a CI log's tail shows them.
"""

from __future__ import annotations

import faulthandler
import os
from pathlib import Path

import pytest

from tests.helpers import ARTIFACTS

DUMPS = ARTIFACTS / "hung-tests"


def dump_path(worker: str) -> Path:
    return DUMPS / f"{worker}.txt"


def grace_s(timeout: float) -> float:
    """How long past the test's own timeout the watchdog waits: pytest-timeout gets the first go."""
    return max(5.0, timeout / 10)


def limit_s(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker and marker.args:
        return float(marker.args[0])
    return float(item.config.getini("timeout") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    timeout = limit_s(item)
    if not timeout:
        yield
        return
    path = dump_path(os.environ.get("PYTEST_XDIST_WORKER", "main"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(f"{item.nodeid} was running when this worker ended\n")  # faulthandler adds the stacks
        fh.flush()
        faulthandler.dump_traceback_later(timeout + grace_s(timeout), exit=True, file=fh)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()
    path.unlink(missing_ok=True)  # it finished: nothing to report


def report(config, worker: str, whole: bool) -> None:
    path = dump_path(worker)
    if path.exists():
        text = path.read_text(errors="replace")
        config.get_terminal_writer().line(f"\n[{worker}] " + (text if whole else text.splitlines()[0]), red=True)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist's controller: a worker went down; if a test was running, name it now (its stacks: in the summary)."""
    if error:
        report(node.config, node.gateway.id, whole=False)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if DUMPS.is_dir():
        for path in sorted(DUMPS.glob("*.txt")):
            report(config, path.stem, whole=True)


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput") and DUMPS.is_dir():  # the controller, once: an earlier run's
        for path in DUMPS.glob("*.txt"):
            path.unlink()
