"""Explain frames with everything after the decode on the model's device.

On a GPU the model is far faster than one CPU core can feed it, so what the CPU path
does per frame with OpenCV (resize, Grad-CAM's rescaling, colormap, blend, JPEG) is
what bounds a GPU worker. Here those steps run as batched tensor operations on the
predictor's device, and only the decoded frame goes up and the JPEG bytes come back:

    gray uint8 (CPU) -> device -> resize to the input -> trunk (any backend) ->
    attention + head with autograd -> Grad-CAM from the feature-map gradient ->
    heatmap at the frame's size -> JET colormap and blend -> JPEG (``torchvision.io.encode_jpeg``)

It reproduces :meth:`Predictor.explain` with the ``gradcam`` method step for step
(grad-cam's weighting and per-image rescaling, ``overlay_heatmap``'s blend), so the
same code runs on CPU tensors in CI and is checked there against the CPU path
(``tests/model/test_ondevice.py``). Frames larger than one tile take the CPU path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import encode_jpeg

from steelsight.contract import ON_DEVICE_EXPLAIN
from steelsight.model.inference.predictor import (
    OVERLAY_IMAGE_WEIGHT,
    Explanation,
    FrameExplanation,
    Predictor,
    as_gray,
)
from steelsight.model.inference.preprocess import resize_for_model
from steelsight.model.inference.tiling import FramePlan

CAM_METHOD = ON_DEVICE_EXPLAIN[0]  # the one method computed here; the others go through the grad-cam package


def jet_lut() -> np.ndarray:
    """OpenCV's JET colormap as a (256, 3) uint8 RGB table, so device and CPU overlays use the same colours."""
    bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)
    return np.ascontiguousarray(bgr[:, 0, ::-1])


def area_weights(src: int, dst: int) -> torch.Tensor:
    """(dst, src) weights of OpenCV's INTER_AREA shrink along one axis: each output pixel averages the input
    pixels its footprint covers, a pixel cut by the footprint's edge by the share it covers."""
    scale = src / dst
    start = torch.arange(dst, dtype=torch.float64)[:, None] * scale
    pixel = torch.arange(src, dtype=torch.float64)[None, :]
    covered = torch.minimum(start + scale, pixel + 1) - torch.maximum(start, pixel)
    return (covered.clamp(min=0) / scale).float()


