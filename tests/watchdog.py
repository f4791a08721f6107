"""A hung test ends its process, and its stacks reach the end of the run's output.

pytest-timeout's SIGALRM fails a hung test in place, but not one stuck in C code, nor one
whose in-process RQ worker took SIGALRM for its own job timeout. For those, each phase of
a test (setup, call, teardown) arms ``faulthandler`` to write every thread's stack and
exit the process a little after the test's timeout (a tenth of it, at least 5 s). Each
phase arms it anew, and so does a failure within a phase (a subtest), since pytest cancels
the timer whenever something raises. The timeout is pytest-timeout's own reading of the
marker, option, environment and ini.

Under xdist the stacks go to a file per worker; the controller names the test when the
worker goes down and prints the stacks in the summary, where a CI log's tail shows them.
In a plain run they go to the terminal's stderr; the stacks name the test function.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import time
from pathlib import Path

import pytest
import pytest_timeout

from tests.helpers import ARTIFACTS

RUN_DIR = "STEELSIGHT_HUNG_TESTS"  # the controller's folder for this run, passed to its workers
STARTED = pytest.StashKey[float]()
STDERR = pytest.StashKey[object]()
KEEP_S = 7 * 24 * 3600  # an earlier run's stacks are kept this long
ARMED = pytest.StashKey[tuple]()  # the running phase's deadline, grace and output


def grace_s(timeout: float) -> float:
    """How long past the test's own timeout the watchdog waits: pytest-timeout gets the first go."""
    return max(5.0, timeout / 10)


def worker_id(config) -> str | None:
    """This xdist worker's id; None in the controller and in a plain run."""
    return config.workerinput["workerid"] if hasattr(config, "workerinput") else None


def pytest_configure(config):
    if worker_id(config) is None:  # the controller, or a plain run: a folder of its own, never shared
        runs = ARTIFACTS / "hung-tests"
        os.environ[RUN_DIR] = str(runs / f"run-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        for old in runs.glob("run-*") if runs.is_dir() else []:
            if time.time() - old.stat().st_mtime > KEEP_S:
                shutil.rmtree(old, ignore_errors=True)
        # pytest captures fd 2 during a test; this copy still reaches the terminal
        config.stash[STDERR] = os.fdopen(os.dup(2), "w")


def pytest_unconfigure(config):
    if STDERR in config.stash:
        config.stash[STDERR].close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    item.stash[STARTED] = time.monotonic()
    yield


def armed(item, phase: str):
    if not item.config.pluginmanager.hasplugin("timeout"):  # -p no:timeout: no timeout to go past
        yield
        return
    settings = pytest_timeout._get_item_settings(item)  # the same rules pytest-timeout applies
    timeout = float(settings.timeout or 0)
    if not timeout or (settings.func_only and phase != "call"):
        yield
        return
    started = time.monotonic() if settings.func_only else item.stash.get(STARTED, time.monotonic())
    left = max(started + timeout - time.monotonic(), 0.0) + grace_s(timeout)
    worker = worker_id(item.config)
    if worker is None:
        yield from timer(item.config, left, grace_s(timeout), item.config.stash[STDERR])
        return
    path = Path(os.environ[RUN_DIR]) / f"{worker}.txt"  # set by the controller before the workers start
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(f"{item.nodeid} ({phase}) was running when this worker ended\n")  # faulthandler adds the stacks
        fh.flush()
        yield from timer(item.config, left, grace_s(timeout), fh)
    path.unlink(missing_ok=True)  # the phase finished: nothing to report


def timer(config, left: float, grace: float, out):
    """faulthandler's timer for one phase; kept where pytest_exception_interact can arm it again."""
    config.stash[ARMED] = (time.monotonic() + left, grace, out)
    faulthandler.dump_traceback_later(left, exit=True, file=out)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        del config.stash[ARMED]


@pytest.hookimpl(trylast=True)
def pytest_exception_interact(node, call, report):
    """pytest cancels the timer here (a failed subtest, too, inside a phase): arm it again."""
    armed_now = node.config.stash.get(ARMED, None)
    if armed_now is not None:
        deadline, grace, out = armed_now
        faulthandler.dump_traceback_later(max(deadline - time.monotonic(), grace), exit=True, file=out)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from armed(item, "setup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from armed(item, "call")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield from armed(item, "teardown")


def run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR, "/nonexistent"))


def dumps() -> list[Path]:
    return sorted(run_dir().glob("*.txt")) if run_dir().is_dir() else []


def report(config, path: Path, whole: bool) -> None:
    text = path.read_text(errors="replace")
    first = (text.splitlines() or ["(a test was starting)"])[0]
    config.get_terminal_writer().line(f"\n[{path.stem}] " + (text if whole else first), red=True)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist's controller: a worker went down; if a test was running, name it now (its stacks: in the summary)."""
    path = run_dir() / f"{node.gateway.id}.txt"
    if error and path.exists():
        report(node.config, path, whole=False)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if worker_id(config) is None:
        for path in dumps():
            report(config, path, whole=True)
        if run_dir().is_dir() and not any(run_dir().iterdir()):
            shutil.rmtree(run_dir())
