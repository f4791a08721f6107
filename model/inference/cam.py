"""Grad-CAM that costs about one forward pass.

The grad-cam package needs the gradient of the class score with respect to the
trunk's output feature map. That gradient only flows through the attention
module and the head, so the trunk runs once without autograd (in PyTorch or
any backend in backends/) and its output goes through ``FeatureTap``, an
identity layer that grad-cam hooks as its target layer. The package then
records activations and gradients exactly as in its plain usage on the last
bottleneck, but backward never enters the trunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from steelsight.model.inference.network import AttentionResNet50

CAM_METHODS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
}


# gray batch -> (feature map, layer3 texture statistics), e.g. a backends/ trunk
Trunk = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class FeatureTap(nn.Identity):
    """Grad-CAM's target layer: the trunk's output, as a leaf that requires grad."""


class TrunkOnce(nn.Module):
    """Forward = trunk without autograd, then attention + head with autograd.

    The trunk's second output (layer3 texture statistics, for the OOD score) is kept
    in ``texture`` until the next forward.
    """

    def __init__(self, net: AttentionResNet50, trunk: Trunk | None = None):
        super().__init__()
        self.net = net
        self.trunk = trunk or net.trunk_outputs
        self.tap = FeatureTap()
        self.texture: torch.Tensor | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        # grad-cam calls this per batch; only the part after the tap can hold gradients
        self.net.attention.zero_grad(set_to_none)
        self.net.head.zero_grad(set_to_none)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats, self.texture = self.trunk(x)
        feats = feats.to(x.device).detach().requires_grad_(True)
        with torch.enable_grad():
            return self.net.classify(self.tap(feats))


class CheapCam:
    """One grad-cam object per method, all sharing the trunk-once wrapper."""

    def __init__(self, net: AttentionResNet50, trunk: Trunk | None = None):
        self.net = net
        self.wrapper = TrunkOnce(net, trunk)
        self._cams: dict[str, object] = {}

    def _cam(self, method: str):
        if method not in CAM_METHODS:
            raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
        if method not in self._cams:
            self._cams[method] = CAM_METHODS[method](model=self.wrapper, target_layers=[self.wrapper.tap])
        return self._cams[method]

    def __call__(self, batch: torch.Tensor, targets: list[int] | None = None, method: str = "gradcam"):
        """Heatmaps (N, H, W) in [0, 1] at the batch's size, logits (N, C), trunk features, texture statistics."""
        cam = self._cam(method)
        cam_targets = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
        heatmaps = cam(input_tensor=batch, targets=cam_targets)
        logits = cam.outputs.detach()
        feats = cam.activations_and_grads.activations[0].clone()
        cam.activations_and_grads.clear()  # drop references to this batch's graph
        cam.outputs = None
        texture, self.wrapper.texture = self.wrapper.texture, None
        return heatmaps, logits, feats, texture
