"""What every trunk backend is: a callable from a gray batch to the trunk's outputs."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from steelsight.model.inference.network import AttentionResNet50


class Trunk(Protocol):
    """Gray batch (N, 1, H, W) float32 -> (feature map, layer3 texture statistics), both float32."""

    name: str

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class TrunkInput(nn.Module):
    """Gray batch -> trunk feature map and layer3 texture statistics: the part a backend runs."""

    def __init__(self, net: AttentionResNet50):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.trunk_outputs(x)
