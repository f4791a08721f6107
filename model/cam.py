"""Grad-CAM that costs about one forward pass.

The grad-cam package needs the gradient of the class score with respect to the
target layer's output, here the trunk's last bottleneck. That gradient only
flows through the attention module and the head, so the trunk runs once under
``torch.no_grad()`` and its last block's output is turned into a fresh leaf
that requires grad. The package's own hooks then record activations and
gradients exactly as in its plain usage, but backward never enters the trunk.
"""

from __future__ import annotations

import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from .network import AttentionResNet50

CAM_METHODS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
}


def _output_as_leaf(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
    return output.detach().requires_grad_(True)


class TrunkOnce(nn.Module):
    """Forward = trunk without autograd, then attention + head with autograd."""

    def __init__(self, net: AttentionResNet50):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # prepend=True: the leaf must exist before grad-cam's hooks look at it
        handle = self.net.last_block.register_forward_hook(_output_as_leaf, prepend=True)
        try:
            with torch.no_grad():
                feats = self.net.features(x)
        finally:
            handle.remove()
        with torch.enable_grad():
            return self.net.classify(feats)


class CheapCam:
    """One grad-cam object per method, all sharing the trunk-once wrapper."""

    def __init__(self, net: AttentionResNet50):
        self.net = net
        self.wrapper = TrunkOnce(net)
        self._cams: dict[str, object] = {}

    def _cam(self, method: str):
        if method not in CAM_METHODS:
            raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
        if method not in self._cams:
            self._cams[method] = CAM_METHODS[method](model=self.wrapper, target_layers=[self.net.last_block])
        return self._cams[method]

    def __call__(self, batch: torch.Tensor, targets: list[int] | None = None, method: str = "gradcam"):
        """Return heatmaps (N, H, W) in [0, 1] at the batch's size, logits (N, C) and trunk features."""
        cam = self._cam(method)
        cam_targets = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
        heatmaps = cam(input_tensor=batch, targets=cam_targets)
        logits = cam.outputs.detach()
        feats = cam.activations_and_grads.activations[0].clone()
        cam.activations_and_grads.clear()  # drop references to this batch's graph
        cam.outputs = None
        return heatmaps, logits, feats
