"""``steelsight worker --processes N``: N worker processes on one machine, watched by this one.

Each child is a fresh interpreter (multiprocessing's *spawn*: a CUDA context does not
survive ``fork``) that runs the ordinary worker with ``cores // N`` torch threads.
SIGTERM and SIGINT are passed on to every child (RQ's warm shutdown; a second: cold, and a
child still running 10 s after that is killed).
Outside ``--burst`` a child that dies is started again after a backoff; the frames it
held are re-queued by the other workers' reclaim pass (:mod:`worker.reclaim`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

log = logging.getLogger("steelsight.worker.processes")

MAX_PROCESSES = 64
RESTART_FIRST_S, RESTART_MAX_S = 1.0, 30.0  # backoff before a restart, doubling per quick death
RESTART_RESET_S = 60.0  # a child that ran this long starts again after RESTART_FIRST_S
KILL_AFTER_S = 10.0  # a child still running this long after a second stop signal is SIGKILLed
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class Child:
    index: int  # 0-based: its metrics port is the first one + index
    process: Any = None
    pid: int = 0
    started: float = 0.0
    restarts: int = 0
    backoff: float = RESTART_FIRST_S
    due: float | None = None  # when to start it again
    signalled: int = 0  # stop signals passed on to the running process
    status: int = 0  # its last exit status, as a shell reports it

    @property
    def label(self) -> str:
        return f"worker-{self.index + 1}"


def process_count(text: str) -> int:
    """argparse type for ``--processes``: a whole number from 1 to MAX_PROCESSES."""
    with contextlib.suppress(ValueError):
        if 1 <= (n := int(text)) <= MAX_PROCESSES:
            return n
    raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to {MAX_PROCESSES}")


def check_ports(host: str, ports: list[int]) -> None:
    """Raise ValueError, one line, unless every metrics port can be bound now."""
    if ports[-1] > 65535:
        raise ValueError(f"metrics ports {ports[0]}-{ports[-1]}: above 65535; choose a lower --metrics-port")
    busy = []
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds
            try:
                s.bind((host, port))
            except OSError:
                busy.append(port)
    if busy:
        raise ValueError(f"metrics ports {ports[0]}-{ports[-1]} on {host} (one per process) must be free; in use: "
                         f"{', '.join(map(str, busy))}; choose another --metrics-port")


def describe(exitcode: int) -> str:
    if exitcode >= 0:
        return f"status {exitcode}"
    with contextlib.suppress(ValueError):
        return f"signal {signal.Signals(-exitcode).name}"
    return f"signal {-exitcode}"


def die_with_parent(parent: int, signum: int) -> bool:
    """Have the kernel send ``signum`` to this process when its parent dies (Linux only); False when ``parent``
    is already gone, as when it died before the call."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signum)
    return os.getppid() == parent


def _child(run: Callable[[Any], int], args: Any, threads: int, parent: int) -> None:
    """A child's body: die with the supervisor, take its share of the CPU, then work."""
    if not die_with_parent(parent, signal.SIGTERM):  # a supervisor killed outright takes its children along
        sys.exit(0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s")
    import torch  # before the model loads: its runtimes size their thread pools from torch's

    torch.set_num_threads(threads)
    log.info("%d torch CPU threads", torch.get_num_threads())
    try:
        code = run(args)
    except KeyboardInterrupt:  # Ctrl-C reaches the children too, perhaps before RQ handles signals
        code = 130
    # the worker has booked its batch and left RQ: the interpreter's final collection over the model's
    # objects would only hold the exit up by seconds (per process, on a busy CPU)
    gc.freeze()
    sys.exit(code)


def pass_on(child: Child, stops: list[int]) -> None:
    """Send ``child`` the stop signals it has not had yet."""
    while child.signalled < len(stops):
        signum = stops[child.signalled]
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signum)
        # RQ: the first asks for a warm shutdown, a later one (over a second after) for a cold one
        log.info("%s: %s passed on%s", child.label, signal.Signals(signum).name, " again" if child.signalled else "")
        child.signalled += 1


