"""`steelsight worker --processes N`: N spawned workers share the queue; one killed is restarted, nothing lost."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import Worker

from steelsight.cli import main
from steelsight.clients import redis_client
from steelsight.devstack import ServiceExited, free_port, wait_until
from steelsight.producer.service import Producer, replay
from steelsight.worker.processes import KILL_AFTER_S, PR_SET_PDEATHSIG, check_ports, die_with_parent

from ..helpers import SAMPLES, ChildProcess, records

TOTAL = 24


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports."""
    for _ in range(50):
        base = free_port()
        try:
            check_ports("127.0.0.1", list(range(base, base + n)))
            return base
        except ValueError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports")


def supervisor(settings, tmp_path, name: str, *args: str) -> ChildProcess:
    """``steelsight worker --processes 2 --name NAME``; its children's metrics on settings.metrics_port + 0, 1."""
    return ChildProcess(settings, tmp_path, name, ["worker", "--processes", "2", "--name", name, *args])


@pytest.fixture()
def settings(settings):
    # the PyTorch trunk: no ONNX export or runtime timing at each child's start, which only slows the test
    return settings.model_copy(update={"metrics_port": free_ports(2), "backend": "torch"})


def enqueue(settings, line: str) -> None:
    producer = Producer(settings, line, "cam-1")
    assert all(producer.send_file(i) == "enqueued" for i in replay(SAMPLES, loop=True, limit=TOTAL))


def workers(conn) -> dict[str, Worker]:
    return {w.name: w for w in Worker.all(connection=conn)}


def start_time(port: int) -> float:
    """When the process serving ``port`` started (prometheus_client's process collector)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return float(next(line for line in text.splitlines() if line.startswith("process_start_time_seconds ")).split()[1])


def claimed_by(conn, worker_name: str, registry: StartedJobRegistry) -> set[str]:
    jobs = Job.fetch_many(registry.get_job_ids(cleanup=False), connection=conn, serializer=JSONSerializer)
    return {job.id for job in jobs if job is not None and job.worker_name == worker_name}


def assert_each_frame_once(settings, conn) -> None:
    results = records(settings, conn)
    assert len(results) == TOTAL and all(r["status"] == "ok" for r in results.values())
    assert conn.xlen(settings.results_stream) == TOTAL  # one stream entry per frame
    done = Job.fetch_many(list(results), connection=conn, serializer=JSONSerializer)
    assert [job.id for job in done if job is None or len(job.results()) != 1] == []  # each computed once
    assert FailedJobRegistry(settings.queue_name, connection=conn, serializer=JSONSerializer).count == 0


def test_bad_process_counts_and_busy_ports_are_refused_in_one_line(capsys):
    for bad in ("0", "65", "two"):
        with pytest.raises(SystemExit) as refused:
            main(["worker", "--processes", bad])
        assert refused.value.code == 2 and "a whole number from 1 to 64" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["worker", "--processes", "3", "--metrics-host", "127.0.0.1", "--metrics-port", str(port - 1)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(port) in err.split("in use: ")[1], err  # before any child started


@pytest.mark.timeout(90)
def test_a_setup_error_in_a_child_stops_every_child_instead_of_restarting(settings, tmp_path):
    missing = tmp_path / "missing.safetensors"
    sup = supervisor(settings, tmp_path, "ps", "--checkpoint", str(missing))
    try:
        code = sup.proc.wait(timeout=60)
    finally:
        sup.kill()
    out = sup.output()
    assert code == 2, out
    assert "steelsight worker: " in out and str(missing) in out  # the child's one-line error
    assert "a setup error (its message is above) that a restart cannot mend" in out
    assert "restart 1 in" not in out and "Traceback" not in out


@pytest.mark.timeout(90)
def test_two_processes_in_burst_share_the_queue_and_exit_0(settings, tmp_path):
    conn = redis_client(settings)
    settings = settings.model_copy(update={"batch_size": 1})  # 24 batches: both children get some
    enqueue(settings, "line-pb")
    sup = supervisor(settings, tmp_path, "pb", "--burst")
    try:
        code = sup.proc.wait(timeout=60)
    finally:
        sup.kill()
    assert code == 0, sup.output()
    assert_each_frame_once(settings, conn)
    assert {r["worker"] for r in records(settings, conn).values()} == {"pb-1", "pb-2"}
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert sup.output().count(f"steelsight.worker.processes INFO {threads} torch CPU threads") == 2  # in each child


@pytest.mark.timeout(120)
def test_a_killed_child_is_restarted_and_no_frame_is_lost(settings, tmp_path):
    conn = redis_client(settings)
    started = StartedJobRegistry(settings.queue_name, connection=conn, serializer=JSONSerializer)
    sup = supervisor(settings, tmp_path, "pk")
    try:
        wait_until(lambda: workers(conn).keys() >= {"pk-1", "pk-2"}, 60, "both children to load the model")
        victim, survivor = workers(conn)["pk-1"].pid, workers(conn)["pk-2"].pid
        port = settings.metrics_port  # pk-1 is the first child
        first_start = start_time(port)
        enqueue(settings, "line-pk")
        wait_until(lambda: claimed_by(conn, "pk-1", started), 30, "pk-1 to claim a batch", 0.02)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: start_time(port) > first_start, 20, "a new process on pk-1's metrics port", 0.1)
        serving = time.monotonic() - killed
        wait_until(lambda: "pk-1-r1" in workers(conn), 40, "the restarted child to register with RQ", 0.1)
        ready = time.monotonic() - killed
        restarted = workers(conn)["pk-1-r1"].pid
        wait_until(lambda: len(records(settings, conn)) >= TOTAL, 60, f"{TOTAL} results", 0.1)
        finished = time.monotonic() - killed
        assert_each_frame_once(settings, conn)
        sup.proc.send_signal(signal.SIGTERM)
        asked = time.monotonic()
        code = sup.proc.wait(timeout=30)
        stopped = time.monotonic() - asked
    finally:
        sup.kill()
    print(f"restart: a new process served the metrics port {serving:.1f}s after the SIGKILL, registered with RQ "
          f"after {ready:.1f}s; all results in by {finished:.1f}s; SIGTERM to exit {stopped:.1f}s")
    assert restarted not in (victim, survivor)
    assert f"worker-1 (pid {victim}) exited with signal SIGKILL" in sup.output()
    assert code == 0, sup.output()
    assert not any(Path(f"/proc/{pid}").exists() for pid in (restarted, survivor))  # no child left behind
    assert serving <= 20 and stopped <= 30


def deaf(ready: Path) -> int:
    """A child stuck for good: it ignores the stop signals (as a worker hung in an upload would)."""
    # first: until then the supervisor's death still ends it with the SIGTERM its children get
    if not die_with_parent(os.getppid(), signal.SIGKILL):
        os._exit(1)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    (ready / str(os.getpid())).touch()
    while True:
        time.sleep(1)


# supervise runs in a process of its own: the stop signals this test sends can never reach the xdist worker.
# It dies with the test process, before its imports, which take seconds
SUPERVISE_DEAF = f"""
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, signal.SIGKILL)
if os.getppid() != int(sys.argv[3]):
    os._exit(1)
