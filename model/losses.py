"""Focal loss (Lin et al., 2017) for single-label multi-class outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """``-alpha * (1 - p_t) ** gamma * log(p_t)``, averaged over the batch.

    With one label per image, a scalar alpha weighs every class alike; it
    scales the loss (and so the effective learning rate) rather than
    re-balancing classes, which NEU does not need (240 images per class).
    """

    def __init__(self, gamma: float = 2.0, alpha: float = 0.75):
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p_t = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        p_t = log_p_t.exp()
        return (-self.alpha * (1 - p_t).pow(self.gamma) * log_p_t).mean()
