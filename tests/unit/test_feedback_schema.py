"""A feedback record read back from the store names files and keys: its ids must be the pipeline's."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from steelsight.contract import Feedback


def mark(**overrides) -> dict:
    now = datetime.now(UTC)
    fields = dict(job_id="line-1__cam-1__f1", frame_id="f1", line_id="line-1", camera_id="cam-1", captured_at=now,
                  frame_key="k", feedback_key="feedback/line-1/cam-1/line-1__cam-1__f1.png", content_sha256="0" * 64,
                  verdict="crazing", correct=False, true_class="scratches", created_at=now, source="live")
    return fields | overrides


def test_a_sound_mark_is_read():
    assert Feedback(**mark()).true_class == "scratches"


@pytest.mark.parametrize("overrides", [
    {"job_id": "../../../escaped"},
    {"job_id": "line-1__cam-1__f2"},
    {"frame_id": "../f1", "job_id": "line-1__cam-1__../f1"},
    {"line_id": "a/b", "job_id": "a/b__cam-1__f1"},
    {"true_class": "../scratches"},
])
def test_ids_that_would_reach_outside_are_refused(overrides):
    with pytest.raises(ValidationError):
        Feedback(**mark(**overrides))
