"""End-to-end pipeline against model-only throughput, same cores and worker count, in one run.

    .venv/bin/python bench/pipeline_throughput.py --workers 2 --frames 240

1. model only: W processes, each explaining (label + Grad-CAM + overlay RGB) decoded
   frames in batches, with the threads a worker gets; aggregate frames/s. Measured
   before and after steps 2-4; the ratios use the mean of the two.
2. workers only: frames produced into the queue before the workers start; frames/s
   from the first result to the last (fetch, decode, explain, overlay PNG upload,
   publish), with Redis and the S3 server on the same cores.
3. end to end: the producer (unpaced) uploads to S3 and enqueues in Redis while the
   workers run; frames/s from the first upload to the last result. Redis, the S3
   server and the producer share the same cores, as they would on a single box.
4. capture-to-result latency p50/p95 with the producer paced at 50% and 90% of the
   end-to-end capacity measured in step 3.

During step 3 it also counts the CPU seconds each process used (/proc), to show
where the cores went: workers, the S3 server, Redis, or the producer.

With ``--worker-cores 0 --service-cores 1`` the model-only processes and the workers
are pinned to the first set of cores and Redis, the S3 server and the producer to
the second, as when those services run on their own hosts: the ratio then measures
the pipeline overhead inside the worker alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from steelsight.clients import redis_client
from steelsight.contract import Settings
from steelsight.devstack import free_port, redis_server, s3_server, wait_until
from steelsight.producer.service import Producer, replay, run_producer

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"


def model_only_child(frames: int, batch: int, checkpoint: str | None) -> None:
    """One worker's model work with no I/O; prints frames/s after a warm-up batch."""
    from steelsight.model.imageio import read_gray
    from steelsight.model.predictor import Predictor

    predictor = Predictor.load(checkpoint, device="cpu", batch_size=batch)
    images = [read_gray(p) for p in sorted(SAMPLES.rglob("*.bmp"))]
    work = [images[i % len(images)] for i in range(frames)]
    predictor.explain(work[:batch])
    start = time.perf_counter()
    for i in range(0, frames, batch):
        predictor.explain(work[i : i + batch])
    print(json.dumps({"fps": frames / (time.perf_counter() - start)}))


def worker_env(settings: Settings, threads: int) -> dict[str, str]:
    return dict(os.environ) | settings.to_env() | {"OMP_NUM_THREADS": str(threads)}


def pinned(cores: set[int] | None):
    """preexec_fn that pins a child process to ``cores`` (None: no pinning)."""
    return None if cores is None else (lambda: os.sched_setaffinity(0, cores))


def pin_process(pid: int, cores: set[int] | None) -> None:
    """Pin every thread of a running process."""
    if cores is not None:
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), cores)


def parse_cores(text: str | None) -> set[int] | None:
    return None if text is None else {int(c) for c in text.split(",")}


