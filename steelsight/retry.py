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
    transient: tuple[type[BaseException], ...] | Callable[[BaseException], bool],
    attempts: int | None = 5,
    first_delay_s: float = 0.5,
    max_delay_s: float = 10.0,
    on_retry: Callable[[BaseException, float], None] | None = None,
    give_up_after_s: float | None = None,
    permanent: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``fn`` until it succeeds.

    ``attempts=None`` retries forever (never drop a frame); ``give_up_after_s``
    bounds the time instead, for callers that hold a job whose heartbeat must not lapse.
    ``transient`` names the errors worth waiting out: exception classes, or a predicate
    for errors told apart by content (an S3 error's code or HTTP status). An error caused
    by one of ``permanent`` (a wrong password, an untrusted certificate) is raised at once.
    """
    is_transient = (lambda exc: isinstance(exc, transient)) if isinstance(transient, tuple) else transient
    delay, attempt = first_delay_s, 0
    deadline = None if give_up_after_s is None else time.monotonic() + give_up_after_s
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or caused_by(exc, permanent):
                raise
            out_of_attempts = attempts is not None and attempt >= attempts
            if out_of_attempts or (deadline is not None and time.monotonic() + delay > deadline):
                raise
            log.warning("%s failed (%s: %s); retry %d in %.1fs", what, type(exc).__name__, exc, attempt, delay)
            if on_retry:
                on_retry(exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay_s)


def caused_by(exc: BaseException | None, kinds: tuple[type[BaseException], ...]) -> bool:
    """True when ``exc`` or anything in its cause/context chain is one of ``kinds``."""
    seen = 0
    while exc is not None and seen < 10 and kinds:
        if isinstance(exc, kinds):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
