"""Focal loss (Lin et al., 2017) for single-label multi-class outputs, and a Grad-CAM box loss."""

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


def cam_outside_box_loss(feats: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, masks: torch.Tensor,
                         has_mask: torch.Tensor) -> torch.Tensor:
    """Share of each image's Grad-CAM energy that falls outside its own class's boxes.

    The Grad-CAM of the true class on the trunk's output, as the grad-cam package
    computes it (channel weights = spatial mean of the score's gradient, then
    ReLU of the weighted sum). The weights are taken as constants (no double
    backward), so the loss moves the feature map, not the head. ``masks`` is
    (N, 1, H, W) box coverage at input size; images without boxes
    (``has_mask`` 0) contribute nothing.
    """
    score = logits.gather(1, target.unsqueeze(1)).sum()
    (grads,) = torch.autograd.grad(score, feats, retain_graph=True)
    cam = F.relu((grads.mean((2, 3), keepdim=True) * feats).sum(1))  # (N, h, w)
    cover = F.adaptive_avg_pool2d(masks, cam.shape[-2:]).squeeze(1)  # share of each cell inside a box
    outside = (cam * (1 - cover)).sum((1, 2)) / (cam.sum((1, 2)) + 1e-6)
    return (outside * has_mask).sum() / has_mask.sum().clamp(min=1)
