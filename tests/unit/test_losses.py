import math

import torch
import torch.nn.functional as F

from steelsight.model.training.losses import FocalLoss


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


def test_cam_box_loss_is_the_cam_share_outside_the_box_and_pulls_it_inside():
    from steelsight.model.training.losses import cam_outside_box_loss

    # a 1-channel "feature map" read by a linear score: the CAM is the map itself
    feats = torch.zeros(2, 1, 4, 4)
    feats[0, 0, 0, 0] = 1.0  # image 0: all evidence in the top-left cell
    feats[1, 0, 3, 3] = 1.0  # image 1: two thirds of its evidence bottom-right, one third top-left
    feats[1, 0, 0, 0] = 0.5
    feats.requires_grad_(True)
    logits = torch.stack([feats.sum((1, 2, 3)), -feats.sum((1, 2, 3))], 1)
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, :2, :2] = 1  # both boxes cover the top-left cell (8 px input, 4x4 map)
    target, has = torch.tensor([0, 0]), torch.tensor([1.0, 1.0])
    loss = cam_outside_box_loss(feats, logits, target, masks, has)
    assert abs(float(loss) - (0 + 2 / 3) / 2) < 1e-5  # image 0: none outside; image 1: 2/3 outside
    (grad,) = torch.autograd.grad(loss, feats)
    assert grad[1, 0, 3, 3] > 0 and grad[1, 0, 0, 0] < 0  # descent moves evidence into the box
    # images without boxes do not count
    assert float(cam_outside_box_loss(feats, logits, target, masks, torch.tensor([1.0, 0.0]))) < 1e-5


def test_box_masks_follow_the_spatial_augmentation(neu_dir):
    import albumentations as A
    import numpy as np

    from steelsight.model.training.data import SurfaceDataset, scan_folders

    sample = next(s for s in scan_folders(neu_dir) if s.class_name == "scratches")
    plain = SurfaceDataset([sample], None, 64, neu_dir / "annotations")
    flipped = SurfaceDataset([sample], A.Compose([A.HorizontalFlip(p=1)]), 64, neu_dir / "annotations")
    _, label, mask, has = plain[0]
    _, _, flipped_mask, _ = flipped[0]
    assert label == sample.label and has == 1.0 and mask.shape == (1, 64, 64) and 0 < mask.mean() < 1
    assert np.array_equal(flipped_mask.numpy(), mask.numpy()[..., ::-1])
