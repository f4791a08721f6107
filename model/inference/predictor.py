"""Predictor: load a checkpoint once, serve batches of decoded surfaces.

The inferencer contract is load -> pre-process -> forward -> post-process.
Worker, dashboard and CLI all go through this class; it knows nothing about
queues or storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from steelsight.model.inference.backends.factory import make_trunk
from steelsight.model.inference.cam import CheapCam
from steelsight.model.inference.checkpoint import LoadedCheckpoint, load_checkpoint
from steelsight.model.inference.device import resolve_device
from steelsight.model.inference.preprocess import eval_batch
from steelsight.model.inference.quality import quality_issue


@dataclass
class Prediction:
    label: str
    confidence: float
    probabilities: dict[str, float]
    ood_score: float | None = None
    unknown: bool = False
    unknown_reason: str | None = None  # "ood_score" or an input-quality issue (model/inference/quality.py)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Explanation(Prediction):
    cam_class: str = ""
    heatmap: np.ndarray = field(default=None, repr=False)  # (H, W) float32 in [0, 1], input size
    overlay: np.ndarray = field(default=None, repr=False)  # (H, W, 3) uint8 RGB, input size

    def to_dict(self) -> dict:
        data = super().to_dict()
        data.pop("heatmap")
        data.pop("overlay")
        return data


def as_gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2GRAY)
    if image.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {image.dtype}")
    return image


def overlay_heatmap(gray: np.ndarray, heatmap: np.ndarray, image_weight: float = 0.55) -> np.ndarray:
    """JET heatmap blended over the surface, rescaled to full range: grad-cam's
    ``show_cam_on_image`` (within 1 gray level) in uint8 OpenCV ops, ~1.6x faster."""
    color = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * heatmap), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    mix = cv2.addWeighted(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB), image_weight, color, 1 - image_weight, 0.0,
                          dtype=cv2.CV_32F)
    return cv2.convertScaleAbs(mix, alpha=255.0 / max(float(mix.max()), 1e-6))


class Predictor:
    def __init__(self, checkpoint: LoadedCheckpoint, device: torch.device, batch_size: int = 16,
                 backend: str = "auto"):
        self.device = device
        self.batch_size = batch_size
        if device.type == "cuda":
            # PyTorch lets cuDNN run float32 convolutions in TF32: on an H100 that moved probabilities by up
            # to 5e-2 from the CPU's float32. Full float32 still ran ~4,900 frames/s there, far above what a
            # worker feeds it; torch-fp16 is the fast path (bench/results/history-0.1.md, micro-batching).
            torch.backends.cudnn.allow_tf32 = False
        self.checkpoint = checkpoint
        self.meta = checkpoint.meta
        self.net = checkpoint.model.to(device).eval().requires_grad_(False)
        self.ood = None if checkpoint.ood is None else checkpoint.ood.to(device)
        self.classes = list(self.meta.classes)
        self.input_size = int(self.meta.input_size)
        self.temperature = float(self.meta.temperature or 1.0)
        self.ood_threshold = self.meta.ood.get("threshold") if self.meta.ood else None
        # the trunk is ~99% of the compute; a backends/ runtime runs it (ONNX Runtime on CPU by default)
        self.trunk = make_trunk(backend, self.net, self.input_size, checkpoint.sha256)
        self.cam = CheapCam(self.net, self.trunk)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto", batch_size: int = 16,
             backend: str = "auto") -> Predictor:
        dev = resolve_device(device)
        return cls(load_checkpoint(path, device=dev), dev, batch_size, backend)

    # pre-process / post-process -------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return eval_batch([as_gray(img) for img in images], self.input_size).to(self.device)

    def _ood_scores(self, pooled: torch.Tensor, texture: torch.Tensor, log_probs: torch.Tensor
                    ) -> list[float | None]:
        if self.ood is None:
            return [None] * len(pooled)
        return self.ood(pooled.to(self.device), texture.to(self.device), log_probs.to(self.device)).cpu().tolist()

    def _unknown_reason(self, image: np.ndarray, score: float | None) -> str | None:
        issue = quality_issue(as_gray(image))
        if issue:
            return issue
        if score is not None and self.ood_threshold is not None and score > self.ood_threshold:
            return "ood_score"
        return None

    def _postprocess(self, images, logits: torch.Tensor, pooled: torch.Tensor, texture: torch.Tensor
                     ) -> list[Prediction]:
        log_probs = torch.log_softmax(logits.float() / self.temperature, dim=1)
        probs = log_probs.exp().cpu()
        preds = []
        for image, row, score in zip(images, probs, self._ood_scores(pooled, texture, log_probs), strict=True):
            index = int(row.argmax())
            reason = self._unknown_reason(image, score)
            preds.append(
                Prediction(
                    label=self.classes[index],
                    confidence=float(row[index]),
                    probabilities={c: float(p) for c, p in zip(self.classes, row, strict=True)},
                    ood_score=None if score is None else float(score),
                    unknown=reason is not None,
                    unknown_reason=reason,
                )
            )
        return preds

    # forward ------------------------------------------------------------------
    def _chunks(self, images: Sequence[np.ndarray]):
        for start in range(0, len(images), self.batch_size):
            yield images[start : start + self.batch_size]

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Label, confidence, all probabilities and the OOD verdict for each image."""
        results: list[Prediction] = []
        for chunk in self._chunks(images):
            feats, texture = self.trunk(self.preprocess(chunk))
            pooled = self.net.pooled(feats.to(self.device))
            results.extend(self._postprocess(chunk, self.net.head(pooled), pooled, texture))
        return results

    def explain(
        self, images: Sequence[np.ndarray], method: str = "gradcam", targets: Sequence[int] | None = None
    ) -> list[Explanation]:
        """Prediction plus a CAM heatmap and overlay at each input's own size.

        ``targets`` picks the class to explain per image; by default the predicted one.
        """
        results: list[Explanation] = []
        for offset, chunk in enumerate(self._chunks(images)):
            chunk_targets = None
            if targets is not None:
                start = offset * self.batch_size
                chunk_targets = list(targets[start : start + len(chunk)])
            results.extend(self._explain_batch(chunk, method, chunk_targets))
        return results

    def _explain_batch(self, images, method, targets) -> list[Explanation]:
        batch = self.preprocess(images)
        heatmaps, logits, feats, texture = self.cam(batch, targets, method)
        feats = feats.to(self.device)
        with torch.inference_mode():
            preds = self._postprocess(images, logits, self.net.pooled(feats), texture)
        out = []
        for i, (image, pred, heat) in enumerate(zip(images, preds, heatmaps, strict=True)):
            gray = as_gray(image)
            heat = cv2.resize(heat, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)
            heat = np.clip(heat, 0.0, 1.0).astype(np.float32)
            target = self.classes[targets[i]] if targets is not None else pred.label
            out.append(Explanation(**asdict(pred), cam_class=target, heatmap=heat,
                                   overlay=overlay_heatmap(gray, heat)))
        return out
