"""The whole GPU measurement in one run: model only, the pipeline at several worker counts, latency at 70 % of the
best end-to-end rate, a profile, the CPU split per process, and the bottleneck named from those figures.

    python -m bench.gpu_sweep --device cuda        # the whole sweep, within --budget-s (480 s)
    python -m bench.gpu_sweep --quick              # the same steps on the CPU, tiny: a smoke run of a few minutes
    python -m bench.gpu_sweep --device cuda --workers 4 8 --budget-s 300

Every step is a subprocess with its own timeout. The results file,
bench/results/gpu_sweep-<UTC date-time>.json, is rewritten after every step, so a run
that is cut short or killed still leaves what it measured; a step that no longer fits in
what is left of --budget-s is recorded as skipped, and the summary is written anyway.
The benches the steps run keep their own result files as well.

1. model only: ``bench.batch_sweep --parity``, once per backend: frames/s per batch size
   (forward only, label only, explained) and parity against float32 eager on the CPU.
2. pipeline: ``bench.pipeline_throughput --rounds 1 --model-once --skip-beside`` with
   STEELSIGHT_EXPLAIN_ON_DEVICE=on at each --workers count, then =off at the best one, to
   show what the device path buys.
   The workers run the fastest backend whose top-1 parity is at least 99 % (or
   --pipeline-backend) at the batch where its explained rate saturates (or
   --pipeline-batch). The first run uses --frames; later runs are sized from the rates the
   previous run measured to last about --run-s each (less when the budget runs short).
3. latency: every pipeline run measures capture-to-result p50/p95 at 50, 70 and 90 % of
   its own end-to-end rate (--quick: 70 % only); the summary gives 70 % of the best run.
4. profile: one more stream at the best worker count, with py-spy sampling worker 0 and
   the producer (--py-spy, else ``py-spy`` on PATH or beside the interpreter), the CPU
   seconds of worker 0's threads and of each process, and the GPU's busy share
   (nvidia-smi); and torch.profiler on a model-only explain loop, on the CPU overlay path
   and on the device path of model/inference/ondevice.py. Without py-spy the
   torch.profiler loop goes first; on the CPU only the first of the two runs.
5. summary: the best end-to-end rate against the target (3,000 frames/s, p95 under
   100 ms at 70 % of it), CPU milliseconds per frame and cores used per process, and the
   bottleneck: the stage that loses the most rate, the busiest process, the GPU's busy
   share and the worker's hottest functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from bench.harness import (
    RESULTS,
    ROOT,
    SAMPLES,
    BenchParser,
    as_flags,
    command_line,
    cpu_seconds,
    describe,
    git_commit,
    machine,
    portable,
    thread_cpu,
)
from steelsight.model.inference.backends import BACKEND_NAMES

NAME = "gpu_sweep"
TARGET_FPS = 3000.0  # issue #25: one H200 or H100 box, end to end
TARGET_P95_S = 0.100  # ... with p95 capture-to-result under this at 70 % of the rate
LATENCY_SHARES = (0.5, 0.7, 0.9)
QUICK_LATENCY_SHARES = (0.7,)  # each share is a paced stream: --quick keeps only the one the target names
REPORT_SHARE = "70%"
MIN_PARITY = 0.99  # top-1 agreement with float32 a backend needs to be picked for the pipeline
RESERVE_S = 5.0  # kept back from every step for the summary and the last write
INTERRUPT_GRACE_S = 10.0  # a timed-out step gets this long after SIGINT to stop its servers itself
GPU_DEFAULTS = {"backends": ["torch", "torch-fp16", "torch-bf16"], "batches": [32, 64, 128, 256],
                "workers": [2, 4, 8]}
CPU_DEFAULTS = {"backends": ["torch"], "batches": [8], "workers": [1, 2]}


# running a step --------------------------------------------------------------------------------
def proc_start(pid: int) -> int | None:
    """A process's start time in ticks (with its pid, it names the process even after the pid is reused)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> list[tuple[int, int | None]]:
    """Every process below ``pid`` with its start time, read from /proc. The servers a bench starts detach
    (setsid), so killing the bench's process group alone would leave them behind."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append((child, proc_start(child)))
            todo.append(child)
    return found


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGINT to the step's process group (its ``finally`` blocks stop its servers), then SIGKILL to whatever of
    the tree is left after the grace period."""
    tree = [(proc.pid, proc_start(proc.pid)), *descendants(proc.pid)]
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=INTERRUPT_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for pid, started in tree:
        if started is not None and proc_start(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc.wait()


def run_step(argv: list[str], timeout: float, log: Path, env: dict[str, str] | None = None
             ) -> tuple[str, float, str]:
    """Run one step; ``(status, wall seconds, output)`` with status ok, failed or timeout."""
    start = time.monotonic()
    with open(log, "w") as out:
        # a process group of its own, so a timeout can interrupt the step's whole tree and nothing else; not
        # detached, so whoever ends the sweep's terminal ends the step too
        proc = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ) | (env or {}), stdout=out,
                                stderr=subprocess.STDOUT, text=True, process_group=0)
        try:
            status = "ok" if proc.wait(timeout=timeout) == 0 else "failed"
        except subprocess.TimeoutExpired:
            stop_tree(proc)
            status = "timeout"
        except BaseException:  # Ctrl-C or a kill of the sweep: take the step's servers down with it
            stop_tree(proc)
            raise
    return status, time.monotonic() - start, log.read_text(errors="replace")


def written_result(output: str) -> Path | None:
    """The result file a bench reported (``harness.emit`` prints ``wrote bench/results/….json``)."""
    found = re.findall(r"^wrote (bench/results/\S+\.json)$", output, re.MULTILINE)
    return ROOT / found[-1] if found else None


