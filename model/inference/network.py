"""Attention-ResNet-50: ResNet-50 trunk, spatial attention, small MLP head.

Inputs are single-channel grayscale tensors in [0, 1] of shape (N, 1, H, W).
The ``InputAdapter`` repeats the gray plane onto the three channels the
ImageNet trunk expects and applies the normalisation of the weights it was
initialised from, so a checkpoint carries its own pre-processing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torchvision.models import resnet50

from steelsight.model.inference.labels import CLASSES
from steelsight.model.inference.ood import TEXTURE_LAYER, texture_statistics

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchConfig:
    """Everything needed to rebuild the network before loading weights."""

    num_classes: int = len(CLASSES)
    # Keras/Caffe ResNet v1 strides in the first 1x1 conv of a downsampling
    # block; torchvision (v1.5) strides in the 3x3 conv.
    stride_in_1x1: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hidden: int = 512
    dropout: float = 0.3
    attention_kernel: int = 7
    name: str = field(default="attention-resnet50")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ArchConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


class InputAdapter(nn.Module):
    """Gray (N,1,H,W) in [0,1] -> normalised (N,3,H,W) for the ImageNet trunk."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


class SpatialAttention(nn.Module):
    """Channel-wise mean and max maps -> 7x7 conv -> sigmoid -> reweight."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x)


def resnet50_trunk(stride_in_1x1: bool = False) -> nn.Sequential:
    """torchvision ResNet-50 without its global pool and fc layer."""
    net = resnet50(weights=None)
    if stride_in_1x1:
        for layer in (net.layer2, net.layer3, net.layer4):
            first = layer[0]
            first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
    return nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )


class AttentionResNet50(nn.Module):
    def __init__(self, arch: ArchConfig | None = None):
        super().__init__()
        self.arch = arch or ArchConfig()
        self.input_adapter = InputAdapter(self.arch.mean, self.arch.std)
        self.trunk = resnet50_trunk(self.arch.stride_in_1x1)
        self.attention = SpatialAttention(self.arch.attention_kernel)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Dropout(self.arch.dropout),
            nn.Linear(2048, self.arch.hidden),
            nn.ReLU(inplace=True),
            nn.Linear(self.arch.hidden, self.arch.num_classes),
        )

    @property
    def last_block(self) -> nn.Module:
        """The trunk's last bottleneck: Grad-CAM's target layer."""
        return self.trunk[-1][-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk feature map (N, 2048, H/32, W/32)."""
        return self.trunk(self.input_adapter(x))

    def trunk_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk feature map and layer3's texture statistics (N, 1024), for the OOD score."""
        layer3 = self.trunk[: TEXTURE_LAYER + 1](self.input_adapter(x))
        return self.trunk[TEXTURE_LAYER + 1 :](layer3), texture_statistics(layer3)

    def pooled(self, feats: torch.Tensor) -> torch.Tensor:
        """Attention-weighted, globally pooled features (N, 2048)."""
        return self.pool(self.attention(feats)).flatten(1)

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(feats))

    def hidden(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head's hidden layer (N, hidden), after its ReLU: what the last linear layer classifies."""
        return self.head[:-1](pooled)

    @property
    def classifier(self) -> nn.Linear:
        return self.head[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def trunk_state_dict_keys(self) -> list[str]:
        return [f"trunk.{k}" for k in self.trunk.state_dict()]


def trunk_key_map() -> dict[str, str]:
    """torchvision resnet50 state-dict key -> our trunk key (indices of the Sequential)."""
    names = ["conv1", "bn1", None, None, "layer1", "layer2", "layer3", "layer4"]
    return {name: f"trunk.{i}" for i, name in enumerate(names) if name}


def load_trunk_weights(model: AttentionResNet50, tv_state: dict[str, torch.Tensor]) -> None:
    """Copy a torchvision-layout ResNet-50 state dict (fc ignored) into the trunk."""
    mapping = trunk_key_map()
    ours = {}
    for key, value in tv_state.items():
        prefix, _, rest = key.partition(".")
        if prefix in mapping:
            ours[f"{mapping[prefix]}.{rest}"] = value
    missing = set(model.trunk_state_dict_keys()) - set(ours)
    if missing:
        raise ValueError(f"ImageNet weights lack {len(missing)} trunk tensors, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(ours, strict=False)
