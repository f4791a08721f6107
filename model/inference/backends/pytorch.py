"""The trunk in PyTorch: ``torch`` and, in half precision, ``torch-fp16`` and ``torch-bf16``."""

from __future__ import annotations

import torch
from torch import nn

from steelsight.model.inference.network import AttentionResNet50
from steelsight.model.inference.ood import TEXTURE_LAYER, texture_statistics


class TorchTrunk:
    """PyTorch without autograd: BatchNorm folded into the convs, channels-last activations.

    ``dtype=torch.float16`` is the GPU's tensor-core path (``torch-fp16``): weights and
    activations in half precision, features handed back in float32 so attention, head,
    Grad-CAM and the OOD score stay in float32.
    """

    name = "torch"

    def __init__(self, net: AttentionResNet50, dtype: torch.dtype = torch.float32):
        from torch.fx.experimental.optimization import fuse

        # fuse() works on a copy; the adapter stays outside the traced graph (data-dependent branch),
        # and the trunk is fused in two parts so that layer3's output can be tapped for the OOD score
        trunk = net.trunk.eval()
        self.to_layer3 = nn.Sequential(net.input_adapter, fuse(trunk[: TEXTURE_LAYER + 1])).eval()
        self.layer4 = fuse(trunk[TEXTURE_LAYER + 1 :]).eval()
        # folding happens in float32 first, so half precision rounds the folded weights once
        for part in (self.to_layer3, self.layer4):
            part.to(dtype=dtype, memory_format=torch.channels_last)
        self.dtype = dtype

    @torch.no_grad()  # not inference_mode: explain() turns the output into an autograd leaf
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature map and layer3 texture statistics, both float32."""
        layer3 = self.to_layer3(x.to(self.dtype).contiguous(memory_format=torch.channels_last))
        feats = self.layer4(layer3)
        return feats.float().contiguous(), texture_statistics(layer3.float())