def last_json_line(output: str) -> dict | None:
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


# the results file --------------------------------------------------------------------------------
class Sweep:
    """The steps' records and figures, rewritten to one dated results file after every step."""

    def __init__(self, args: argparse.Namespace, started: float):
        self.args = args
        self.started = started
        now = datetime.now(UTC)
        RESULTS.mkdir(exist_ok=True)
        self.path = RESULTS / f"{NAME}-{now:%Y-%m-%dT%H%M%S}.json"
        self.logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="steelsight-gpusweep-"))
        self.logs.mkdir(parents=True, exist_ok=True)
        # what harness.save_result records, taken once: git status and the machine do not change during the run
        self.header = {"bench": NAME, "date": now.isoformat(timespec="seconds"), "command": command_line(),
                       **git_commit(), "machine": machine()}
        self.figures: dict = {"device": args.device, "budget_s": args.budget_s, "complete": False, "steps": [],
                              "model_only": {}, "pipeline": [], "profile": None, "torch_profile": None,
                              "summary": None}

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def write(self, lines: list[str] | None = None) -> None:
        self.figures["wall_s"] = round(time.monotonic() - self.started, 1)
        if self.args.no_save:
            return
        options = {k: portable(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()}
        record = {**self.header, "quick": self.args.quick, "options": options, **self.figures,
                  "table": lines if lines is not None else render(self.figures, self.header["machine"])}
        text = json.dumps(record, indent=1, default=str) + "\n"
        # GPU_SWEEP_MIRROR (gpu_run.sh: the device tool's $OUT): a copy there too, so a call the tool cuts
        # short still brings back every step done
        for path in filter(None, (self.path, os.environ.get("GPU_SWEEP_MIRROR") and
                                  Path(os.environ["GPU_SWEEP_MIRROR"]) / self.path.name)):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)  # a kill mid-write leaves the previous complete file

    def step(self, name: str, argv: list[str], cap_s: float, min_s: float,
             env: dict[str, str] | None = None) -> dict:
        """Run a step within ``cap_s`` and what is left of the budget; skip it when less than ``min_s`` is left."""
        words = [portable(Path(a)) if a.startswith("/") else a for a in argv[2:]]  # no machine's layout in results
        record: dict = {"step": name, "command": " ".join(words), "env": env or {}}
        timeout = min(cap_s, self.left() - RESERVE_S - INTERRUPT_GRACE_S)  # a timeout's clean-up stays in budget
        if timeout < min_s:
            record |= {"status": "skipped", "reason": f"{self.left():.0f} s of the budget left, {max(timeout, 0):.0f} "
                                                      f"s after clean-up and summary; the step needs {min_s:.0f} s"}
        else:
            print(f"[{time.monotonic() - self.started:5.0f} s] {name} (timeout {timeout:.0f} s)", file=sys.stderr,
                  flush=True)
            log = self.logs / f"{len(self.figures['steps']):02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"
            begun = time.monotonic()
            try:
                status, wall, output = run_step(argv, timeout, log, env)
            except BaseException:  # the sweep is being stopped: the step is, and the file says so
                record |= {"status": "interrupted", "wall_s": round(time.monotonic() - begun, 1), "log": log.name}
                self.figures["steps"].append(record)
                self.write()
                raise
            record |= {"status": status, "wall_s": round(wall, 1), "timeout_s": round(timeout), "log": log.name}
            result = written_result(output)
            if result and result.exists():
                record["result_file"] = portable(result)
                record["result"] = json.loads(result.read_text())
            elif status == "ok" and (data := last_json_line(output)) is not None:
                record["result"] = data
            if status != "ok" or "result" not in record:
                record["output_tail"] = output[-3000:]
        self.figures["steps"].append(record)
        self.write()
        return record


# step 1: model only ----------------------------------------------------------------------------
def model_only_step(sweep: Sweep) -> None:
    args = sweep.args
    cap = max(60.0, args.budget_s * 0.35 / len(args.backends))  # step 1: about a third of the budget
    for backend in args.backends:
        argv = [sys.executable, "-m", "bench.batch_sweep", "--device", args.device, "--backend", backend,
                "--batch", *map(str, args.batches), "--repeats", str(args.repeats), "--parity",
                *(["--parity-images", str(args.parity_images)] if args.parity_images else []),
                *(["--quick"] if args.quick else [])]
        record = sweep.step(f"model only {backend}", argv, cap, min_s=20)
        r = record.pop("result", None)  # its figures go below; the step keeps the file's name
        if record["status"] == "ok" and r is not None:
            sweep.figures["model_only"][backend] = {"batches": r["batches"], **r["sweep"][backend],
                                                    "parity": r["parity"].get(backend), "device": r["device"]}
        sweep.write()


def pick_pipeline_config(sweep: Sweep) -> tuple[str, int, str]:
    """Backend and micro-batch for the workers, and why: the fastest explained rate among backends that agree
    with float32, at the first batch within 10 % of that backend's best."""
    args, models = sweep.args, sweep.figures["model_only"]
    eligible = {b: m for b, m in models.items()
                if m.get("parity") and m["parity"]["top1_agreement"] >= MIN_PARITY}
    if args.pipeline_backend != "best":
        backend, why = args.pipeline_backend, "--pipeline-backend"
    elif eligible:
        backend = max(eligible, key=lambda b: max(eligible[b]["explained"]))
        why = f"fastest explained rate with top-1 parity >= {MIN_PARITY:.0%}"
    else:
        backend, why = "auto", "no model-only result with parity to choose from"
    if args.pipeline_batch:
        return backend, args.pipeline_batch, why + "; batch from --pipeline-batch"
    if backend in models:
        batches, fps = models[backend]["batches"], models[backend]["explained"]
        batch = next(b for b, f in zip(batches, fps, strict=True) if f >= 0.9 * max(fps))
        return backend, batch, why + "; batch: the first within 10 % of its best explained rate"
    return backend, args.batches[0], why + "; batch: the first swept"


