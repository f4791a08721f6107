import math

import torch
import torch.nn.functional as F

from steelsight.model.losses import FocalLoss


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    p = math.exp(2) / (math.exp(2) + 2)  # 0.7869
    expected = -0.75 * (1 - p) ** 2 * math.log(p)
    got = FocalLoss(gamma=2.0, alpha=0.75)(logits, torch.tensor([0]))
    assert abs(float(got) - expected) < 1e-6
    assert abs(expected - 0.008152) < 1e-6  # 0.75 * 0.2131^2 * 0.2395, worked out by hand


def test_focal_loss_reduces_to_cross_entropy():
    logits, target = torch.randn(8, 6), torch.randint(0, 6, (8,))
    assert torch.isclose(FocalLoss(gamma=0.0, alpha=1.0)(logits, target), F.cross_entropy(logits, target))


def test_focal_loss_down_weights_easy_examples():
    easy, hard = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.5, 0.0]])
    loss = FocalLoss()
    ratio_focal = loss(easy, torch.tensor([0])) / loss(hard, torch.tensor([0]))
    ratio_ce = F.cross_entropy(easy, torch.tensor([0])) / F.cross_entropy(hard, torch.tensor([0]))
    assert ratio_focal < ratio_ce
