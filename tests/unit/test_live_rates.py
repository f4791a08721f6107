"""The live tab's rate chart: each class's and the unknown rate per bucket, against the window's share."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from steelsight.contract import FrameResult, Timings
from steelsight.dashboard.data import rate_over_time


def result(i: int, label: str, at: datetime, unknown: bool = False) -> FrameResult:
    return FrameResult(frame_id=f"f{i}", job_id=f"l__c__f{i}", line_id="l", camera_id="c", captured_at=at,
                       status="ok", label=label, confidence=0.9, unknown=unknown, frame_key="k", finished_at=at,
                       timings=Timings(queue_wait_s=0, inference_s=0, total_s=0))


def test_rates_are_per_class_and_unknown_against_the_window_share():
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    first = [result(i, "scratches", t0) for i in range(3)] + [result(3, "crazing", t0)]
    second = [result(4, "scratches", t0 + timedelta(seconds=10)),
              result(5, "crazing", t0 + timedelta(seconds=10), unknown=True)]
    rates = rate_over_time(first + second)
    value = {(row.time.second, row.series): row.value for row in rates.itertuples()}
    assert set(rates["series"]) == {"scratches", "crazing", "unknown", "scratches baseline", "crazing baseline",
                                    "unknown baseline"}  # classes never seen are left out; no flat 'defect rate'
    assert value[(0, "scratches")] == 0.75 and value[(10, "scratches")] == 0.5
    assert value[(0, "unknown")] == 0 and value[(10, "unknown")] == 0.5
    assert value[(0, "scratches baseline")] == value[(10, "scratches baseline")] == 4 / 6
    assert value[(10, "unknown baseline")] == 1 / 6
