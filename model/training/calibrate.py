"""Post-training calibration: temperature scaling and the OOD threshold."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from steelsight.model.inference.ood import ood_threshold

T_MIN, T_MAX = 0.05, 20.0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Single temperature minimising validation NLL (Guo et al., 2017)."""
    logits, labels = logits.detach().clone(), labels.clone()  # may come from inference_mode
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def temperature() -> torch.Tensor:
        # bounded inside the loss too: on a small set that the model separates, the NLL keeps
        # falling as T -> 0, and unbounded steps overflowed the logits into a NaN temperature
        return log_t.clamp(math.log(T_MIN), math.log(T_MAX)).exp()

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / temperature(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(temperature().detach())


def leave_one_out_false_unknown_rate(val_scores: np.ndarray) -> float:
    """Leave one out: the share of val images above the threshold set on all the others.

    The rate measured on val itself is in-sample (each image helped set the threshold);
    this estimates what the same recipe gives on an image that did not.
    """
    scores = np.asarray(val_scores)
    flagged = [scores[i] > ood_threshold(np.delete(scores, i)) for i in range(len(scores))]
    return float(np.mean(flagged))


def unseen_false_unknown_rate(val_scores: np.ndarray, threshold: float, level: float = 0.95) -> dict[str, float]:
    """The share of unseen in-distribution frames the threshold would flag: its expectation and a central interval.

    With ``m`` of ``n`` val scores above a threshold set between val scores, an unseen frame exchangeable with
    the val images scores above it with probability U ~ Beta(m + 1, n - m), whatever the scores' distribution.
    So a rate set on a few hundred val images is a rough promise, which this says in numbers. Only the scores the
    threshold was set on (the checkpoint's val) make it hold; val also set the score's scale, the temperature and
    the epoch, so it is an approximation that errs, if anything, on the optimistic side.
    """
    scores = np.asarray(val_scores, dtype=np.float64).ravel()
    if not len(scores):
        raise ValueError("no val scores")
    if not (np.isfinite(scores).all() and math.isfinite(threshold)):
        raise ValueError("val scores and the threshold must be finite numbers")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), not {level}")
    n, m = len(scores), int(np.sum(scores > threshold))

    def cdf(u: float) -> float:  # P(U <= u) = P(Binomial(n, u) > m), exact for these integer parameters
        if u <= 0.0 or u >= 1.0:
            return float(u >= 1.0)
        log_terms = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
                     + j * math.log(u) + (n - j) * math.log1p(-u) for j in range(m + 1)]
        return 1.0 - min(1.0, sum(math.exp(t) for t in log_terms))

    def quantile(p: float) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
        return (lo + hi) / 2

    tail = (1.0 - level) / 2
    return {"expected": (m + 1) / (n + 1), "low": quantile(tail), "high": quantile(1.0 - tail), "level": level}


def format_unseen(unseen: dict[str, float]) -> str:
    """``unseen_false_unknown_rate``'s figures in one phrase, as the commands print them."""
    return (f"{unseen['expected']:.2%} expected ({unseen['level']:.0%} interval "
            f"{unseen['low']:.2%}-{unseen['high']:.2%})")