# step 2 and 3: the pipeline ----------------------------------------------------------------------
def seconds_per_frame(run: dict) -> float:
    """Wall seconds a pipeline_throughput run spends per ``--frames``, from its measured rates: each model-only
    run, workers only, end to end, and half the frames at each latency share of the end-to-end rate."""
    r = run["rounds"][0]
    model_runs = len(run["model_only"]) + (run["model_only_beside_producer"] is not None)
    latency = sum(0.5 / (float(share.rstrip("%")) / 100 * r["e2e"]) for share in run["latency_p50_p95_s"])
    return model_runs / r["model"] + 1 / r["workers"] + 1 / r["e2e"] + latency


def size_frames(sweep: Sweep, previous: dict | None, runs_left: int, granule: int) -> tuple[int, float]:
    """Frames for the next run and the seconds it is expected to take: ``--frames`` for the first (and always
    with --quick), else enough for about ``--run-s`` (or this run's share of the budget left) at the previous
    run's rates."""
    args = sweep.args
    per_frame = fixed = 0.0
    if previous is not None:
        per_frame = seconds_per_frame(previous["figures"])
        fixed = max(previous["wall_s"] - previous["figures"]["frames"] * per_frame, 5.0)  # start-up, model loads
    if previous is None or args.quick:
        frames = args.frames
    else:
        target = min(args.run_s, (sweep.left() - args.reserve_profile_s) / max(runs_left, 1))
        frames = int(max(target - fixed, 5.0) / per_frame)
    frames = max(granule, min(args.max_frames, math.ceil(frames / granule) * granule))
    return frames, fixed + frames * per_frame


def pipeline_run(sweep: Sweep, workers: int, on_device: bool, sized: tuple[int, float], backend: str,
                 batch: int) -> dict | None:
    """One pipeline_throughput run; skipped unless the budget left holds most of the time it is expected to take
    (a run cut short by its timeout writes nothing)."""
    frames, expected_s = sized
    args = sweep.args
    shares = QUICK_LATENCY_SHARES if args.quick else LATENCY_SHARES
    argv = [sys.executable, "-m", "bench.pipeline_throughput", "--device", args.device, "--workers", str(workers),
            "--frames", str(frames), "--rounds", "1", "--batch", str(batch), "--backend", backend,
            "--latency-shares", *map(str, shares), "--model-once", "--skip-beside",
            *(["--quick"] if args.quick else [])]
    mode = "on" if on_device else "off"
    cap = max(3 * args.run_s, 120)
    record = sweep.step(f"pipeline W={workers} explain-on-device {mode}", argv, cap,
                        min_s=max(args.min_run_s, 0.8 * expected_s),
                        env={"STEELSIGHT_EXPLAIN_ON_DEVICE": mode})
    figures = record.pop("result", None)
    if record["status"] != "ok" or figures is None:
        return None
    run = {"workers": workers, "explain_on_device": mode, "frames": frames, "wall_s": record["wall_s"],
           "result_file": record.get("result_file"), "figures": figures, **pipeline_summary(figures)}
    sweep.figures["pipeline"].append(run)
    sweep.write()
    return run


def pipeline_summary(figures: dict) -> dict:
    """The figures the sweep compares, from one pipeline_throughput result (one round)."""
    r = figures["rounds"][0]
    frames, workers = figures["frames"], figures["workers"]
    # the end-to-end phase lasts about frames / e2e; the prefilled one about frames / workers-only
    walls = {"cpu": frames / r["e2e"], "cpu_prefilled": frames / r["workers"]}
    split = {}
    for phase, key in (("end to end", "cpu"), ("workers only", "cpu_prefilled")):
        split[phase] = {}
        for group, seconds in r[key].items():
            processes = workers if group == "workers" else 1
            split[phase][group] = {"processes": processes, "cpu_ms_per_frame": 1e3 * seconds / frames,
                                   "cores_per_process": seconds / walls[key] / processes}
    return {"model_fps": r["model"], "workers_fps": r["workers"], "e2e_fps": r["e2e"], "steady_fps": r["steady"],
            "batch_e2e": r["batch_e2e"], "latency_p50_p95_ms": {share: [1e3 * v for v in p50_p95] for share, p50_p95
                                                                in figures["latency_p50_p95_s"].items()},
            "cpu_split": split}


def pipeline_step(sweep: Sweep, backend: str, batch: int) -> dict | None:
    args = sweep.args
    previous = None
    for i, workers in enumerate(args.workers):
        sized = size_frames(sweep, previous, len(args.workers) - i + 1, workers * batch)
        run = pipeline_run(sweep, workers, True, sized, backend, batch)
        previous = run or previous
    on = [r for r in sweep.figures["pipeline"] if r["explain_on_device"] == "on"]
    if not on:
        return None
    best = max(on, key=lambda r: r["e2e_fps"])
    pipeline_run(sweep, best["workers"], False, size_frames(sweep, best, 1, best["workers"] * batch), backend, batch)
    return best


