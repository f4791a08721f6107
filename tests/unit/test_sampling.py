"""Which finished frames the worker sends to review on its own (worker/sampling.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from steelsight.contract import FrameResult, Settings, Timings
from steelsight.worker.sampling import review_reason


def result(i: int, probabilities: dict[str, float], unknown: bool = False, status: str = "ok") -> FrameResult:
    return FrameResult(frame_id=f"f{i}", job_id=f"l__c__f{i}", line_id="l", camera_id="c",
                       captured_at=datetime.now(UTC), status=status, label="crazing", probabilities=probabilities,
                       unknown=unknown, frame_key="k", timings=Timings(queue_wait_s=0, inference_s=0, total_s=0))


SURE = {"crazing": 0.9, "inclusion": 0.1}
CLOSE = {"crazing": 0.5, "inclusion": 0.45}


def test_each_reason_at_its_share():
    everything = Settings(review_unknown_share=1.0, review_low_margin_share=1.0, review_random_share=1.0)
    assert review_reason(result(1, SURE, unknown=True), everything) == "unknown"
    assert review_reason(result(1, CLOSE), everything) == "low_margin"
    assert review_reason(result(1, SURE), everything) == "random"
    assert review_reason(result(1, SURE, status="rejected"), everything) is None
    nothing = Settings(review_unknown_share=0.0, review_low_margin_share=0.0, review_random_share=0.0)
    assert all(review_reason(result(i, p, unknown=u), nothing) is None
               for i in range(50) for p in (SURE, CLOSE) for u in (True, False))


def test_shares_hold_over_many_frames_and_repeat_for_the_same_frame():
    s = Settings(review_unknown_share=0.2, review_low_margin_share=0.2, review_random_share=0.01)
    picked = [review_reason(result(i, CLOSE), s) for i in range(5000)]
    assert 0.17 < picked.count("low_margin") / 5000 < 0.23
    assert picked[:100] == [review_reason(result(i, CLOSE), s) for i in range(100)]  # a retry is picked alike
    randoms = sum(review_reason(result(i, SURE), s) == "random" for i in range(20000))
    assert 120 < randoms < 280
