"""What the benches share: the machine's description, timing, process pinning, a local stack and dated results.

    python -m bench.harness          # prints this machine's description as the benches record it

Every bench builds its parser with :class:`BenchParser` (``--quick``, ``--no-save``),
prints a table whose ratios were measured in the one run (absolute times on shared
machines are noise) and hands it to :func:`emit`, which writes
``bench/results/<bench>-<UTC date-time>.json``: the machine, the git commit, the exact
command line, the figures and the printed table. ``python -m bench.report`` puts the
newest table of each bench into bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from steelsight.contract import JOB_ID_SEPARATOR, Settings

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "deploy" / "samples"
RESULTS = Path(__file__).resolve().parent / "results"


# command line ------------------------------------------------------------------------------------
class BenchParser(argparse.ArgumentParser):
    """An argument parser with the module docstring as its help, ``--quick`` and ``--no-save``.

    ``quick`` maps option destinations to the values ``--quick`` uses instead of the
    defaults; options given explicitly still win.
    """

    def __init__(self, doc: str | None, quick: dict[str, object]):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.quick = quick
        self.add_argument("--quick", action="store_true",
                          help=f"a smoke run of well under a minute, as {as_flags(quick) or 'the defaults'}; "
                               "its result is marked quick")
        self.add_argument("--no-save", action="store_true", help="print the table only, write no JSON")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.quick:
            self.set_defaults(**self.quick)
            parsed = super().parse_args(args, namespace)
        return parsed


def as_flags(options: dict[str, object]) -> str:
    """``{"frames": 48, "batch": [1, 8], "parity": True}`` -> ``--frames 48 --batch 1 8 --parity``."""
    words = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, list | tuple):
            words.append(" ".join([flag, *map(str, value)]))
        elif value is not None and value is not False:
            words.append(f"{flag} {value}")
    return " ".join(words)


# the machine -------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's marketing name (``platform.processor()`` is empty on most Linux systems)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """CPU, cores, versions of the libraries the bench loaded, and the GPU when torch sees one."""
    info: dict[str, object] = {"cpu": cpu_model(), "cores": os.cpu_count(),
                               "usable_cores": len(os.sched_getaffinity(0)), "python": platform.python_version()}
    for module in ("torch", "numpy", "onnxruntime", "openvino", "rq", "redis"):
        if module in sys.modules:  # only what this run used: importing the rest would cost seconds
            info[module] = getattr(sys.modules[module], "__version__", "?")
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info


def describe(info: dict[str, object] | None = None) -> str:
    """One line for a table's header: ``Intel Xeon …, 2 cores, torch 2.x (2 threads)``."""
    info = info or machine()
    text = f"{info['cpu']}, {info['cores']} cores"
    if info.get("gpu"):
        text = f"{info['gpu']}, {text}"
    if info.get("torch"):
        text += f", torch {info['torch']} ({info.get('torch_threads', '?')} threads)"
    return text


def git_commit() -> dict[str, object]:
    """HEAD's sha and whether tracked files differ from it (None outside a git checkout)."""
    env = dict(os.environ) | {"GIT_OPTIONAL_LOCKS": "0"}  # a bench must not take the index lock
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, env=env,
                                 capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha, "dirty": bool(changed)}


def command_line() -> str:
    """The command, interpreter and ``-m bench.<name>`` included; a path outside the repository is given by its
    name (as :func:`portable` gives it), so no machine's layout lands in a result."""
    argv = getattr(sys, "orig_argv", [sys.executable, *sys.argv])
    return shlex.join(portable(Path(a)) if a.startswith(("/", "..")) and Path(a).exists() else a for a in argv)


# results -----------------------------------------------------------------------------------------
def save_result(name: str, payload: dict) -> Path:
    """Write ``bench/results/<name>-<UTC date-time>.json``: machine, commit, command line, then ``payload``."""
    RESULTS.mkdir(exist_ok=True)
    now = datetime.now(UTC)
    path = RESULTS / f"{name}-{now:%Y-%m-%dT%H%M%S}.json"
    record = {"bench": name, "date": now.isoformat(timespec="seconds"), "command": command_line(),
              **git_commit(), "machine": machine(), **payload}
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