def supervise(run: Callable[[Any], int], child_args: Callable[[int], Any], n: int, host: str,
              ports: list[int], burst: bool, fatal_status: int | None = None) -> int:
    """Run ``run(child_args(i))`` in N spawned processes until they are done or told to stop.

    Returns 0 after a stop signal; in burst mode the worst child status; otherwise 0 once
    every child stopped cleanly (exit 0: someone stopped it directly, so it stays stopped).
    A child exiting with ``fatal_status`` (a setup error, which a restart cannot mend) is not
    restarted: the others are stopped and that status returned.
    """
    check_ports(host, ports)
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // n)
    log.info("%d worker processes on %d cores, %d torch CPU threads each; metrics and health on %s ports %s",
             n, cores, threads, host, ", ".join(map(str, ports)))
    spawn = multiprocessing.get_context("spawn")
    children = [Child(i) for i in range(n)]
    stops: list[int] = []  # the stop signals received, in order
    fatal: list[int] = []  # a child's setup error: every child stops, and the supervisor exits with it

    def start(child: Child) -> None:
        child.process = spawn.Process(target=_child, name=child.label,
                                      args=(run, child_args(child.index), threads, os.getpid()))
        child.process.start()
        child.pid, child.started, child.due, child.signalled = child.process.pid, time.monotonic(), None, 0
        log.info("%s started, pid %d, metrics on %s:%d", child.label, child.pid, host, ports[child.index])

    def ended(child: Child) -> None:
        code, ran = child.process.exitcode, time.monotonic() - child.started
        child.process, child.status = None, code if code >= 0 else 128 - code
        if burst or stops or code == 0:
            log.info("%s (pid %d) exited with %s", child.label, child.pid, describe(code))
            return
        if code == fatal_status:
            log.error("%s (pid %d) exited with %s, a setup error (its message is above) that a restart cannot "
                      "mend: stopping every worker process", child.label, child.pid, describe(code))
            fatal.append(code)
            stops.append(signal.SIGTERM)
            return
        if ran >= RESTART_RESET_S:
            child.backoff = RESTART_FIRST_S
        child.due, child.restarts = time.monotonic() + child.backoff, child.restarts + 1
        log.warning("%s (pid %d) exited with %s after %.0f s; restart %d in %.0f s", child.label, child.pid,
                    describe(code), ran, child.restarts, child.backoff)
        child.backoff = min(child.backoff * 2, RESTART_MAX_S)

    # the handler only records: the loop passes signals on, also to a child started as one arrived
    previous = {s: signal.signal(s, lambda signum, _frame: stops.append(signum)) for s in (signal.SIGTERM,
                                                                                         signal.SIGINT)}
    try:
        for child in children:
            if not stops:
                start(child)
        cold_since: float | None = None
        while any(c.process is not None or c.due is not None for c in children):
            if len(stops) > 1 and cold_since is None:
                cold_since = time.monotonic()
            overdue = cold_since is not None and time.monotonic() - cold_since > KILL_AFTER_S
            for child in children:
                if child.process is not None:
                    pass_on(child, stops)
                    if overdue and child.process.exitcode is None:
                        # stuck past a cold shutdown (an upload retrying, a thread that never ends): its claimed
                        # frames go back to the queue when their claims expire, as after any crash
                        log.warning("%s (pid %d) still running %.0f s after the second stop signal: SIGKILL",
                                    child.label, child.pid, KILL_AFTER_S)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(child.pid, signal.SIGKILL)
                        child.process.join(5)
                    if child.process.exitcode is not None:
                        ended(child)
                if child.due is not None and stops:
                    child.due = None  # shutting down: it stays stopped
                elif child.due is not None and time.monotonic() >= child.due:
                    start(child)
            running = [c.process.sentinel for c in children if c.process is not None]
            if running:
                wait(running, timeout=0.2)
            else:
                time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if fatal:
        return fatal[0]
    if stops:
        log.info("all %d worker processes stopped", n)
        return 0
    return max(c.status for c in children)