def resize(gray: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, H, W) gray levels at ``size`` x ``size`` exactly as preprocess.resize_for_model gives them.

    Frames larger than the input on both sides (a camera's, the usual case) shrink here by OpenCV's
    INTER_AREA arithmetic: exact sums for an integer factor, its footprint weights otherwise, rounded to whole
    levels as its uint8 result is. Smaller frames are resized by OpenCV itself, on the CPU: they are small, and
    OpenCV's fixed-point bilinear is not worth copying."""
    count, _, height, width = gray.shape
    if (height, width) == (size, size):
        return gray
    if height % size == 0 and width % size == 0:  # OpenCV's integer-factor path: exact sums
        ky, kx = height // size, width // size
        sums = gray.reshape(count, 1, size, ky, size, kx).sum(dim=(3, 5))
        if (ky, kx) == (2, 2):  # its vector code for halving rounds halves up
            return torch.floor((sums + 2) / 4)
        return (sums * torch.tensor(1 / (ky * kx), dtype=torch.float32)).round_()
    if height >= size and width >= size:
        rows, cols = (area_weights(n, size).to(gray.device) for n in (height, width))
        return (rows @ gray @ cols.T).round_()
    small = gray[:, 0].to("cpu", torch.uint8).numpy()
    return torch.from_numpy(np.stack([resize_for_model(g, size) for g in small])).to(gray.device)[:, None].float()


class DeviceExplainer:
    """:meth:`Predictor.explain` (gradcam) for single-tile frames, on the predictor's device, with JPEG overlays."""

    def __init__(self, predictor: Predictor, jpeg_quality: int = 90):
        self.predictor = predictor
        self.device = predictor.device
        self.jpeg_quality = jpeg_quality
        self.lut = torch.from_numpy(jet_lut()).to(self.device, torch.float32)

    def _upload(self, grays: Sequence[np.ndarray]) -> torch.Tensor:
        """Frames of one size on the device as (N, 1, H, W) float gray levels: one copy, no work on the CPU."""
        return torch.from_numpy(np.stack(grays)).to(self.device)[:, None].float()

    def _gradcam(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits, and Grad-CAM of the predicted class at the feature map's size rescaled to [0, 1] per image
        (grad-cam's GradCAM: channel weights = mean gradient, ReLU of the weighted sum, min-max rescale)."""
        net = self.predictor.net
        feats = feats.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = net.classify(feats)
            target = logits.argmax(dim=1, keepdim=True)
            (grads,) = torch.autograd.grad(logits.gather(1, target).sum(), feats)
        cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * feats.detach()).sum(dim=1, keepdim=True))
        return logits.detach(), rescale(cam)

    @torch.inference_mode()
    def _overlay(self, gray: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
        """overlay_heatmap on tensors: (N, 1, H, W) gray levels and heatmaps in [0, 1] -> (N, 3, H, W) uint8."""
        color = self.lut[(255 * heat[:, 0]).to(torch.uint8).long()]  # truncated, as np.uint8 does
        mix = gray[:, 0, ..., None] * OVERLAY_IMAGE_WEIGHT + color * (1 - OVERLAY_IMAGE_WEIGHT)
        mix = mix * (255.0 / mix.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6))  # each image to full range
        return mix.round_().clamp_(0, 255).to(torch.uint8).permute(0, 3, 1, 2)

    def explain(self, grays: Sequence[np.ndarray], heatmaps: bool = False) -> list[Explanation]:
        """An explanation per frame with ``overlay_bytes`` (JPEG) set and ``overlay`` left empty; ``heatmaps``:
        also the heatmap as a numpy array at the frame's size (a copy back per frame, for checks and the UI)."""
        grays = [as_gray(g) for g in grays]
        size = self.predictor.batch_size
        out: list[Explanation] = []
        for start in range(0, len(grays), size):
            out.extend(self._batch(grays[start : start + size], heatmaps))
        return out

    def _batch(self, grays: list[np.ndarray], heatmaps: bool) -> list[Explanation]:
        p = self.predictor
        sizes: dict[tuple[int, int], list[int]] = {}  # frames of one size go through each step together
        for i, gray in enumerate(grays):
            sizes.setdefault(gray.shape, []).append(i)
        groups = [(idx, self._upload([grays[i] for i in idx])) for idx in sizes.values()]
        order = [i for idx, _ in groups for i in idx]
        batch = torch.cat([resize(frames, p.input_size) for _, frames in groups]).div_(255.0)
        feats, texture = p.trunk(batch)
        logits, cams = self._gradcam(feats.to(self.device))
        ordered = [grays[i] for i in order]
        with torch.inference_mode():
            preds = p.postprocess(ordered, logits, p.net.pooled(feats.to(self.device)), texture)
            # grad-cam resizes to the input first; the CPU path then resizes that to the frame
            cams = F.interpolate(cams, size=(p.input_size, p.input_size), mode="bilinear", align_corners=False)
            heats, overlays, start = [], [], 0
            for idx, frames in groups:
                heat = resize_heat(cams[start : start + len(idx)], *frames.shape[-2:])
                heats.extend(heat.unbind(0))
                overlays.extend(self._overlay(frames, heat).unbind(0))
                start += len(idx)
        if self.device.type == "cuda":
            # nvJPEG encodes on a stream of its own: the overlays must be written first (pytorch/vision#9060)
            torch.cuda.current_stream(self.device).synchronize()
        jpegs = joined(encode_jpeg([o.contiguous() for o in overlays], quality=self.jpeg_quality))
        out: list[Explanation | None] = [None] * len(grays)
        for i, pred, data, heat in zip(order, preds, jpegs, heats, strict=True):
            out[i] = Explanation(**{f.name: getattr(pred, f.name) for f in fields(pred)}, cam_class=pred.label,
                                 heatmap=heat[0].cpu().numpy() if heatmaps else None, overlay_bytes=data)
        return out


def joined(encoded: list[torch.Tensor]) -> list[bytes]:
    """Encoded images as bytes, copied back from the device at once rather than one wait per image."""
    ends = np.cumsum([int(e.numel()) for e in encoded])
    flat = torch.cat(encoded).cpu().numpy().tobytes()
    return [flat[end - size : end] for end, size in zip(ends, (int(e.numel()) for e in encoded), strict=True)]


def rescale(cam: torch.Tensor) -> torch.Tensor:
    """Each (1, h, w) map of a batch minus its minimum, over its maximum: grad-cam's ``scale_cam_image``."""
    flat = cam.flatten(1)
    low = flat.min(dim=1).values[:, None, None, None]
    cam = cam - low
    high = cam.flatten(1).max(dim=1).values[:, None, None, None]
    return cam / (1e-7 + high)


def resize_heat(heat: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 1, h, w) input-size heatmaps at the frames' size (bilinear, as cv2.INTER_LINEAR), clipped to [0, 1]."""
    if heat.shape[-2:] != (height, width):
        heat = F.interpolate(heat, size=(height, width), mode="bilinear", align_corners=False)
    return heat.clamp_(0.0, 1.0)


def explain_plans_on_device(explainer: DeviceExplainer, plans: Sequence[FramePlan]) -> list[FrameExplanation]:
    """:meth:`Predictor.explain_plans` (gradcam) with the single-tile frames explained on the device and their
    overlays already JPEG (``overlay_bytes``); tiled frames take the CPU path (``overlay`` set, to be encoded)."""
    single = [i for i, plan in enumerate(plans) if plan.single]
    tiled = [i for i, plan in enumerate(plans) if not plan.single]
    out: list[FrameExplanation | None] = [None] * len(plans)
    if single:
        for i, exp in zip(single, explainer.explain([plans[i].gray for i in single]), strict=True):
            out[i] = FrameExplanation(**{f.name: getattr(exp, f.name) for f in fields(exp)})
    if tiled:
        for i, exp in zip(tiled, explainer.predictor.explain_plans([plans[i] for i in tiled], CAM_METHOD),
                          strict=True):
            out[i] = exp
    return out
