"""The S3 stand-in's cost per request: moto's S3 app served alone against moto's all-service dispatcher.

    .venv/bin/python bench/s3_standin.py
    .venv/bin/python bench/s3_standin.py --frames 1500 --rounds 3

``steelsight up``, the tests and the benches use moto as the S3 server
(``steelsight.devstack``). moto's own server puts every AWS service behind
``DomainDispatcherApplication``; the devstack serves moto's S3 app alone. Both run
here under waitress, as the devstack does, on the second core (the client on the
first) when there are two. The client does what the pipeline does per frame: the
producer's PUT of a 40 KB frame, the worker's GET of it and its PUT of a 120 KB
overlay (the stored-PNG overlay that was the default when these servers were
compared; JPEG overlays are ~10 KB now), one after another through the product's ``ObjectStore``. Rounds alternate
between the two servers; the table gives, per server, requests/s and the server's
CPU per request (/proc), median over the rounds, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pipeline_throughput import cpu_seconds, pin_process

from steelsight.clients import ObjectStore
from steelsight.contract import Settings
from steelsight.devstack import Service, free_port, s3_server


def serve_dispatcher(port: int) -> None:
    """moto's own arrangement: every service behind the dispatcher, under waitress like the devstack."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from waitress import serve

    os.environ.setdefault("MOTO_PORT", str(port))
    serve(DomainDispatcherApplication(create_backend_app), host="127.0.0.1", port=port, threads=8, _quiet=True)


def dispatcher_server(workdir: Path) -> Service:
    port = free_port()
    args = [sys.executable, __file__, "--serve-dispatcher", str(port)]
    return Service(args, port, workdir / f"dispatcher-{port}.log")


def store_for(port: int) -> ObjectStore:
    settings = Settings(s3_endpoint=f"127.0.0.1:{port}", s3_access_key="bench", s3_secret_key="bench")
    store = ObjectStore(settings)
    store.ensure_buckets()
    return store


def frame_traffic(store: ObjectStore, frames: int, tag: str) -> None:
    """Per frame: PUT the frame, GET it, PUT its overlay."""
    settings = store.settings
    frame, overlay = os.urandom(40_000), os.urandom(120_000)
    for i in range(frames):
        store.put(settings.frames_bucket, f"{tag}/{i}.bmp", frame, "image/bmp")
        store.get(settings.frames_bucket, f"{tag}/{i}.bmp", settings.max_frame_bytes)
        store.put(settings.overlays_bucket, f"{tag}/{i}.png", overlay, "image/png")


def measure(server: Service, store: ObjectStore, frames: int, tag: str) -> tuple[float, float]:
    """Requests/s and the server's CPU milliseconds per request."""
    cpu, start = cpu_seconds(server.proc.pid), time.perf_counter()
    frame_traffic(store, frames, tag)
    elapsed, requests = time.perf_counter() - start, 3 * frames
    return requests / elapsed, 1000 * (cpu_seconds(server.proc.pid) - cpu) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=600, help="frames per measurement, 3 requests each")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per server (default: 3)")
    parser.add_argument("--serve-dispatcher", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_dispatcher:
        return serve_dispatcher(args.serve_dispatcher)

    workdir = Path(tempfile.mkdtemp(prefix="steelsight-s3-standin-"))
    servers = {"S3 app alone (devstack)": s3_server(workdir).start(),
               "moto's dispatcher": dispatcher_server(workdir).start()}
    pinned = (os.cpu_count() or 1) >= 2
    try:
        if pinned:
            os.sched_setaffinity(0, {0})
            for server in servers.values():
                pin_process(server.proc.pid, {1})
        stores = {name: store_for(server.port) for name, server in servers.items()}
        for name, server in servers.items():  # warm-up: imports, first app instances
            measure(server, stores[name], 50, "warmup")
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
        for r in range(args.rounds):
            for name, server in servers.items():
                results[name].append(measure(server, stores[name], args.frames, f"round{r}"))
    finally:
        for server in servers.values():
            server.stop()

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
          f"{' (client on core 0, server on core 1)' if pinned else ''}, {args.frames} frames x 3 requests per "
          f"measurement, median of {args.rounds} alternating rounds")
    print("| server | requests/s | server CPU per request |\n|---|---:|---:|")
    medians = {name: np.median(np.array(values), axis=0) for name, values in results.items()}
    for name, (rate, cpu_ms) in medians.items():
        print(f"| {name} | {rate:.0f} | {cpu_ms:.2f} ms |")
    (new_rate, new_cpu), (old_rate, old_cpu) = medians.values()
    print(f"| **ratio, S3 app alone / dispatcher** | **{new_rate / old_rate:.2f}x** | **{new_cpu / old_cpu:.2f}x** |")


if __name__ == "__main__":
    main()
