"""What became of one frame job: done with a result, failed with an error, or still uploading its overlay.

The engine hands back :class:`Done`, :class:`Failed` or :class:`Pending` per job id;
:func:`settle` is the one place a pending upload becomes :class:`Done` or :class:`Failed`.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from steelsight.contract import FrameResult


@dataclass(frozen=True)
class Done:
    """A result to publish: ``ok`` or ``rejected`` (a frame the model cannot read is answered, not failed)."""

    result: FrameResult


@dataclass(frozen=True)
class Failed:
    """The error that fails the job; RQ's retry policy decides what happens next."""

    error: Exception


Outcome = Done | Failed


@dataclass(frozen=True)
class Pending:
    """An ok frame whose overlay is still on its way to the object store."""

    upload: Future  # resolves to the FrameResult, or raises what failed the upload

    def settle(self) -> Outcome:
        try:
            return Done(self.upload.result())
        except Exception as exc:
            return Failed(exc)


def settle(outcomes: dict[str, Outcome | Pending]) -> dict[str, Outcome]:
    """Wait for the pending uploads among ``outcomes``; a failed upload fails its job."""
    return {job_id: o.settle() if isinstance(o, Pending) else o for job_id, o in outcomes.items()}


@dataclass(frozen=True)
class ShadowVerdict:
    """A frame both the live model and the shadow challenger read: their verdicts, never published as a result."""

    job_id: str
    line_id: str
    champion_sha256: str
    challenger_sha256: str
    champion: str
    challenger: str

    @property
    def agree(self) -> bool:
        return self.champion == self.challenger
