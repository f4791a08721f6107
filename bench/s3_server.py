"""The object store's cost per request: SeaweedFS's `weed server` under the pipeline's request mix.

    .venv/bin/python bench/s3_server.py
    .venv/bin/python bench/s3_server.py --frames 1500 --rounds 3

``steelsight up``, the tests and the benches run SeaweedFS (``steelsight.devstack``):
master, volume server, filer and S3 gateway in one process. The client does what the
pipeline does per frame, one request after another through the product's
``ObjectStore``: the producer's PUT of a 40 KB frame, the worker's GET of it and its
PUT of a 10 KB JPEG overlay. With two cores the client runs on core 0 and the server
on core 1. Per round: requests/s, the server's and the client's CPU per request
(/proc), and their ratio; the table gives medians. Results go to
bench/results/s3_server-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from pipeline_throughput import cpu_seconds, pin_process, save_result

from steelsight.clients import ObjectStore
from steelsight.contract import Settings
from steelsight.devstack import s3_server


def frame_traffic(store: ObjectStore, frames: int, tag: str) -> None:
    """Per frame: PUT the frame, GET it, PUT its overlay."""
    settings = store.settings
    frame, overlay = os.urandom(40_000), os.urandom(10_000)
    for i in range(frames):
        store.put(settings.frames_bucket, f"{tag}/{i}.bmp", frame, "image/bmp")
        store.get(settings.frames_bucket, f"{tag}/{i}.bmp", settings.max_frame_bytes)
        store.put(settings.overlays_bucket, f"{tag}/{i}.jpg", overlay, "image/jpeg")


def measure(server_pid: int, store: ObjectStore, frames: int, tag: str) -> tuple[float, float, float]:
    """Requests/s, and the server's and the client's CPU milliseconds per request."""
    server, client, start = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    frame_traffic(store, frames, tag)
    elapsed, requests = time.perf_counter() - start, 3 * frames
    return (requests / elapsed, 1000 * (cpu_seconds(server_pid) - server) / requests,
            1000 * (time.process_time() - client) / requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=600, help="frames per round, 3 requests each (default: 600)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default: 3)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="steelsight-s3-bench-"))
    server = s3_server(workdir).start()
    pinned = (os.cpu_count() or 1) >= 2
    try:
        if pinned:
            os.sched_setaffinity(0, {0})
            pin_process(server.proc.pid, {1})
        store = ObjectStore(Settings(s3_endpoint=f"127.0.0.1:{server.port}",
                                     s3_access_key=server.credentials.access_key,
                                     s3_secret_key=server.credentials.secret_key))
        store.ensure_buckets()
        measure(server.proc.pid, store, 50, "warmup")  # first volumes of each bucket
        rounds = [measure(server.proc.pid, store, args.frames, f"round{r}") for r in range(args.rounds)]
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # its data and credentials

    rate, server_ms, client_ms = np.median(np.array(rounds), axis=0)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
          f"{' (client on core 0, server on core 1)' if pinned else ''}, {args.frames} frames x 3 requests per "
          f"round, median of {args.rounds} rounds")
    print("| server | requests/s | server CPU per request | client CPU per request | server ÷ client |")
    print("|---|---:|---:|---:|---:|")
    print(f"| SeaweedFS {server.args[0]} | {rate:.0f} | {server_ms:.2f} ms | {client_ms:.2f} ms | "
          f"**{server_ms / client_ms:.2f}** |")
    save_result("s3_server", {"frames": args.frames, "rounds": [dict(zip(("requests_per_s", "server_cpu_ms",
                "client_cpu_ms"), r, strict=True)) for r in rounds], "server_over_client": server_ms / client_ms})


if __name__ == "__main__":
    main()
