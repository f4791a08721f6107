"""What a promotion costs a running line on CPU: how soon every worker switches, and the latency it adds.

    python -m bench.model_switch                 # 2 workers, the shipped checkpoint, 6 frames/s
    python -m bench.model_switch --quick

Redis and SeaweedFS start under a scratch folder; the shipped checkpoint (A) and a copy
of it with other metadata (B: the same weights, another sha256, so its runtimes are
built afresh as for any new checkpoint) are pushed to the registry, A is promoted and
the workers start on it. The producer streams frames at ``--fps``; after
``--before`` seconds B is promoted, and the stream goes on for ``--after`` seconds.

It reports, from one run:

- the promotion latency: ``model promote`` to each worker's first batch on B
  (fetch, load with the worker's backend, smoke check on the bundled samples, next batch);
- capture-to-result latency p50/p95 of the frames captured before the promotion
  (steady), while workers were loading B (switch), and after every worker switched,
  as ratios to the steady ones;
- frames lost or read twice (must be 0).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from bench.harness import BenchParser, emit, local_stack, ratio, results, start_worker, wait_for_results
from steelsight.clients import ObjectStore, redis_client
from steelsight.contract import SAMPLE_FRAMES, WorkerModelState
from steelsight.devstack import free_port, wait_until
from steelsight.model.inference.checkpoint import SHIPPED_CHECKPOINT, load_checkpoint, save_checkpoint
from steelsight.producer.service import Producer, replay, run_producer
from steelsight.registry import ModelRegistry

LINE = "bench-switch"


def challenger_copy(source: Path, folder: Path) -> Path:
    """The same network under a new sha256: a new checkpoint to the registry and to the runtimes' caches."""
    loaded = load_checkpoint(source)
    # a new sha256 each run: the runtimes' caches (ONNX export, fastest-runtime record) start cold
    loaded.meta.training = {**loaded.meta.training, "bench_copy": datetime.now().isoformat()}
    path = folder / "challenger.safetensors"
    save_checkpoint(loaded.model, loaded.meta, path, half=True, ood=loaded.ood)  # stored as the shipped one is
    return path


def quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"frames": 0, "p50": float("nan"), "p95": float("nan")}
    return {"frames": len(values), "p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}


def main() -> None:
    parser = BenchParser(__doc__, quick={"before": 8.0, "after": 15.0, "fps": 4.0})
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fps", type=float, default=6.0, help="producer rate, below the workers' capacity")
    parser.add_argument("--before", type=float, default=20.0, help="seconds of stream before the promotion")
    parser.add_argument("--after", type=float, default=40.0, help="seconds of stream after it")
    parser.add_argument("--backend", default="auto", help="the workers' backend (default: auto, as deployed)")
    parser.add_argument("--checkpoint", type=Path, default=SHIPPED_CHECKPOINT)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-switch-") as tmp:
        workdir = Path(tmp)
        with local_stack(workdir, key_prefix="bench", backend=args.backend, device="cpu", batch_size=8,
                         model_cache_dir=str(workdir / "cache")) as (settings, _):
            store = ObjectStore(settings)
            store.ensure_buckets()
            conn = redis_client(settings)
            registry = ModelRegistry(settings, store, conn)
            a = registry.push(args.checkpoint, "bench").sha256
            b = registry.push(challenger_copy(args.checkpoint, workdir), "bench").sha256
            registry.promote(a, "bench")
            threads = max(1, len(os.sched_getaffinity(0)) // args.workers)
            procs = [start_worker(settings.model_copy(update={"metrics_port": free_port()}), f"w{i}", threads, None,
                                  workdir / f"w{i}.log") for i in range(args.workers)]
            try:
                wait_until(lambda: conn.hlen(settings.model_workers_key) >= args.workers or
                           any(p.poll() is not None for p in procs), 300, "workers to start")
                if any(p.poll() is not None for p in procs):
                    raise SystemExit("a worker quit at start:\n" + (workdir / "w0.log").read_text()[-3000:])
                frames = int(args.fps * (args.before + args.after))
                producer = Producer(settings, LINE, "cam-1")
                stream = threading.Thread(target=run_producer, args=(producer, replay(SAMPLE_FRAMES, True, frames),
                                                                     args.fps), daemon=True)
                stream.start()
                time.sleep(args.before)
                promoted = datetime.now().astimezone()
                registry.promote(b, "bench")

                def states() -> list[WorkerModelState]:
                    return [WorkerModelState.model_validate_json(v)
                            for v in conn.hvals(settings.model_workers_key)]
                wait_until(lambda: all(s.sha256 == b for s in states()), 300, "every worker to switch")
                switched = [(s.switched_at - promoted).total_seconds() for s in states()]
                stream.join()
                done = wait_for_results(settings, conn, LINE, frames)
                time.sleep(1.0)
                done = results(settings, conn, LINE)
                # a frame read twice would show as a second stream entry (its record is written once)
                streamed = [json.loads(fields[b"result"])["job_id"]
                            for _, fields in conn.xrange(settings.results_stream)]
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    p.wait(30)
            # each worker's own account of the load: fetch, read, wait for the batch, build, smoke check
            steps = [line.split("(", 1)[1].rstrip(")") for i in range(args.workers)
                     for line in (workdir / f"w{i}.log").read_text().splitlines()
                     if "live model" in line and "loaded and smoke-checked" in line]

    last_switch = max(switched)
    windows: dict[str, list[float]] = {"steady": [], "switch": [], "after": []}
    for r in done:
        captured = datetime.fromisoformat(r["captured_at"])
        latency = (datetime.fromisoformat(r["finished_at"]) - captured).total_seconds()
        since = (captured - promoted).total_seconds()
        if since < 0:
            windows["steady" if since < -2 else "switch"].append(latency)
        else:
            windows["switch" if since <= last_switch else "after"].append(latency)
    q = {name: quantiles(v) for name, v in windows.items()}
    lost, twice = frames - len({r["job_id"] for r in done}), len(streamed) - len(set(streamed))
    # windows: steady = captured over 2 s before the promote; switch = from then until the slowest worker
    # switched; after = the rest
    by_model = {name: sum(r["checkpoint_sha256"] == sha for r in done) for name, sha in (("A", a), ("B", b))}
    lines = [
        f"model switch on CPU: {args.workers} workers, backend {args.backend}, {args.fps:g} frames/s, "
        f"{frames} frames",
        f"promotion reached each worker after {', '.join(f'{s:.1f} s' for s in sorted(switched))} "
        f"(slowest {last_switch:.1f} s); frames lost {lost}, read twice {twice}; results by model: A {by_model['A']}, "
        f"B {by_model['B']}",
        *[f"worker load steps: {s}" for s in steps],
        "| frames captured | frames | capture-to-result p50 (s) | p95 (s) | p50 ÷ steady | p95 ÷ steady |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in windows:
        v = q[name]
        lines.append(f"| {name} | {v['frames']} | {v['p50']:.3f} | {v['p95']:.3f} | "
                     f"{ratio(v['p50'], q['steady']['p50'])} | {ratio(v['p95'], q['steady']['p95'])} |")
    emit("model_switch", args, lines, {"switch_s": switched, "latency": q, "lost": lost, "twice": twice,
                                       "load_steps": steps, "results_by_model": by_model})


if __name__ == "__main__":
    main()
