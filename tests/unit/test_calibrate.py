"""Temperature scaling stays finite and within its bounds, and follows the scale of the logits."""

from __future__ import annotations

import math

import pytest
import torch

from steelsight.model.training.calibrate import T_MAX, T_MIN, fit_temperature


def separable_case(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A small set with small-scale logits that the model gets all right, drawn as the random search
    that found the bug drew them (set size, logit scale, logits, then labels = the argmax)."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 40, (1,), generator=g))
    scale = float(10 ** torch.empty(1).uniform_(-2, 3, generator=g))
    logits = torch.randn(n, 6, generator=g) * scale
    return logits, logits.argmax(1)


@pytest.mark.parametrize("seed", [35, 43, 290])
def test_temperature_stays_finite_when_the_set_is_separable(seed):
    # the NLL keeps falling as T -> 0; the unbounded fit overflowed the logits and returned NaN
    # for exactly these three sets (and in a 2-fold smoke run of kfold)
    t = fit_temperature(*separable_case(seed))
    assert math.isfinite(t) and t == pytest.approx(T_MIN, rel=1e-5)


def test_temperature_scales_with_the_logits():
    # the same model made five times too sure needs five times the temperature
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (400,), generator=g)
    logits = torch.randn(400, 6, generator=g)
    logits[torch.arange(400), labels] += 2.0  # right most of the time, at a moderate margin
    base = fit_temperature(logits, labels)
    assert T_MIN < base < T_MAX
    assert fit_temperature(5.0 * logits, labels) == pytest.approx(5.0 * base, rel=1e-2)


def test_leave_one_out_false_unknown_rate_leaves_each_image_out_of_its_threshold():
    import numpy as np

    from steelsight.model.training.calibrate import leave_one_out_false_unknown_rate, ood_threshold

    scores = np.random.default_rng(0).normal(size=400)
    in_sample = float(np.mean(scores > ood_threshold(scores)))
    held_out = leave_one_out_false_unknown_rate(scores)
    assert in_sample <= 0.005 + 1e-9
    assert 0.005 <= held_out < 0.01
    # left out, the one image far above the rest is flagged, and no other is
    assert leave_one_out_false_unknown_rate(np.array([0.0, 0.1, 0.2, 0.3, 5.0])) == 0.2


def test_the_unseen_false_unknown_rate_is_the_beta_law_of_the_val_images_above_the_threshold():
    import math

    import numpy as np
    import pytest

    from steelsight.model.training.calibrate import ood_threshold, unseen_false_unknown_rate

    scores = np.random.default_rng(1).normal(size=288)
    n = len(scores)
    # closed forms of the Beta(m + 1, n - m) cdf for m = 0 and m = 1 of the n val scores above the threshold
    cdfs = {0: lambda u: 1 - (1 - u) ** n, 1: lambda u: 1 - (1 - u) ** n - n * u * (1 - u) ** (n - 1)}
    for m, rate in ((0, 0.0), (1, 0.005)):
        threshold = ood_threshold(scores, rate)
        assert np.sum(scores > threshold) == m
        unseen = unseen_false_unknown_rate(scores, threshold)
        assert unseen["expected"] == (m + 1) / (n + 1)
        assert cdfs[m](unseen["low"]) == pytest.approx(0.025, abs=1e-9)
        assert cdfs[m](unseen["high"]) == pytest.approx(0.975, abs=1e-9)
    # m = 2: the interval's ends hold the tails of Beta(3, 286), by the binomial identity summed the other way
    threshold = ood_threshold(scores, 0.01)
    unseen = unseen_false_unknown_rate(scores, threshold)
    assert np.sum(scores > threshold) == 2

    def upper_tail(u):  # P(Binomial(n, u) <= 2) = P(U > u)
        return sum(math.comb(n, j) * u ** j * (1 - u) ** (n - j) for j in range(3))

    assert upper_tail(unseen["low"]) == pytest.approx(0.975, abs=1e-9)
    assert upper_tail(unseen["high"]) == pytest.approx(0.025, abs=1e-9)
    # the same share of a set ten times the size is a much firmer promise
    big = np.random.default_rng(3).normal(size=2880)
    ten = unseen_false_unknown_rate(big, ood_threshold(big, 0.005))
    one = unseen_false_unknown_rate(scores, ood_threshold(scores, 0.005))
    assert ten["high"] - ten["low"] < (one["high"] - one["low"]) / 2
    for bad in (np.array([0.1, np.nan, 0.3]), np.array([])):
        with pytest.raises(ValueError):
            unseen_false_unknown_rate(bad, 1.0)
    with pytest.raises(ValueError):
        unseen_false_unknown_rate(scores, float("nan"))
