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
