"""Active sampling: the worker sends some finished frames to the operators' review queue on its own.

Unknown verdicts, low-margin verdicts (the top two classes close) and a small random
sample, each at its share (``review_*`` settings). A frame is picked by a hash of its
job id and the reason, so a retried frame is picked alike; the queue itself
(:func:`steelsight.feedback.enqueue_for_review`) keeps a frame from being queued twice
and bounds each line's frames per hour.
"""

from __future__ import annotations

import logging

from steelsight.contract import REJECTED, FrameResult, ReviewReason, Settings
from steelsight.feedback import enqueue_for_review

from . import metrics
from .engine import sampled

log = logging.getLogger("steelsight.worker")


def margin(result: FrameResult) -> float | None:
    """Top class probability minus the second; None without probabilities (a tiled frame has none)."""
    top = sorted(result.probabilities.values(), reverse=True)[:2]
    return top[0] - top[1] if len(top) == 2 else None


def review_reason(result: FrameResult, settings: Settings) -> ReviewReason | None:
    """Why this frame goes to review, or None; the first reason that applies is the one tried."""
    if result.status == REJECTED:  # nothing to label: the model never read it
        return None
    if result.unknown:
        return "unknown" if sampled(f"{result.job_id}:unknown", settings.review_unknown_share) else None
    gap = margin(result)
    if gap is not None and gap < settings.review_margin:
        return "low_margin" if sampled(f"{result.job_id}:low_margin", settings.review_low_margin_share) else None
    return "random" if sampled(f"{result.job_id}:random", settings.review_random_share) else None


def offer(connection, settings: Settings, results: list[FrameResult]) -> None:
    """Queue the picked frames for review; a failure here is logged, never fails a published frame."""
    for result in results:
        reason = review_reason(result, settings)
        if reason is None:
            continue
        try:
            if enqueue_for_review(connection, settings, result, reason):
                metrics.REVIEW_SENT.labels(reason=reason).inc()
        except Exception as exc:
            log.warning("could not queue %s for review (%s): %s", result.job_id, reason, exc)
