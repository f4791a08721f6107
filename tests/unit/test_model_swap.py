"""The engine swaps models only between batches, and scores a shadow share beside the live model."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from datetime import UTC, datetime

import numpy as np
import torch

from steelsight.contract import Frame, Settings
from steelsight.model.inference.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from steelsight.model.inference.network import AttentionResNet50
from steelsight.model.inference.predictor import Predictor
from steelsight.model.inference.tiling import plan_frame
from steelsight.worker.engine import FrameEngine, Loaded, Shadow, sampled
from steelsight.worker.outcome import settle


class MemoryStore:
    def __init__(self):
        self.objects = {}

    def put(self, bucket, key, data, content_type, metadata=None):
        self.objects[(bucket, key)] = data


def predictor(folder, seed: int) -> Predictor:
    torch.manual_seed(seed)
    path = folder / f"seed{seed}.safetensors"
    save_checkpoint(AttentionResNet50().eval(), CheckpointMeta(input_size=64), path)
    return Predictor(load_checkpoint(path), torch.device("cpu"), batch_size=4, backend="torch")


def batch(engine: FrameEngine, n: int, tag: str):
    rng = np.random.default_rng(len(tag))
    frames, loads = [], {}
    for i in range(n):
        frame = Frame(frame_id=f"{tag}{i}", line_id="l", camera_id="c", captured_at=datetime.now(UTC), ext="png")
        gray = rng.integers(0, 255, (200, 200), dtype=np.uint8)
        done = Future()
        done.set_result(Loaded(plan_frame(gray, engine.tiling, engine.predictor.input_size), 1))
        frames.append(frame)
        loads[frame.job_id] = done
    return frames, loads


def test_a_model_staged_mid_batch_serves_from_the_next_batch(tmp_path):
    old, new = predictor(tmp_path, 1), predictor(tmp_path, 2)
    engine = FrameEngine(old, MemoryStore(), Settings(batch_size=4))
    entered, release = threading.Event(), threading.Event()
    explain = old.explain_plans

    def slow_explain(plans, method="gradcam"):
        entered.set()
        release.wait(10)
        return explain(plans, method)

    old.explain_plans = slow_explain
    first = {}
    worker = threading.Thread(target=lambda: first.update(settle(engine.compute(*batch(engine, 3, "a")))))
    worker.start()
    assert entered.wait(10)
    engine.stage(new)  # while the first batch is in the model
    release.set()
    worker.join(10)
    second = settle(engine.compute(*batch(engine, 3, "b")))
    assert {o.result.checkpoint_sha256 for o in first.values()} == {old.checkpoint.sha256}
    assert {o.result.checkpoint_sha256 for o in second.values()} == {new.checkpoint.sha256}
    assert engine.serving_sha256 == new.checkpoint.sha256 and engine.switched_at is not None


def test_shadow_scores_its_share_and_never_changes_the_results(tmp_path):
    live, challenger = predictor(tmp_path, 1), predictor(tmp_path, 2)
    seen = []
    engine = FrameEngine(live, MemoryStore(), Settings(batch_size=8), on_shadow=seen.extend)
    frames, loads = batch(engine, 8, "s")
    plain = settle(engine.compute(frames, loads))
    engine.set_shadow(Shadow(challenger, 0.5))
    shadowed = settle(engine.compute(frames, loads))
    engine.io.shutdown(wait=True)  # verdicts are recorded off the model thread
    strip = lambda o: o.result.model_dump(exclude={"timings", "finished_at"})  # noqa: E731
    assert [strip(o) for o in plain.values()] == [strip(o) for o in shadowed.values()]
    assert sorted(v.job_id for v in seen) == sorted(f.job_id for f in frames if sampled(f.job_id, 0.5))
    direct = challenger.predict_plans([loads[v.job_id].result().plan for v in seen])
    assert [v.challenger for v in seen] == ["unknown" if p.unknown else p.label for p in direct]
    assert all(v.challenger_sha256 == challenger.checkpoint.sha256 for v in seen)


def test_sampling_is_by_job_id_and_near_its_share():
    ids = [f"line__cam__f{i}" for i in range(4000)]
    share = np.mean([sampled(i, 0.1) for i in ids])
    assert 0.085 < share < 0.115
    assert [sampled(i, 0.1) for i in ids[:50]] == [sampled(i, 0.1) for i in ids[:50]]
    assert not any(sampled(i, 0.0) for i in ids) and all(sampled(i, 1.0) for i in ids)


def test_a_shadow_promoted_to_live_is_not_compared_with_itself(tmp_path):
    live = predictor(tmp_path, 1)
    seen = []
    engine = FrameEngine(live, MemoryStore(), Settings(batch_size=8), on_shadow=seen.extend)
    engine.set_shadow(Shadow(live, 1.0))
    settle(engine.compute(*batch(engine, 4, "p")))
    engine.io.shutdown(wait=True)
    assert seen == []


def test_unstage_drops_a_model_not_yet_taken_up(tmp_path):
    old, new = predictor(tmp_path, 1), predictor(tmp_path, 2)
    engine = FrameEngine(old, MemoryStore(), Settings(batch_size=4))
    with engine._batch:  # a batch in hand: staging waits for it
        engine.stage(new)
        assert engine.staged_sha256 == new.checkpoint.sha256
        engine.unstage()
    engine.switch_if_idle()
    assert engine.serving_sha256 == old.checkpoint.sha256
