"""End-to-end pipeline against model-only throughput, same cores and worker count, in one run.

    python -m bench.pipeline_throughput --workers 2 --frames 240 --rounds 2
    python -m bench.pipeline_throughput --workers 1 --frames 240 --worker-cores 0 --service-cores 1 --rounds 3
    python -m bench.pipeline_throughput --quick

1. model only: W processes, each explaining (label + Grad-CAM + overlay RGB) decoded
   frames in batches, with the threads a worker gets; aggregate frames/s. Measured
   before the first round and after each; a round's ratios use the runs either side
   of it (the machine's speed drifts by several percent within a run). ``--model-once``
   measures it before the first round only, one start of the model-only processes less.
2. workers only: frames queued while the workers are stopped (SIGSTOP); frames/s from
   the end of the first batch to the last result (fetch, decode, explain, overlay
   encode and upload, publish), with Redis and the S3 server on the same cores.
3. end to end: the producer (unpaced) uploads to S3 and enqueues in Redis while the
   workers run; frames/s from the first upload to the last result. Redis, the S3
   server and the producer share the same cores, as they would on a single box.
4. capture-to-result latency p50/p95 with the producer paced at shares of the end-to-end
   capacity measured in step 3 (median over the rounds): ``--latency-shares``, 50% and 90%
   unless given.
5. model only beside the producer: step 1 again, while this process streams frames at
   the end-to-end rate into S3 and a queue no worker reads. It shows what the
   services' load alone costs the model on a box whose cores share caches and memory
   (``--skip-beside`` leaves it out).

Steps 1-3 repeat ``--rounds`` times, interleaved; the table then gives each value's
median and range. While the workers drain the prefilled queue (step 2) and during step 3
it also counts the CPU seconds each process used (/proc), to show where the cores went:
workers, the S3 server, Redis, or the producer.

With ``--worker-cores 0 --service-cores 1`` the model-only processes and the workers
are pinned to the first set of cores and Redis, the S3 server and the producer to
the second, as when those services run on their own hosts: the ratio then measures
the pipeline overhead inside the worker alone.

The workers take their other settings from the environment (``STEELSIGHT_*``), e.g.
``STEELSIGHT_EXPLAIN_ON_DEVICE=on``; the result records the one that decides the overlay path.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import (
    ROOT,
    SAMPLES,
    BenchParser,
    cpu_split,
    describe,
    emit,
    finish_times,
    local_stack,
    parse_cores,
    pinned,
    rate_after_first_batch,
    spread,
    start_worker,
    wait_for_results,
)
from steelsight.clients import redis_client
from steelsight.contract import Settings
from steelsight.devstack import free_port
from steelsight.model.inference.backends import BACKEND_NAMES
from steelsight.producer.service import Producer, replay, run_producer

NAME = "pipeline_throughput"


def model_only_child(frames: int, batch: int, checkpoint: str | None, device: str, backend: str) -> None:
    """One worker's model work with no I/O; prints frames/s after a warm-up batch. With
    STEELSIGHT_EXPLAIN_ON_DEVICE in force (as the workers read it) that is the device path, JPEG included."""
    from steelsight.model.inference.imageio import read_gray
    from steelsight.model.inference.ondevice import DeviceExplainer
    from steelsight.model.inference.predictor import Predictor

    predictor = Predictor.load(checkpoint, device=device, batch_size=batch, backend=backend)
    on_device = Settings().explains_on_device(predictor.device.type)
    explain = DeviceExplainer(predictor).explain if on_device else predictor.explain
    images = [read_gray(p) for p in sorted(SAMPLES.rglob("*.bmp"))]
    work = [images[i % len(images)] for i in range(frames)]
    explain(work[:batch])
    start = time.perf_counter()
    for i in range(0, frames, batch):
        explain(work[i : i + batch])
    print(json.dumps({"fps": frames / (time.perf_counter() - start), "explain_on_device": on_device}))


def start_model_only(workers: int, frames: int, batch: int, threads: int, checkpoint: str | None, device: str,
                     backend: str, cores: set[int] | None = None) -> list[subprocess.Popen]:
    env = dict(os.environ) | {"OMP_NUM_THREADS": str(threads)}
    args = [sys.executable, "-m", f"bench.{NAME}", "--model-only-child", "--frames", str(frames // workers),
            "--batch", str(batch), "--device", device, "--backend", backend]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    return [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, preexec_fn=pinned(cores))
            for _ in range(workers)]


def model_only_fps(procs: list[subprocess.Popen]) -> float:
    return sum(json.loads(p.communicate()[0].strip().splitlines()[-1])["fps"] for p in procs)


def model_only_beside_producer(settings: Settings, fps: float, workers: int, frames: int, batch: int, threads: int,
                               checkpoint: str | None, cores: set[int] | None) -> float:
    """Model only while this process streams frames at ``fps`` into S3 and a queue no worker reads.

    The service cores then carry the producer's and the S3 server's share of the
    end-to-end load, so the model runs beside the same neighbours as in end to end.
    """
    procs = start_model_only(workers, frames, batch, threads, checkpoint, settings.device, settings.backend, cores)
    producer = Producer(settings.model_copy(update={"queue_name": "bench-neighbour-load"}), "neighbour", "cam-1")
    frames_while_running = itertools.takewhile(lambda _: any(p.poll() is None for p in procs),
                                               replay(SAMPLES, loop=True))
    run_producer(producer, frames_while_running, fps)
    return model_only_fps(procs)


def batch_totals(ports: list[int]) -> tuple[float, float]:
    """Frames and micro-batches the workers have run so far, from their Prometheus endpoints."""
    totals = {"steelsight_worker_batch_size_sum": 0.0, "steelsight_worker_batch_size_count": 0.0}
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
    return totals["steelsight_worker_batch_size_sum"], totals["steelsight_worker_batch_size_count"]


def mean_batch(before: tuple[float, float], after: tuple[float, float]) -> float:
    return (after[0] - before[0]) / max(after[1] - before[1], 1)


def run_stream(settings: Settings, conn, line: str, frames: int, fps: float | None
               ) -> tuple[float, float, list[float]]:
    """Produce ``frames``; return frames/s from first upload to last result and from first result to last
    (the steady rate, without the pipeline's fill time), and capture-to-result seconds."""
    from datetime import datetime

    producer = Producer(settings, line, "cam-1")
    started = datetime.now().astimezone()
    run_producer(producer, replay(SAMPLES, loop=True, limit=frames), fps)
    done = wait_for_results(settings, conn, line, frames)
    finished = finish_times(done)
    latency = [(datetime.fromisoformat(r["finished_at"]) - datetime.fromisoformat(r["captured_at"])).total_seconds()
               for r in done]
    steady = rate_after_first_batch(finished, settings.batch_size)
    return frames / (finished[-1] - started).total_seconds(), steady, latency


def run_prefilled(settings: Settings, conn, line: str, frames: int, workers: list[subprocess.Popen],
                  pids: dict[str, list[int]]) -> tuple[float, dict[str, float]]:
    """Queue ``frames`` while the workers are stopped (SIGSTOP), let them go; frames/s after the first batch,
    and each process group's CPU seconds while the workers drained the queue."""
    for p in workers:
        p.send_signal(signal.SIGSTOP)
    try:
        run_producer(Producer(settings, line, "cam-1"), replay(SAMPLES, loop=True, limit=frames))
    finally:
        for p in workers:
            p.send_signal(signal.SIGCONT)
    done, cpu = cpu_split(pids, lambda: wait_for_results(settings, conn, line, frames))
    return rate_after_first_batch(finish_times(done), settings.batch_size), cpu


def parser() -> BenchParser:
    p = BenchParser(__doc__, quick={"workers": 1, "frames": 32, "rounds": 1})
    p.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    p.add_argument("--frames", type=int, default=240, help="frames per measurement (default: 240)")
    p.add_argument("--batch", type=int, default=8, help="worker micro-batch size (default: 8)")
    p.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda: where the model-only processes and the workers run the model; "
                        "on cuda, W workers share the one GPU")
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES, metavar="NAME",
                   help=f"trunk backend of the model-only processes and the workers: {', '.join(BACKEND_NAMES)} "
                        "(default: auto)")
    p.add_argument("--latency-shares", type=float, nargs="+", default=[0.5, 0.9], metavar="SHARE",
                   help="shares of the end-to-end capacity to pace the producer at for the latency runs "
                        "(default: 0.5 0.9)")
    p.add_argument("--model-once", action="store_true",
                   help="measure model only before the first round only, not after each too")
    p.add_argument("--skip-beside", action="store_true",
                   help="leave out step 5, model only beside the producer (one model-only run less)")
    p.add_argument("--worker-cores", default=None, metavar="LIST",
                   help="pin model-only processes and workers to these cores, e.g. 0 or 0-7 (default: no pinning)")
    p.add_argument("--service-cores", default=None, metavar="LIST",
                   help="pin Redis, the S3 server and the producer to these cores, e.g. 1 or 8-15")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat workers only, end to end and model only this many times, interleaved, and "
                        "report each ratio's median and range (default: 1)")
    p.add_argument("--model-only-child", action="store_true", help=argparse.SUPPRESS)
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    if args.model_only_child:
        return model_only_child(args.frames, args.batch, args.checkpoint, args.device, args.backend)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available here")
    if not all(0 < share <= 1 for share in args.latency_shares):
        p.error("--latency-shares: each share must be above 0 and at most 1")
    worker_cores, service_cores = parse_cores(args.worker_cores), parse_cores(args.service_cores)
    cores = len(worker_cores) if worker_cores else os.cpu_count() or 1
    threads = max(cores // args.workers, 1)

    def measure_model() -> float:
        return model_only_fps(start_model_only(args.workers, args.frames, args.batch, threads, args.checkpoint,
                                               args.device, args.backend, worker_cores))

    model = [measure_model()]
    workdir = Path(tempfile.mkdtemp(prefix="steelsight-pipeline-"))
    procs, rounds = [], []
    with local_stack(workdir, service_cores, device=args.device, batch_size=args.batch, checkpoint=args.checkpoint,
                     backend=args.backend, max_queue_depth=max(10_000, 2 * args.frames)) as (settings, servers):
        try:
            conn = redis_client(settings)
            ports = [free_port() for _ in range(args.workers)]
            procs = [start_worker(settings.model_copy(update={"metrics_port": port}), f"bench{i}", threads,
                                  worker_cores, workdir / f"worker{i}.log") for i, port in enumerate(ports)]
            run_stream(settings, conn, "warmup", 4 * args.batch * args.workers, None)  # model load, first batches
            pids = {"workers": [p.pid for p in procs], "S3 server (SeaweedFS)": [servers["s3"].proc.pid],
                    "Redis": [servers["redis"].proc.pid], "producer": [os.getpid()]}
            for r in range(args.rounds):
                start = batch_totals(ports)
                workers_fps, cpu_prefilled = run_prefilled(settings, conn, f"prefilled{r}", args.frames, procs, pids)
                prefilled = batch_totals(ports)
                (e2e_fps, steady_fps, _), cpu = cpu_split(
                    pids, lambda r=r: run_stream(settings, conn, f"capacity{r}", args.frames, None))
                streamed = batch_totals(ports)
                if not args.model_once:
                    model.append(measure_model())  # the workers wait on an empty queue meanwhile
                before, after = model[-1 if args.model_once else -2], model[-1]
                print(f"round {r + 1}: model only {before:.1f} -> {after:.1f}, workers only "
                      f"{workers_fps:.1f}, end to end {e2e_fps:.1f} frames/s", file=sys.stderr, flush=True)
                rounds.append({"model": (before + after) / 2, "workers": workers_fps, "e2e": e2e_fps,
                               "steady": steady_fps, "batch_prefilled": mean_batch(start, prefilled),
                               "batch_e2e": mean_batch(prefilled, streamed), "cpu": cpu,
                               "cpu_prefilled": cpu_prefilled})
            e2e_median = float(np.median([r["e2e"] for r in rounds]))
            latency = {share: run_stream(settings, conn, f"load{int(share * 100)}", max(args.frames // 2, 20),
                                         share * e2e_median)[2] for share in args.latency_shares}
            for p in procs:  # the neighbour-load stream below must not be worked on
                p.terminate()
                p.wait(timeout=30)
            procs = []
            model_beside = None if args.skip_beside else model_only_beside_producer(
                settings, e2e_median, args.workers, args.frames, args.batch, threads, args.checkpoint, worker_cores)
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=30)
    figures = {
        "workers": args.workers, "threads": threads, "batch": args.batch, "frames": args.frames,
        "device": args.device, "backend": args.backend, "explain_on_device": settings.explain_on_device,
        "worker_cores": args.worker_cores, "service_cores": args.service_cores,
        "model_only": model, "model_once": args.model_once, "rounds": rounds,
        "model_only_beside_producer": model_beside,
        "e2e_over_model": [r["e2e"] / r["model"] for r in rounds],
        "workers_over_model": [r["workers"] / r["model"] for r in rounds],
        "latency_p50_p95_s": {f"{share:.0%}": list(np.percentile(v, [50, 95])) for share, v in latency.items()}}
    print(f"# worker logs in {workdir}", file=sys.stderr)
    emit(NAME, args, render(figures), figures)


def render(record: dict) -> list[str]:
    """The table, from the figures a run saves (older results without ``threads`` included)."""
    rounds, model, workers = record["rounds"], record["model_only"], record["workers"]
    machine = record.get("machine")  # older results: a string, "x86_64, 2 cores"
    machine_line = describe(machine) if isinstance(machine, dict) else machine or describe()
    if "threads" in record:
        threads = record["threads"]
    else:
        pinned_to = parse_cores(record["worker_cores"])
        cores = len(pinned_to) if pinned_to else int(re.search(r"(\d+) cores", machine_line).group(1))
        threads = max(cores // workers, 1)

    def col(key: str) -> list[float]:
        return [r[key] for r in rounds]

    def ratio(key: str) -> str:
        return spread([r[key] / r["model"] for r in rounds])

    placement = (f"workers on cores {record['worker_cores']}, services on cores {record['service_cores']}"
                 if record["worker_cores"] or record["service_cores"] else "all processes on all cores")
    lines = [f"# {machine_line} ({placement}), {workers} workers x {threads} threads, batch {record['batch']}, "
             f"{record['frames']} frames per measurement, device {record['device']}"
             + (f", backend {record['backend']}, explain on device {record['explain_on_device']}"
                if "backend" in record else "")]
    if len(rounds) > 1:
        lines.append(f"# {len(rounds)} rounds, each: workers only, end to end, model only; each round's ratios use "
                     "the mean of the model-only runs either side of it. Values: median (min–max)."
                     if not record.get("model_once") else
                     f"# {len(rounds)} rounds, each: workers only, end to end; the ratios use the one model-only "
                     "run before them. Values: median (min–max).")
    e2e_median = float(np.median(col("e2e")))
    lines += [
        "| measure | value |", "|---|---:|",
        f"| model only, {workers} processes (explain, no I/O) | {spread(model)} frames/s |",
        f"| workers only, queue prefilled (fetch → explain → overlay upload → publish) | {spread(col('workers'))} "
        "frames/s |",
        f"| end to end, producer → S3 → Redis → workers → results | {spread(col('e2e'))} frames/s |",
        f"| **workers only / model only** | **{ratio('workers')}** |",
        f"| **end to end / model only** | **{ratio('e2e')}** |",
        f"| end to end, first result to last (no fill time) / model only | {ratio('steady')} |"]
    if record["model_only_beside_producer"] is not None:
        lines.append("| model only beside the producer streaming at the end-to-end rate (no workers) / model only | "
                     f"{record['model_only_beside_producer'] / float(np.median(model)):.2f} |")
    lines += [
        f"| mean micro-batch: workers only / end to end | {np.mean(col('batch_prefilled')):.1f} / "
        f"{np.mean(col('batch_e2e')):.1f} frames |"]
    for phase, key in (("workers only", "cpu_prefilled"), ("end to end", "cpu")):
        cpu = {name: sum(r[key][name] for r in rounds) for name in rounds[0][key]}
        total = sum(cpu.values())
        lines.append(f"| CPU share during {phase}: " + ", ".join(f"{name} {100 * sec / total:.0f}%"
                                                                 for name, sec in cpu.items())
                     + f" | {total:.1f} CPU-s |")
    for share, (p50, p95) in record["latency_p50_p95_s"].items():
        fps = float(share.rstrip("%")) / 100 * e2e_median
        lines.append(f"| capture-to-result at {share} of capacity ({fps:.1f} fps), p50 / p95 | "
                     f"{p50 * 1000:.0f} / {p95 * 1000:.0f} ms |")
    return lines


if __name__ == "__main__":
    main()
