"""Retry with exponential backoff, saying what it is doing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("steelsight.retry")


def with_backoff(
    fn: Callable[[], T],
    what: str,
    transient: tuple[type[BaseException], ...],
    attempts: int | None = 5,
    first_delay_s: float = 0.5,
    max_delay_s: float = 10.0,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds; ``attempts=None`` retries forever (never drop a frame)."""
    delay, attempt = first_delay_s, 0
    while True:
        attempt += 1
        try:
            return fn()
        except transient as exc:
            if attempts is not None and attempt >= attempts:
                raise
            log.warning("%s failed (%s: %s); retry %d in %.1fs", what, type(exc).__name__, exc, attempt, delay)
            if on_retry:
                on_retry(exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay_s)
