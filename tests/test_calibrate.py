"""Temperature scaling stays finite and within its bounds, and follows the scale of the logits."""

from __future__ import annotations

import math

import pytest
import torch

from steelsight.model.calibrate import T_MAX, T_MIN, fit_temperature


def test_temperature_stays_finite_when_the_set_is_separable():
    # a small set the model gets all right with small margins: the NLL keeps falling as T -> 0;
    # the unbounded fit overflowed the logits and returned NaN (seen in a 2-fold smoke run)
    g = torch.Generator().manual_seed(43)
    logits = torch.randn(18, 6, generator=g) * 0.096
    t = fit_temperature(logits, logits.argmax(1))
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