def portable(path: Path) -> str:
    """A path as it means something on another machine: relative to the repository, else its name."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def emit(name: str, args: argparse.Namespace, lines: list[str], figures: dict) -> Path | None:
    """Print the table, then save it with the figures behind it (unless ``--no-save``)."""
    print("\n".join(lines), flush=True)
    if args.no_save:
        return None
    options = {k: portable(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path = save_result(name, {"quick": args.quick, "options": options, **figures, "table": lines})
    print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return path


# timing ------------------------------------------------------------------------------------------
def median(values) -> float:
    return float(statistics.median(values))


def spread(values: list[float], digits: int = 2) -> str:
    """``median (min–max)``, or the one value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}×"


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int,
                        sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds per call: one warm-up each, then the calls round-robin so the machine's drift hits all alike.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each timed call.
    """
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            if sync:
                sync()
            start = time.perf_counter()
            call()
            if sync:
                sync()
            times[name].append(time.perf_counter() - start)
    return {name: median(t) for name, t in times.items()}


# processes ---------------------------------------------------------------------------------------
def parse_cores(text: str | None) -> set[int] | None:
    """'0', '0,2' or '0-7' (None: no pinning)."""
    if text is None:
        return None
    cores = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return cores


def pinned(cores: set[int] | None):
    """preexec_fn that pins a child process to ``cores`` (None: no pinning)."""
    return None if cores is None else (lambda: os.sched_setaffinity(0, cores))


def pin_process(pid: int, cores: set[int] | None) -> None:
    """Pin every thread of a running process."""
    if cores is not None:
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), cores)


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) per thread id, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads, ended ones included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_split(pids: dict[str, list[int]], run: Callable[[], object]) -> tuple[object, dict[str, float]]:
    """Run ``run()``; return its value and each group's CPU seconds spent meanwhile."""
    before = {name: sum(cpu_seconds(p) for p in group) for name, group in pids.items()}
    value = run()
    return value, {name: sum(cpu_seconds(p) for p in group) - before[name] for name, group in pids.items()}


# a local stack: redis-server and SeaweedFS from steelsight.devstack ------------------------------
@contextlib.contextmanager
def local_stack(workdir: Path, service_cores: set[int] | None = None, **settings) -> Iterator[tuple[Settings, dict]]:
    """Start Redis and the S3 server under ``workdir``; yield Settings for them and ``{"redis": …, "s3": …}``.

    ``service_cores`` pins both servers and this process (the producer's side).
    """
    from steelsight.devstack import redis_server, s3_server

    redis, s3 = redis_server(workdir).start(), None
    try:
        s3 = s3_server(workdir).start()
        for pid in (redis.proc.pid, s3.proc.pid, os.getpid()):
            pin_process(pid, service_cores)
        yield Settings(redis_url=f"redis://127.0.0.1:{redis.port}/0", s3_endpoint=f"127.0.0.1:{s3.port}",
                       s3_access_key=s3.credentials.access_key, s3_secret_key=s3.credentials.secret_key,
                       **settings), {"redis": redis, "s3": s3}
    finally:
        if s3 is not None:
            s3.stop()
        redis.stop()


def start_worker(settings: Settings, name: str, threads: int, cores: set[int] | None, log: Path,
                 extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """``steelsight worker`` in a child process with ``threads`` torch threads, pinned to ``cores``."""
    env = dict(os.environ) | settings.to_env() | {"OMP_NUM_THREADS": str(threads)}
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "steelsight.cli", "worker", "--name", name, *extra],
                                env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=pinned(cores))


def result_keys(settings: Settings, conn, line: str = "*") -> list[bytes]:
    """The result records of a line's frames (``*``: every line), by the contract's key."""
    return conn.keys(settings.result_key(JOB_ID_SEPARATOR.join((line, "*"))))


def results(settings: Settings, conn, line: str = "*") -> list[dict]:
    return [json.loads(conn.get(k)) for k in result_keys(settings, conn, line)]


def count_results(settings: Settings, conn, line: str = "*") -> int:
    """One KEYS call: benches poll this, and polling must not load the service cores."""
    return len(result_keys(settings, conn, line))


def wait_for_results(settings: Settings, conn, line: str, frames: int, timeout: float = 600) -> list[dict]:
    from steelsight.devstack import wait_until

    wait_until(lambda: count_results(settings, conn, line) >= frames, timeout, f"{frames} results", interval=0.05)
    return results(settings, conn, line)


def finish_times(done: list[dict]) -> list[datetime]:
    return sorted(datetime.fromisoformat(r["finished_at"]) for r in done)


def rate_after_first_batch(finished: list[datetime], batch: int) -> float:
    """Frames/s from the end of the first batch to the last result, counting the frames after it.

    A batch's results land within milliseconds of each other (its overlay uploads), a
    batch's compute apart, so the first batch ends at the widest gap among the first
    two batches' finish times. Counting from the first result instead credits the rest
    of the first batch without its time.
    """
    head = finished[: 2 * batch + 1]
    if len(head) < 2:
        raise ValueError("need at least two results")
    end = max(range(1, len(head)), key=lambda i: head[i] - head[i - 1])
    return (len(finished) - end) / (finished[-1] - finished[end - 1]).total_seconds()


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(describe())
    print(json.dumps({**git_commit(), "machine": machine()}, indent=1))


if __name__ == "__main__":
    main()
