"""Wide frames through the whole worker against single images: model inputs per second, in one run.

    python -m bench.tile_pipeline --inputs 192 --rounds 2 --worker-cores 0 --service-cores 1
    python -m bench.tile_pipeline --quick

One worker process (the product's ``steelsight worker``) drains a queue filled while it
is stopped (SIGSTOP), alternately with the bundled NEU samples (200 x 200, one tile
each) and with 1600 x 200 strips of 8 samples (8 tiles each), the same number of model
inputs either way. The rate runs from the end of the first micro-batch to the last
result and covers everything a worker does per frame: fetch, decode, plan, explain,
stitch, overlay encode and upload, publish. The table gives tiles/s over images/s.
"""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path

import cv2
import numpy as np

from bench.harness import (
    SAMPLES,
    BenchParser,
    describe,
    emit,
    finish_times,
    local_stack,
    median,
    parse_cores,
    rate_after_first_batch,
    spread,
    start_worker,
    wait_for_results,
)
from steelsight.clients import redis_client
from steelsight.devstack import free_port, wait_until
from steelsight.producer.service import Producer

NAME = "tile_pipeline"
PER_STRIP = 8


def bmp(gray: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".bmp", gray)
    assert ok
    return data.tobytes()


def frames(kind: str, inputs: int) -> list[bytes]:
    """``inputs`` model inputs as single samples, or as strips of PER_STRIP samples side by side."""
    samples = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(SAMPLES.rglob("*.bmp"))]
    if kind == "images":
        return [bmp(samples[i % len(samples)]) for i in range(inputs)]
    return [bmp(np.hstack([samples[(i * PER_STRIP + j) % len(samples)] for j in range(PER_STRIP)]))
            for i in range(inputs // PER_STRIP)]


def drain(settings, conn, worker, line: str, data: list[bytes]) -> float:
    """Frames/s for ``data`` queued while the worker is stopped, after its first batch."""
    worker.send_signal(signal.SIGSTOP)
    try:
        producer = Producer(settings, line, "cam-1")
        for i, item in enumerate(data):
            assert producer.send(item, f"f{i}", "bmp") == "enqueued"
    finally:
        worker.send_signal(signal.SIGCONT)
    done = wait_for_results(settings, conn, line, len(data))
    assert all(r["status"] == "ok" for r in done), [r.get("reason") for r in done if r["status"] != "ok"][:3]
    return rate_after_first_batch(finish_times(done), settings.batch_size)


def main() -> None:
    parser = BenchParser(__doc__, quick={"inputs": 64, "rounds": 1})
    parser.add_argument("--inputs", type=int, default=192, help="model inputs per measurement (default: 192)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: 2)")
    parser.add_argument("--batch", type=int, default=8, help="worker micro-batch size (default: 8)")
    parser.add_argument("--threads", type=int, default=1, help="the worker's torch threads (default: 1)")
    parser.add_argument("--worker-cores", default=None, metavar="LIST", help="pin the worker, e.g. 0")
    parser.add_argument("--service-cores", default=None, metavar="LIST", help="pin Redis, S3, producer, e.g. 1")
    args = parser.parse_args()
    inputs = max(args.inputs // PER_STRIP, 3) * PER_STRIP
    rates: dict[str, list[float]] = {"images": [], "strips": []}
    with tempfile.TemporaryDirectory() as tmp, local_stack(Path(tmp), parse_cores(args.service_cores),
                                                           batch_size=args.batch, device="cpu") as (settings, _):
        settings = settings.model_copy(update={"metrics_port": free_port()})
        conn = redis_client(settings)
        worker = start_worker(settings, "tile-bench", args.threads, parse_cores(args.worker_cores),
                              Path(tmp) / "worker.log")
        try:
            wait_until(lambda: conn.scard("rq:workers") > 0, 180, "the worker to load its model")
            data = {kind: frames(kind, inputs) for kind in rates}
            drain(settings, conn, worker, "warm-up", data["images"][: args.batch * 2])
            for n in range(args.rounds):
                for kind in rates:
                    fps = drain(settings, conn, worker, f"{kind}-{n}", data[kind])
                    rates[kind].append(fps * (PER_STRIP if kind == "strips" else 1))
        finally:
            worker.terminate()
            worker.wait(30)
    ratios = [s / i for s, i in zip(rates["strips"], rates["images"], strict=True)]
    middle = median(ratios)
    lines = [describe(), f"1 worker x {args.threads} thread(s), batch {args.batch}, {inputs} inputs per "
                         f"measurement, {args.rounds} round(s)", "",
             "| frames | model inputs/s | ratio |", "|---|---|---|",
             f"| 200 x 200 images | {spread(rates['images'], 1)} | 1 |",
             f"| 1600 x 200 strips (8 tiles) | {spread(rates['strips'], 1)} tiles/s | **{middle:.2f}** "
             f"({min(ratios):.2f}–{max(ratios):.2f}) |"]
    emit(NAME, args, lines, {"inputs_per_s": rates, "tiles_over_images": ratios, "median_ratio": middle})


if __name__ == "__main__":
    main()