def model_only(workers: int, frames: int, batch: int, threads: int, checkpoint: str | None,
               cores: set[int] | None = None) -> float:
    env = dict(os.environ) | {"OMP_NUM_THREADS": str(threads)}
    args = [sys.executable, __file__, "--model-only-child", "--frames", str(frames // workers), "--batch", str(batch)]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True, preexec_fn=pinned(cores))
             for _ in range(workers)]
    return sum(json.loads(p.communicate()[0].strip().splitlines()[-1])["fps"] for p in procs)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_split(pids: dict[str, list[int]], run) -> tuple[object, dict[str, float]]:
    """Run ``run()``; return its value and each group's CPU seconds spent meanwhile."""
    before = {name: sum(cpu_seconds(p) for p in group) for name, group in pids.items()}
    value = run()
    return value, {name: sum(cpu_seconds(p) for p in group) - before[name] for name, group in pids.items()}


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


def results(settings: Settings, conn) -> list[dict]:
    return [json.loads(conn.get(k)) for k in conn.keys(f"{settings.key_prefix}:result:*")]


def run_stream(settings: Settings, conn, line: str, frames: int, fps: float | None
               ) -> tuple[float, float, list[float]]:
    """Produce ``frames``; return frames/s from first upload to last result and from first result to last
    (the steady rate, without the pipeline's fill time), and capture-to-result seconds."""
    producer = Producer(settings, line, "cam-1")
    started = datetime.now().astimezone()
    run_producer(producer, replay(SAMPLES, loop=True, limit=frames), fps)
    wait_until(lambda: sum(1 for k in conn.scan_iter(f"{settings.key_prefix}:result:{line}__*")) >= frames, 600,
               f"{frames} results")
    done = [r for r in results(settings, conn) if r["line_id"] == line]
    finished = sorted(datetime.fromisoformat(r["finished_at"]) for r in done)
    latency = [(datetime.fromisoformat(r["finished_at"]) - datetime.fromisoformat(r["captured_at"])).total_seconds()
               for r in done]
    steady = (len(finished) - 1) / (finished[-1] - finished[0]).total_seconds()
    return frames / (finished[-1] - started).total_seconds(), steady, latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=240, help="frames per measurement")
    parser.add_argument("--batch", type=int, default=8, help="worker micro-batch size")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--worker-cores", default=None, metavar="LIST",
                        help="pin model-only processes and workers to these cores, e.g. 0 (default: no pinning)")
    parser.add_argument("--service-cores", default=None, metavar="LIST",
                        help="pin Redis, the S3 server and the producer to these cores, e.g. 1")
    parser.add_argument("--model-only-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model_only_child:
        return model_only_child(args.frames, args.batch, args.checkpoint)

    worker_cores, service_cores = parse_cores(args.worker_cores), parse_cores(args.service_cores)
    cores = len(worker_cores) if worker_cores else os.cpu_count() or 1
    threads = max(cores // args.workers, 1)
    model_before = model_only(args.workers, args.frames, args.batch, threads, args.checkpoint, worker_cores)

    workdir = Path(tempfile.mkdtemp(prefix="steelsight-pipeline-"))
    redis, s3 = redis_server(workdir).start(), s3_server(workdir).start()
    for pid in (redis.proc.pid, s3.proc.pid, os.getpid()):
        pin_process(pid, service_cores)
    procs, ports = [], []
    try:
        settings = Settings(redis_url=f"redis://127.0.0.1:{redis.port}/0", s3_endpoint=f"127.0.0.1:{s3.port}",
                            s3_access_key="bench", s3_secret_key="bench", device="cpu", batch_size=args.batch,
                            checkpoint=args.checkpoint, max_queue_depth=10_000)
        conn = redis_client(settings)
        run_producer(Producer(settings, "prefill", "cam-1"), replay(SAMPLES, loop=True, limit=args.frames))
        for i in range(args.workers):
            ports.append(free_port())
            env = worker_env(settings.model_copy(update={"metrics_port": ports[-1]}), threads)
            procs.append(subprocess.Popen([sys.executable, "-m", "steelsight.cli", "worker", "--name", f"bench{i}"],
                                          env=env, stdout=open(workdir / f"worker{i}.log", "wb"),  # noqa: SIM115
                                          stderr=subprocess.STDOUT, preexec_fn=pinned(worker_cores)))
        wait_until(lambda: len(results(settings, conn)) >= args.frames, 600, "the prefilled frames")
        prefilled = batch_totals(ports)
        finished = sorted(datetime.fromisoformat(r["finished_at"]) for r in results(settings, conn))
        workers_fps = (len(finished) - 1) / (finished[-1] - finished[0]).total_seconds()
        pids = {"workers": [p.pid for p in procs], "S3 server (moto)": [s3.proc.pid], "Redis": [redis.proc.pid],
                "producer": [os.getpid()]}
        (e2e_fps, steady_fps, _), cpu = cpu_split(pids, lambda: run_stream(settings, conn, "capacity", args.frames,
                                                                            None))
        streamed = batch_totals(ports)
        latency = {share: run_stream(settings, conn, f"load{int(share * 100)}", max(args.frames // 2, 20),
                                     share * e2e_fps)[2] for share in (0.5, 0.9)}
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        redis.stop()
        s3.stop()
    # model only again: this machine's speed drifts, and a single baseline moved the ratios by ±0.07
    model_after = model_only(args.workers, args.frames, args.batch, threads, args.checkpoint, worker_cores)
    model_fps = (model_before + model_after) / 2

    placement = (f"workers on cores {args.worker_cores}, services on cores {args.service_cores}"
                 if worker_cores or service_cores else "all processes on all cores")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores ({placement}), {args.workers} "
          f"workers x {threads} threads, batch {args.batch}, torch {torch.__version__}; logs in {workdir}")
    print("| measure | value |\n|---|---:|")
    print(f"| model only, {args.workers} processes (explain, no I/O), mean of before and after | {model_fps:.2f} "
          f"frames/s ({model_before:.2f} / {model_after:.2f}) |")
    print(f"| workers only, queue prefilled (fetch → explain → overlay upload → publish) | {workers_fps:.2f} "
          "frames/s |")
    print(f"| end to end, producer → S3 → Redis → workers → results | {e2e_fps:.2f} frames/s |")
    print(f"| **workers only / model only** | **{workers_fps / model_fps:.2f}** |")
    print(f"| **end to end / model only** | **{e2e_fps / model_fps:.2f}** |")
    print(f"| end to end, first result to last (no fill time: {steady_fps:.2f} frames/s) / model only | "
          f"{steady_fps / model_fps:.2f} |")
    print(f"| mean micro-batch: workers only / end to end | {mean_batch((0, 0), prefilled):.1f} / "
          f"{mean_batch(prefilled, streamed):.1f} frames |")
    total = sum(cpu.values())
    print("| CPU share during end to end: " + ", ".join(f"{name} {100 * sec / total:.0f}%" for name, sec in cpu.items())
          + f" | {total:.1f} CPU-s |")
    for share, values in latency.items():
        p50, p95 = np.percentile(values, [50, 95])
        print(f"| capture-to-result at {share:.0%} of capacity ({share * e2e_fps:.1f} fps), p50 / p95 | "
              f"{p50 * 1000:.0f} / {p95 * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