import logging
from pathlib import Path
from steelsight.worker.processes import supervise
from tests.integration.test_worker_processes import deaf
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(message)s")
ready, port = Path(sys.argv[1]), int(sys.argv[2])
sys.exit(supervise(deaf, lambda i: ready, 2, "127.0.0.1", [port, port + 1], burst=False))
"""


@pytest.mark.timeout(150)
def test_children_still_running_after_a_second_stop_signal_are_killed(tmp_path):
    root = Path(__file__).resolve().parents[2]
    ready = tmp_path / "ready"
    ready.mkdir()
    log = tmp_path / "supervisor.log"
    with open(log, "wb") as out:
        sup = subprocess.Popen([sys.executable, "-c", SUPERVISE_DEAF, str(ready), str(free_ports(2)),
                                str(os.getpid())], cwd=root, env=os.environ | {"PYTHONPATH": str(root)},
                               stdout=out, stderr=subprocess.STDOUT)

    def running() -> bool:
        if sup.poll() is not None:
            raise ServiceExited(f"the supervisor exited with {sup.returncode}")
        return True

    def logged(text: str, n: int) -> bool:
        exited = sup.poll() is not None  # before reading: whatever it wrote before exiting is in the log
        if log.read_text(errors="replace").count(text) >= n:
            return True
        if exited:
            raise ServiceExited(f"the supervisor exited with {sup.returncode} before logging {text.strip()!r}")
        return False

    ok = False
    try:
        wait_until(lambda: running() and len(list(ready.iterdir())) == 2, 90,
                   "both children to ignore the signals", 0.1)
        asked = []
        # the second signal only once the first was handled: two signals close together can reach the
        # supervisor's handler as one
        for passed in ("SIGTERM passed on\n", "SIGTERM passed on again"):
            asked.append(time.monotonic())
            sup.send_signal(signal.SIGTERM)
            wait_until(lambda text=passed: logged(text, 2), 30, f"'{passed.strip()}' for both children", 0.05)
        code = sup.wait(timeout=KILL_AFTER_S + 30)
        stopped = time.monotonic()
        ok = True
    finally:
        if not ok:
            if sup.poll() is None:
                sup.kill()  # its children die with it
                sup.wait()
            print(log.read_text(errors="replace"))
    output = log.read_text(errors="replace")
    assert code == 0, output
    assert output.count("after the second stop signal: SIGKILL") == 2, output
    assert KILL_AFTER_S <= stopped - asked[1] < KILL_AFTER_S + 5, stopped - asked[1]
