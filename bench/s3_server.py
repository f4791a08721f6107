"""The object store's cost per request: SeaweedFS's `weed server` under the pipeline's request mix.

    python -m bench.s3_server --frames 600 --rounds 3
    python -m bench.s3_server --quick

``steelsight up``, the tests and the benches run SeaweedFS (``steelsight.devstack``):
master, volume server, filer and S3 gateway in one process. The client does what the
pipeline does per frame, one request after another through the product's
``ObjectStore``: the producer's PUT of a 40 KB frame, the worker's GET of it and its
PUT of a 10 KB JPEG overlay. With two cores the client runs on core 0 and the server
on core 1. Per round: requests/s, the server's and the client's CPU per request
(/proc), and their ratio; the table gives medians.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import BenchParser, cpu_seconds, describe, emit, pin_process
from steelsight.clients import ObjectStore
from steelsight.contract import Settings
from steelsight.devstack import pinned_weed_version, s3_server

NAME = "s3_server"


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
    parser = BenchParser(__doc__, quick={"frames": 100, "rounds": 1})
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

    figures = {"frames": args.frames, "pinned": pinned, "server": f"SeaweedFS {pinned_weed_version()}",
               "rounds": [dict(zip(("requests_per_s", "server_cpu_ms", "client_cpu_ms"), r, strict=True))
                          for r in rounds]}
    _, server_ms, client_ms = np.median(np.array(rounds), axis=0)
    figures["server_over_client"] = float(server_ms / client_ms)
    emit(NAME, args, render(figures), figures)


def render(record: dict) -> list[str]:
    """The table, from the figures a run saves (older results included)."""
    rounds = record["rounds"]
    rate, server_ms, client_ms = (float(np.median([r[k] for r in rounds]))
                                  for k in ("requests_per_s", "server_cpu_ms", "client_cpu_ms"))
    machine = record.get("machine")
    machine_line = describe(machine) if isinstance(machine, dict) else machine or describe()
    pinned = record.get("pinned", True)
    return [f"# {machine_line}{' (client on core 0, server on core 1)' if pinned else ''}, {record['frames']} "
            f"frames x 3 requests per round, median of {len(rounds)} rounds",
            "| server | requests/s | server CPU per request | client CPU per request | server ÷ client |",
            "|---|---:|---:|---:|---:|",
            f"| {record.get('server', 'SeaweedFS')} | {rate:.0f} | {server_ms:.2f} ms | {client_ms:.2f} ms | "
            f"**{server_ms / client_ms:.2f}** |"]


if __name__ == "__main__":
    main()