# step 4: profiles --------------------------------------------------------------------------------
def find_py_spy(given: str | None) -> str | None:
    if given:
        return given
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def profile_step(sweep: Sweep, best: dict | None, backend: str, batch: int) -> None:
    """py-spy on a worker under load when py-spy is there, then torch.profiler's model-only loop (on cuda for the
    device's busy share); without py-spy the torch.profiler loop is the profile and goes first. On the CPU only
    the first runs: the other adds little there that step 2 has not measured, and --quick must stay short."""
    args = sweep.args
    py_spy = find_py_spy(args.py_spy)

    def under_load() -> None:
        workers = best["workers"] if best else args.workers[0]
        # about --profile-s of streaming at the best run's end-to-end rate
        frames = args.frames if args.quick or best is None else int(best["e2e_fps"] * args.profile_s)
        frames = max(workers * batch * 4, min(args.max_frames, frames))
        argv = [sys.executable, "-m", f"bench.{NAME}", "--profile-child", "--device", args.device, "--workers",
                str(workers), "--pipeline-batch", str(batch), "--pipeline-backend", backend, "--frames",
                str(frames), *(["--py-spy", py_spy] if py_spy else [])]
        record = sweep.step(f"profile W={workers} under load" + ("" if py_spy else " (no py-spy: CPU split only)"),
                            argv, cap_s=max(4 * args.profile_s, 90), min_s=25,
                            env={"STEELSIGHT_EXPLAIN_ON_DEVICE": "on"})
        result = record.pop("result", None)
        if record["status"] == "ok" and result is not None:
            sweep.figures["profile"] = result | {"py_spy": bool(py_spy)}
            sweep.write()

    def model_loop() -> None:
        argv = [sys.executable, "-m", f"bench.{NAME}", "--torch-profile-child", "--device", args.device,
                "--pipeline-backend", backend, "--pipeline-batch", str(batch), "--iterations", str(args.iterations)]
        record = sweep.step("torch.profiler, model-only explain loop", argv, cap_s=90, min_s=20)
        result = record.pop("result", None)
        if record["status"] == "ok" and result is not None:
            sweep.figures["torch_profile"] = result
            sweep.write()

    first, second = (under_load, model_loop) if py_spy else (model_loop, under_load)
    first()
    if args.device == "cuda":
        second()
    else:
        sweep.figures["steps"].append({
            "step": "profile under load (no py-spy: CPU split only)" if second is under_load
            else "torch.profiler, model-only explain loop", "status": "skipped",
            "reason": "on the CPU one profile runs: " + ("py-spy's" if py_spy else "torch.profiler's, as py-spy is "
                                                          "not installed")})
        sweep.write()


def short_frame(frame: str) -> str:
    """``explain (/…/model/inference/predictor.py:240)`` -> ``explain (model/inference/predictor.py)``."""
    match = re.match(r"^(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    function, path = match.groups()
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif path.startswith(str(ROOT)):
        path = str(Path(path).relative_to(ROOT))
    elif path.startswith("/"):
        path = Path(path).name
    return f"{function} ({path})"


def thread_group(name: str) -> str:
    """``model_0`` -> ``model``, ``ThreadPoolExecutor-0_3`` -> ``ThreadPoolExecutor-0``: one name per pool."""
    return re.sub(r"_\d+$", "", name.strip()) or "unnamed"


def parse_py_spy(raw: str, top: int = 12) -> dict:
    """Shares of samples from py-spy's raw (collapsed) output: by function where a thread was (self), by function
    anywhere on the stack (total), and by thread; plus thread id -> name."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    names: dict[int, str] = {}
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        head = re.match(r"^thread \((\d+)\)(?::\s*(.*))?$", frames[0])
        if head:
            frames = frames[1:]
            name = thread_group(head.group(2) or "unnamed")
            names[int(head.group(1))] = name
            threads[name] += n
        samples += n
        if frames:
            own[short_frame(frames[-1])] += n
            for frame in {short_frame(f) for f in frames}:
                total[frame] += n
    share = lambda counter: [[k, round(v / samples, 4)] for k, v in counter.most_common(top)]  # noqa: E731
    return {"samples": samples, "self": share(own), "total": share(total), "threads": share(threads),
            "thread_names": names}


class GpuSampler:
    """nvidia-smi's utilization.gpu (the share of time a kernel ran) every 100 ms while it runs."""

    def __init__(self):
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "100"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def stop(self) -> dict | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        out = self.proc.communicate(timeout=10)[0]
        rows = [[float(x) for x in line.split(",")[:2]] for line in out.splitlines()
                if re.match(r"^\s*\d+(\.\d+)?,\s*\d+", line)]
        if not rows:
            return None
        busy = [r[0] for r in rows]
        return {"samples": len(rows), "busy_mean": sum(busy) / len(busy) / 100, "busy_max": max(busy) / 100,
                "memory_used_mib_max": max(r[1] for r in rows)}


def start_py_spy(py_spy: str, pid: int, out: Path) -> subprocess.Popen:
    # non-blocking: the sampled process is never paused, so the stream runs at its own speed
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", "100", "--nonblocking", "--threads",
                             "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop_py_spy(proc: subprocess.Popen, out: Path) -> dict:
    proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    try:
        err = proc.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        err = proc.communicate()[1]
    if not out.exists():
        return {"error": err.strip()[-500:] or f"py-spy exited with {proc.returncode} and wrote nothing"}
    return parse_py_spy(out.read_text())


def profile_child(args: argparse.Namespace) -> None:
    """One unpaced stream at the best worker count, profiled: py-spy on worker 0 and on this process (the
    producer), CPU seconds per process and per thread of worker 0, and the GPU's busy share."""
    from bench.harness import cpu_split, local_stack, start_worker
    from bench.pipeline_throughput import run_stream
    from steelsight.clients import redis_client
    from steelsight.devstack import free_port

    workers = args.workers[0]
    workdir = Path(tempfile.mkdtemp(prefix="steelsight-profile-"))
    threads = max((os.cpu_count() or 1) // workers, 1)
    procs: list[subprocess.Popen] = []
    stack = local_stack(workdir, None, device=args.device, batch_size=args.pipeline_batch,
                        backend=args.pipeline_backend, max_queue_depth=max(10_000, 2 * args.frames))
    with stack as (settings, servers):
        try:
            conn = redis_client(settings)
            procs = [start_worker(settings.model_copy(update={"metrics_port": free_port()}), f"profile{i}", threads,
                                  None, workdir / f"worker{i}.log") for i in range(workers)]
            run_stream(settings, conn, "warmup", 2 * args.pipeline_batch * workers, None)  # models loaded
            pids = {"workers": [p.pid for p in procs], "S3 server (SeaweedFS)": [servers["s3"].proc.pid],
                    "Redis": [servers["redis"].proc.pid], "producer": [os.getpid()]}
            spies = {}
            if args.py_spy:
                spies = {who: (start_py_spy(args.py_spy, pid, workdir / f"{who}.txt"), workdir / f"{who}.txt")
                         for who, pid in (("worker 0", procs[0].pid), ("producer", os.getpid()))}
                time.sleep(1.0)  # py-spy attaches before the stream starts
            gpu = GpuSampler() if args.device.startswith("cuda") else None
            threads_before = thread_cpu(procs[0].pid)
            start = time.perf_counter()
            (e2e_fps, steady_fps, _), cpu = cpu_split(
                pids, lambda: run_stream(settings, conn, "profile", args.frames, None))
            wall = time.perf_counter() - start
            threads_after = thread_cpu(procs[0].pid)
            gpu_busy = gpu.stop() if gpu else None
            spy_cpu = {who: cpu_seconds(proc.pid) for who, (proc, _) in spies.items() if proc.poll() is None}
            profiles = {who: stop_py_spy(proc, out) for who, (proc, out) in spies.items()}
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=30)
    names = profiles.get("worker 0", {}).pop("thread_names", {})
    for profile in profiles.values():
        profile.pop("thread_names", None)
    spent = {tid: threads_after[tid] - threads_before.get(tid, 0.0) for tid in threads_after}
    busiest = max((tid for tid in spent if tid != procs[0].pid), key=spent.get, default=None)
    by_thread: Counter[str] = Counter()
    for tid, seconds in spent.items():
        if names:  # py-spy names the threads that run Python; the rest are native (torch's intra-op pool, say)
            name = names.get(tid, "native threads")
        else:  # as bench/worker_cpu.py: the busiest thread is the model's
            name = "main" if tid == procs[0].pid else "busiest (model)" if tid == busiest else "other threads"
        by_thread[name] += seconds
    result = {
        "workers": workers, "threads_per_worker": threads, "batch": args.pipeline_batch,
        "backend": args.pipeline_backend, "explain_on_device": settings.explain_on_device, "frames": args.frames,
        "wall_s": wall, "e2e_fps": e2e_fps, "steady_fps": steady_fps,
        "cpu_ms_per_frame": {group: 1e3 * s / args.frames for group, s in cpu.items()},
        "cores_per_process": {group: s / wall / (workers if group == "workers" else 1)
                              for group, s in cpu.items()},
        "worker0_threads_cpu_ms_per_frame": {name: 1e3 * s / args.frames for name, s in by_thread.most_common()},
        "py_spy_cpu_s": spy_cpu, "gpu": gpu_busy, "py_spy_profiles": profiles}
    print(f"# worker logs in {workdir}", file=sys.stderr)
    print(json.dumps(result, default=str))


def torch_profile_child(args: argparse.Namespace) -> None:
    """torch.profiler over a model-only explain loop: the top operators by CPU and by device time, and the device's
    busy share of the loop's wall time; on the CPU overlay path and, where it exists, the device path."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from steelsight.model.inference.imageio import read_gray
    from steelsight.model.inference.predictor import Predictor

    predictor = Predictor.load(None, device=args.device, batch_size=args.pipeline_batch,
                               backend=args.pipeline_backend)
    samples = [read_gray(p) for p in sorted(SAMPLES.rglob("*.bmp"))]
    images = [samples[i % len(samples)] for i in range(args.pipeline_batch)]
    paths = {"explain, CPU overlay (Predictor.explain)": lambda: predictor.explain(images)}
    result: dict = {"device": args.device, "backend": predictor.trunk.name, "batch": args.pipeline_batch,
                    "iterations": args.iterations, "paths": {}}
    try:  # the device path is optional here: the sweep must run on trees without it
        from steelsight.model.inference.ondevice import DeviceExplainer

        explainer = DeviceExplainer(predictor)
        paths["explain on device (ondevice.DeviceExplainer)"] = lambda: explainer.explain(images)
    except Exception as exc:
        result["device_path_error"] = f"{type(exc).__name__}: {exc}"
    cuda = predictor.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    for name, call in paths.items():
        try:
            for _ in range(2):  # warm-up: cuDNN algorithms, allocator, lazy imports
                call()
            sync()
            with profile(activities=activities) as prof:
                start, cpu_start = time.perf_counter(), time.process_time()
                for _ in range(args.iterations):
                    call()
                sync()
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        except Exception as exc:
            result["paths"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        frames = args.iterations * args.pipeline_batch
        events = prof.key_averages()

        def device_us(event) -> float:
            return getattr(event, "self_device_time_total", 0) or 0

        # an operator's self device time is the kernels it launched itself; the kernels also appear on their own
        ops = [e for e in events if e.device_type == DeviceType.CPU]

        def row(event, us: float, frames: int = frames) -> list:
            return [event.key, round(us / 1e3 / frames, 4), event.count]

        entry = {"frames_per_s": frames / wall, "process_cpu_ms_per_frame": 1e3 * cpu / frames,
                 "top_cpu_ms_per_frame": [row(e, e.self_cpu_time_total) for e in
                                          sorted(ops, key=lambda e: -e.self_cpu_time_total)[:12]]}
        if cuda:
            busy_us = sum(device_us(e) for e in ops)
            entry |= {"device_busy_share": busy_us / 1e6 / wall,
                      "top_device_ms_per_frame": [row(e, device_us(e)) for e in
                                                  sorted(ops, key=lambda e: -device_us(e))[:12]]}
        result["paths"][name] = entry
    print(json.dumps(result, default=str))


# step 5: summary ---------------------------------------------------------------------------------
def name_bottleneck(best: dict, profile: dict | None, torch_prof: dict | None) -> dict:
    """The bottleneck from the figures: which stage loses the most rate, the busiest process, the GPU's busy share
    under load and in a model-only loop, and worker 0's hottest thread and functions."""
    stages = {"inside the worker (fetch, decode, overlay, upload, publish) against model only":
              best["workers_fps"] / best["model_fps"],
              # both from the first result on: end to end from the first upload would count the pipeline's fill
              "feeding the workers (producer → S3 → Redis) against workers only":
              (best.get("steady_fps") or best["e2e_fps"]) / best["workers_fps"]}
    stage, kept = min(stages.items(), key=lambda item: item[1])
    overall = (best.get("steady_fps") or best["e2e_fps"]) / best["model_fps"]  # the stages' basis
    split = best["cpu_split"]["end to end"]
    busiest, figures = max(split.items(), key=lambda item: item[1]["cores_per_process"])
    text = [f"end to end (from the first result) keeps {overall:.0%} of the model-only rate; the largest loss "
            f"is {stage} ({kept:.0%} kept)"
            if kept < 0.9 else
            f"end to end (from the first result) keeps {overall:.0%} of the model-only rate, every stage >= 90 %: "
            "the model-only rate bounds it",
            f"busiest process during end to end: {busiest} at {figures['cores_per_process']:.2f} cores each "
            f"({figures['cpu_ms_per_frame']:.2f} CPU-ms per frame"
            + (f" across {figures['processes']} processes)" if figures["processes"] > 1 else ")")]
    out = {"stage": stage, "stage_kept": kept, "stages_kept": stages, "busiest_process": busiest,
           "busiest_cores_per_process": figures["cores_per_process"]}
    producer = next((v for k, v in split.items() if "producer" in k), None)
    if producer and producer["cores_per_process"] > 0.9:
        # one producer process sends frame by frame: near a whole core, the bench's feed, not the product, may
        # bound the rate
        out["producer_saturated"] = True
        text.append(f"the bench's single producer ran at {producer['cores_per_process']:.2f} cores: the feed may "
                    "bound end to end")
    if profile:
        if profile.get("gpu"):
            out["gpu_busy_under_load"] = profile["gpu"]["busy_mean"]
            text.append(f"GPU busy {profile['gpu']['busy_mean']:.0%} of the profiled stream (nvidia-smi)")
        threads = profile.get("worker0_threads_cpu_ms_per_frame") or {}
        if threads:
            name, ms = next(iter(threads.items()))
            out["worker0_busiest_thread"] = name
            text.append(f"worker 0's busiest thread: {name} ({ms:.2f} of its {sum(threads.values()):.2f} CPU-ms per "
                        "streamed frame)")
        spy = (profile.get("py_spy_profiles") or {}).get("worker 0") or {}
        if spy.get("self"):
            out["worker0_hottest"] = spy["self"][:3]
            text.append("worker 0's hottest functions (py-spy, share of samples): "
                        + ", ".join(f"{fn} {share:.0%}" for fn, share in spy["self"][:3]))
    if torch_prof:
        for name, path in torch_prof.get("paths", {}).items():
            if "device_busy_share" in path:
                text.append(f"model-only loop, {name}: device busy {path['device_busy_share']:.0%} at "
                            f"{path['frames_per_s']:.0f} frames/s")
            elif path.get("top_cpu_ms_per_frame"):
                op, ms, _ = path["top_cpu_ms_per_frame"][0]
                text.append(f"model-only loop, {name}: {path['process_cpu_ms_per_frame']:.1f} CPU-ms per frame, "
                            f"most in {op} ({ms:.2f} ms)")
    out["text"] = "; ".join(text)
    return out


def summarize(sweep: Sweep) -> None:
    figures = sweep.figures
    on = [r for r in figures["pipeline"] if r["explain_on_device"] == "on"]
    if not on:
        figures["summary"] = {"text": "no pipeline run finished; nothing to compare"}
        return
    best = max(on, key=lambda r: r["e2e_fps"])
    off = next((r for r in figures["pipeline"] if r["explain_on_device"] == "off"), None)
    p50, p95 = best["latency_p50_p95_ms"].get(REPORT_SHARE, [None, None])
    figures["summary"] = {
        "best": {"workers": best["workers"], "e2e_fps": best["e2e_fps"], "workers_fps": best["workers_fps"],
                 "model_fps": best["model_fps"], "backend": best["figures"].get("backend"),
                 "batch": best["figures"]["batch"]},
        "latency_at_70_percent_ms": {"p50": p50, "p95": p95, "fps": 0.7 * best["e2e_fps"]},
        "target": {"fps": TARGET_FPS, "p95_ms": 1e3 * TARGET_P95_S, "fps_met": best["e2e_fps"] >= TARGET_FPS,
                   "p95_met": p95 is not None and p95 < 1e3 * TARGET_P95_S},
        "explain_on_device_gain": best["e2e_fps"] / off["e2e_fps"] if off else None,
        "cpu_split_per_process": best["cpu_split"],
        "bottleneck": name_bottleneck(best, figures["profile"], figures["torch_profile"])}


def cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def render(figures: dict, machine_info: dict) -> list[str]:
    """The markdown table: steps, model only, the pipeline runs, the CPU split, profile and the summary."""
    steps = figures["steps"]
    counts = Counter(s["status"] for s in steps)
    lines = [f"# {describe(machine_info)}; device {figures['device']}, budget {figures['budget_s']:.0f} s, "
             f"wall {figures.get('wall_s', 0):.0f} s; steps: " + ", ".join(f"{n} {k}" for k, n in counts.items())
             + ("" if figures.get("complete") else " (in progress or cut short)")]
    lines += ["| step | status | wall s |", "|---|---|---:|"]
    lines += [f"| {s['step']} | {s['status']}{' — ' + s['reason'] if 'reason' in s else ''} | "
              f"{s.get('wall_s', '')} |" for s in steps]
    if figures["model_only"]:
        lines += ["", "model only (bench.batch_sweep): frames/s per batch; parity against float32 on the CPU",
                  "| backend | path | " + " | ".join(f"b{b}" for b in next(iter(figures["model_only"].values()))
                                                      ["batches"]) + " | top-1 parity |",
                  "|---|---|" + "---:|" * (len(next(iter(figures["model_only"].values()))["batches"]) + 1)]
        for backend, m in figures["model_only"].items():
            parity = f"{100 * m['parity']['top1_agreement']:.2f}%" if m.get("parity") else "—"
            for path in ("model only", "explained"):
                lines.append(f"| {backend} | {path} | " + " | ".join(f"{f:.0f}" for f in m[path]) + f" | {parity} |")
    if figures["pipeline"]:
        lines += ["", "pipeline (bench.pipeline_throughput, 1 round): frames/s; capture-to-result at 70 % of each "
                      "run's end-to-end rate",
                  "| W | explain on device | backend, batch | frames | model only | workers only | end to end | "
                  "p50 / p95 at 70 % |", "|---:|---|---|---:|---:|---:|---:|---:|"]
        for r in figures["pipeline"]:
            p50, p95 = r["latency_p50_p95_ms"].get(REPORT_SHARE, [math.nan, math.nan])
            lines.append(f"| {r['workers']} | {r['explain_on_device']} | {r['figures'].get('backend')}, "
                         f"{r['figures']['batch']} | {r['frames']} | {r['model_fps']:.0f} | {r['workers_fps']:.0f} | "
                         f"{r['e2e_fps']:.0f} | {p50:.0f} / {p95:.0f} ms |")
    summary = figures.get("summary") or {}
    if "best" in summary:
        best = summary["best"]
        lines += ["", f"CPU per process, best run (W={best['workers']}), end to end",
                  "| process | CPU-ms per frame (all its processes) | cores per process |", "|---|---:|---:|"]
        for group, f in summary["cpu_split_per_process"]["end to end"].items():
            count = f" ×{f['processes']}" if f["processes"] > 1 else ""
            lines.append(f"| {group}{count} | {f['cpu_ms_per_frame']:.2f} | {f['cores_per_process']:.2f} |")
    profile = figures.get("profile")
    spy = ((profile or {}).get("py_spy_profiles") or {})
    for who, p in spy.items():
        if p.get("self"):
            lines += ["", f"py-spy, {who}: top functions by share of samples ({p['samples']} samples)",
                      "| function (self) | share |", "|---|---:|"]
            lines += [f"| {fn} | {share:.1%} |" for fn, share in p["self"][:8]]
        elif p.get("error"):
            lines += ["", f"py-spy, {who}: {p['error']}"]
    for name, path in ((figures.get("torch_profile") or {}).get("paths") or {}).items():
        if "error" in path:
            lines += ["", f"torch.profiler, {name}: {path['error']}"]
            continue
        busy = f", device busy {path['device_busy_share']:.0%}" if "device_busy_share" in path else ""
        lines += ["", f"torch.profiler, {name}: {path['frames_per_s']:.0f} frames/s, "
                      f"{path['process_cpu_ms_per_frame']:.2f} CPU-ms per frame{busy}",
                  "| operator | CPU-ms per frame (self) | device-ms per frame (self) |", "|---|---:|---:|"]
        device = {op: ms for op, ms, _ in path.get("top_device_ms_per_frame", [])}
        ops = [op for op, _, _ in path["top_cpu_ms_per_frame"][:6]]
        ops += [op for op in list(device)[:6] if op not in ops]
        cpu = {op: ms for op, ms, _ in path["top_cpu_ms_per_frame"]}
        lines += [f"| {op} | {cell(cpu.get(op))} | {cell(device.get(op))} |" for op in ops]
    if summary:
        lines += [""]
        if "best" in summary:
            best, lat, target = summary["best"], summary["latency_at_70_percent_ms"], summary["target"]
            lines.append(f"best end to end: {best['e2e_fps']:.0f} frames/s with {best['workers']} workers "
                         f"(target {target['fps']:.0f}: {'met' if target['fps_met'] else 'not met'}); "
                         f"p95 at 70 % ({lat['fps']:.0f} frames/s): "
                         + (f"{lat['p95']:.0f} ms" if lat["p95"] is not None else "not measured")
                         + f" (target < {target['p95_ms']:.0f} ms: {'met' if target['p95_met'] else 'not met'})")
            if summary.get("explain_on_device_gain"):
                lines.append(f"explain on device on / off at W={best['workers']}: "
                             f"{summary['explain_on_device_gain']:.2f}×")
            lines.append(f"bottleneck: {summary['bottleneck']['text']}")
        else:
            lines.append(summary["text"])
    return lines


# command line ------------------------------------------------------------------------------------
def parser() -> BenchParser:
    p = BenchParser(__doc__, quick={"device": "cpu", "frames": 24, "budget_s": 240, "repeats": 1, "parity_images": 30,
                                  "iterations": 2})
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the model runs (default: cuda)")
    p.add_argument("--budget-s", type=float, default=480,
                   help="hard wall-time budget of the whole sweep: a step that no longer fits is skipped, the "
                        "results file is written anyway (default: 480)")
    p.add_argument("--backends", nargs="+", choices=BACKEND_NAMES, metavar="NAME", default=None,
                   help="step 1's backends (default: torch torch-fp16 torch-bf16 on cuda, torch on cpu)")
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help="step 1's batch sizes (default: 32 64 128 256 on cuda, 8 on cpu)")
    p.add_argument("--repeats", type=int, default=3, help="step 1's timed calls per cell (default: 3)")
    p.add_argument("--parity-images", type=int, default=None, metavar="N",
                   help="step 1 checks parity on the first N of batch_sweep's 180 parity images (default: all)")
    p.add_argument("--workers", nargs="+", type=int, default=None,
                   help="worker processes per pipeline run, explain on device on (default: 2 4 8 on cuda, 1 2 on cpu)")
    p.add_argument("--pipeline-backend", default="best", choices=["best", *BACKEND_NAMES], metavar="NAME",
                   help="the workers' backend; best: the fastest of step 1 with top-1 parity >= 99 %% (default)")
    p.add_argument("--pipeline-batch", type=int, default=None,
                   help="the workers' micro-batch (default: where step 1's explained rate saturates)")
    p.add_argument("--frames", type=int, default=3000,
                   help="frames per measurement of the first pipeline run; later runs are sized to --run-s "
                        "(default: 3000)")
    p.add_argument("--max-frames", type=int, default=30_000, help="upper bound on frames per run (default: 30000)")
    p.add_argument("--run-s", type=float, default=60, help="wall seconds a pipeline run is sized for (default: 60)")
    p.add_argument("--min-run-s", type=float, default=30,
                   help="a pipeline run is skipped when it would get less than this, or than 80 %% of the time "
                        "the previous run's rates predict for it (default: 30)")
    p.add_argument("--profile-s", type=float, default=20,
                   help="seconds of streaming the profiled run is sized for (default: 20)")
    p.add_argument("--reserve-profile-s", type=float, default=90,
                   help="budget the pipeline runs leave for the profiles when sizing themselves (default: 90)")
    p.add_argument("--iterations", type=int, default=20, help="torch.profiler loop: batches profiled (default: 20)")
    p.add_argument("--py-spy", default=None, metavar="PATH",
                   help="the py-spy executable (default: py-spy on PATH or beside the interpreter; without it the "
                        "profile is torch.profiler's model-only loop and the CPU split)")
    p.add_argument("--logs", default=None, metavar="DIR", help="the steps' output (default: a temporary folder)")
    for action in p._actions:  # BenchParser's wording fits one bench, not a sweep of several
        if action.dest == "quick":
            action.help = ("the same steps, tiny, on the CPU (workers 1 and 2, backend torch, batch 8, latency at "
                           f"70 %% only), as {as_flags(p.quick)}: a few minutes; the results are marked quick")
        elif action.dest == "no_save":
            action.help = "print the table only, write no gpu_sweep JSON (the steps' benches still write theirs)"
    p.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--torch-profile-child", action="store_true", help=argparse.SUPPRESS)
    return p


def main() -> None:
    started = time.monotonic()  # the budget counts the sweep's own start-up too
    p = parser()
    args = p.parse_args()
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.profile_child:
        return profile_child(args)
    if args.torch_profile_child:
        return torch_profile_child(args)
    if any(n < 1 for n in [*args.workers, *args.batches, args.frames, args.repeats, args.iterations]):
        p.error("--workers, --batches, --frames, --repeats and --iterations must be at least 1")
    if args.py_spy and not os.access(args.py_spy, os.X_OK):
        p.error(f"--py-spy {args.py_spy}: no executable there")

    import torch  # after --help and the argument checks: importing it takes seconds

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{NAME}: --device cuda, but torch sees no CUDA device on this machine; "
                 "run it on the GPU machine, or --device cpu (--quick) to try it here")

    def terminate(signum, frame):  # a kill (a time limit, say) stops the step in flight and writes the summary
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    sweep = Sweep(args, started)
    print(f"{NAME}: writing {portable(sweep.path)} after every step; step logs in {sweep.logs}", file=sys.stderr)
    sweep.write()
    finished = False
    try:
        model_only_step(sweep)
        backend, batch, why = pick_pipeline_config(sweep)
        sweep.figures["pipeline_config"] = {"backend": backend, "batch": batch, "why": why}
        best = pipeline_step(sweep, backend, batch)
        profile_step(sweep, best, backend, batch)
        finished = True
    finally:  # also on Ctrl-C or an error: what was measured gets its summary
        try:
            summarize(sweep)
        except Exception as exc:  # the figures are still worth writing
            sweep.figures["summary"] = {"text": f"no summary: {type(exc).__name__}: {exc}"}
        sweep.figures["complete"] = finished
        sweep.figures["wall_s"] = round(time.monotonic() - sweep.started, 1)
        lines = render(sweep.figures, sweep.header["machine"])
        sweep.write(lines)
        print("\n".join(lines), flush=True)
        if not args.no_save:
            print(f"wrote {portable(sweep.path)}", file=sys.stderr)


if __name__ == "__main__":
    main()
