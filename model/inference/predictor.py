"""Predictor: load a checkpoint once, serve batches of decoded surfaces.

The inferencer contract is load -> pre-process -> forward -> post-process.
Worker, dashboard and CLI all go through this class; it knows nothing about
queues or storage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import cv2
import numpy as np
import torch

from steelsight.contract import UNFAMILIAR_REASON, unknown_kind
from steelsight.model.inference.backends.factory import make_trunk
from steelsight.model.inference.cam import CheapCam
from steelsight.model.inference.checkpoint import LoadedCheckpoint, load_checkpoint
from steelsight.model.inference.device import resolve_device
from steelsight.model.inference.ood import ood_threshold
from steelsight.model.inference.preprocess import eval_batch
from steelsight.model.inference.quality import fault_shows, input_statistics, quality_issue
from steelsight.model.inference.tiling import (
    BACKGROUND,
    UNKNOWN,
    FramePlan,
    Tile,
    TilingConfig,
    plan_frame,
    stitch,
    summarise,
)

log = logging.getLogger(__name__)


IMAGE_FIELDS = ("heatmap", "overlay", "overlay_bytes")  # an explanation's pictures, left out of its dict


@dataclass
class Prediction:
    label: str
    confidence: float
    probabilities: dict[str, float]
    ood_score: float | None = None
    unknown: bool = False
    unknown_reason: str | None = None  # contract.UNFAMILIAR_REASON or one of contract.CAMERA_REASONS

    def to_dict(self) -> dict:
        return {**asdict(self), "unknown_kind": unknown_kind(self.unknown_reason) if self.unknown else None}


@dataclass
class Explanation(Prediction):
    cam_class: str = ""
    heatmap: np.ndarray = field(default=None, repr=False)  # (H, W) float32 in [0, 1], input size
    overlay: np.ndarray = field(default=None, repr=False)  # (H, W, 3) uint8 RGB, input size
    overlay_bytes: bytes | None = field(default=None, repr=False)  # the overlay already encoded (ondevice.py)

    def to_dict(self) -> dict:
        data = super().to_dict()
        for name in IMAGE_FIELDS:
            data.pop(name)
        return data


@dataclass
class FramePrediction(Prediction):
    """A frame's verdict; for a frame larger than one tile, also its tiles' verdicts.

    Tiled frames: ``label`` is the most confident defect tile's class, else ``unknown`` when any
    tile is unknown, else ``background`` (tiling.summarise). ``confidence``, ``probabilities`` and
    ``ood_score`` are those of ``top_defect``; without one, those of the most out-of-distribution
    unknown tile; for an all-background frame confidence 1.0, no probabilities. A frame that fits
    one tile is predicted whole, exactly as :meth:`Predictor.predict`/``explain``, with no tiles.
    """

    tiles: list[Tile] = field(default_factory=list)
    defect_counts: dict[str, int] = field(default_factory=dict)  # class -> tiles neither background nor unknown
    top_defect: Tile | None = None

    def to_dict(self) -> dict:
        """Without heatmap and overlay; tiles, defect_counts and top_defect only for a tiled frame."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in IMAGE_FIELDS}
        if self.tiles:
            data["tiles"] = [t.to_dict() for t in self.tiles]
            data["top_defect"] = None if self.top_defect is None else self.top_defect.to_dict()
            data["defect_counts"] = dict(self.defect_counts)
        else:
            for name in ("tiles", "defect_counts", "top_defect"):
                data.pop(name)
        data["probabilities"] = dict(self.probabilities)
        data["unknown_kind"] = unknown_kind(self.unknown_reason) if self.unknown else None
        return data


@dataclass
class FrameExplanation(FramePrediction, Explanation):
    """A frame's verdict with the heatmap and overlay at the frame's own size (tiled: the tiles' CAMs
    stitched, averaged where tiles overlap, zero on background; ``cam_class`` is the top defect's class,
    empty without one)."""


def as_gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2GRAY)
    if image.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {image.dtype}")
    return image


OVERLAY_IMAGE_WEIGHT = 0.55  # the surface's share of an overlay's blend, the heatmap's the rest


def overlay_heatmap(gray: np.ndarray, heatmap: np.ndarray, image_weight: float = OVERLAY_IMAGE_WEIGHT) -> np.ndarray:
    """JET heatmap blended over the surface, rescaled to full range: grad-cam's
    ``show_cam_on_image`` (within 1 gray level) in uint8 OpenCV ops, which are faster."""
    color = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * heatmap), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    mix = cv2.addWeighted(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB), image_weight, color, 1 - image_weight, 0.0,
                          dtype=cv2.CV_32F)
    return cv2.convertScaleAbs(mix, alpha=255.0 / max(float(mix.max()), 1e-6))


class Predictor:
    def __init__(self, checkpoint: LoadedCheckpoint, device: torch.device, batch_size: int = 16,
                 backend: str = "auto", unknown_false_rate: float | None = None):
        self.device = device
        self.batch_size = batch_size
        if device.type == "cuda":
            # PyTorch lets cuDNN run float32 convolutions in TF32, which moves probabilities visibly away from
            # the CPU's float32; full float32 is still far faster than a worker feeds it, and torch-fp16 is
            # the fast path (bench/batch_sweep.py).
            torch.backends.cudnn.allow_tf32 = False
        self.checkpoint = checkpoint
        self.meta = checkpoint.meta
        self.net = checkpoint.model.to(device).eval().requires_grad_(False)
        self.classes = list(self.meta.classes)
        self.input_size = int(self.meta.input_size)
        self.temperature = float(self.meta.temperature or 1.0)
        self.unknown_false_rate = unknown_false_rate
        # the trunk is ~99% of the compute; a backends/ runtime runs it (ONNX Runtime on CPU by default)
        self.use_trunk(make_trunk(backend, self.net, self.input_size, checkpoint.sha256))

    def use_trunk(self, trunk) -> None:
        """Serve ``trunk``; its OOD scorer and threshold too when it brings its own (fitted on its features)."""
        self.trunk = trunk
        self.cam = CheapCam(self.net, trunk)
        own = getattr(trunk, "ood_calibration", None)
        if own is None and getattr(trunk, "needs_own_ood", False) and self.checkpoint.ood is not None:
            raise ValueError(f"the {trunk.name} trunk has no OOD scorer fitted on its features (its "
                             "*.ood.safetensors is missing): run `steelsight quantize` for this checkpoint again")
        self.use_ood(*(own if own is not None else (self.checkpoint.ood, self.meta.ood)))

    def use_ood(self, scorer, ood_meta: dict | None) -> None:
        """Score with ``scorer`` and take the threshold from ``ood_meta`` (its stored threshold and val scores)."""
        self.ood_meta = ood_meta
        self.ood = None if scorer is None else scorer.to(self.device)
        self.val_ood_scores = np.asarray((self.ood_meta or {}).get("val_scores", []), dtype=np.float64)
        self.ood_threshold = self._threshold(self.unknown_false_rate)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto", batch_size: int = 16,
             backend: str = "auto", unknown_false_rate: float | None = None) -> Predictor:
        dev = resolve_device(device)
        return cls(load_checkpoint(path, device=dev), dev, batch_size, backend, unknown_false_rate)

    def _threshold(self, unknown_false_rate: float | None) -> float | None:
        """The OOD score above which a frame is unknown: the checkpoint's own, or the one that leaves
        ``unknown_false_rate`` of its val images flagged (from the val scores the checkpoint stores)."""
        if unknown_false_rate is not None and not 0.0 <= unknown_false_rate < 1.0:
            raise ValueError(f"unknown_false_rate must be in [0, 1), not {unknown_false_rate}")
        stored = self.ood_meta.get("threshold") if self.ood_meta else None
        if unknown_false_rate is None or stored is None:
            return stored
        if not len(self.val_ood_scores):  # an older checkpoint: serve it as it was fitted
            log.warning("checkpoint %s stores no val OOD scores: its own threshold %.3f stands, not a %.2g%% "
                        "false-unknown rate (`steelsight refit-ood` adds them)", self.checkpoint.path.name, stored,
                        100 * unknown_false_rate)
            return stored
        return ood_threshold(self.val_ood_scores, unknown_false_rate)

    def val_share_below(self, score: float) -> float | None:
        """Share of the checkpoint's val images (in distribution) whose OOD score is below ``score``."""
        if not len(self.val_ood_scores):
            return None
        return float(np.mean(self.val_ood_scores < score))

    # pre-process / post-process -------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return eval_batch([as_gray(img) for img in images], self.input_size).to(self.device)

    def _ood_scores(self, pooled: torch.Tensor, texture: torch.Tensor, log_probs: torch.Tensor,
                    logits: torch.Tensor) -> tuple[list[float | None], list[str | None]]:
        if self.ood is None:
            return [None] * len(pooled), [None] * len(pooled)
        pooled, texture = pooled.to(self.device), texture.to(self.device)
        scores = self.ood(pooled, texture, log_probs.to(self.device), self.net.hidden(pooled), logits.to(self.device))
        return scores.cpu().tolist(), self.ood.camera_reasons(texture)

    def _unknown_reason(self, image: np.ndarray, score: float | None, camera: str | None) -> str | None:
        """A frame no camera on steel would give (quality gate); else, over the threshold, the camera fault it
        looks like (ood.CameraBank) when its own statistics show it (quality.fault_shows), or else
        "ood_score": not what the model knows."""
        gray = as_gray(image)
        issue = quality_issue(gray)
        if issue:
            return issue
        if score is not None and self.ood_threshold is not None and score > self.ood_threshold:
            if camera and fault_shows(camera, input_statistics(gray), self.meta.input_stats):
                return camera
            return UNFAMILIAR_REASON
        return None

    def postprocess(self, images, logits: torch.Tensor, pooled: torch.Tensor, texture: torch.Tensor
                    ) -> list[Prediction]:
        log_probs = torch.log_softmax(logits.float() / self.temperature, dim=1)
        probs = log_probs.exp().cpu()
        preds = []
        scores, cameras = self._ood_scores(pooled, texture, log_probs, logits)
        for image, row, score, camera in zip(images, probs, scores, cameras, strict=True):
            index = int(row.argmax())
            reason = self._unknown_reason(image, score, camera)
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
            results.extend(self.postprocess(chunk, self.net.head(pooled), pooled, texture))
        return results

    def explain(
        self, images: Sequence[np.ndarray], method: str = "gradcam", targets: Sequence[int] | None = None
    ) -> list[Explanation]:
        """Prediction plus a CAM heatmap and overlay at each input's own size.

        ``targets`` picks the class to explain per image; by default the predicted one.
        """
        return self._explain(images, method, targets, overlays=True)

    def _explain(self, images, method, targets, overlays: bool) -> list[Explanation]:
        results: list[Explanation] = []
        for offset, chunk in enumerate(self._chunks(images)):
            chunk_targets = None
            if targets is not None:
                start = offset * self.batch_size
                chunk_targets = list(targets[start : start + len(chunk)])
            results.extend(self._explain_batch(chunk, method, chunk_targets, overlays))
        return results

    def _explain_batch(self, images, method, targets, overlays: bool = True) -> list[Explanation]:
        batch = self.preprocess(images)
        heatmaps, logits, feats, texture = self.cam(batch, targets, method)
        feats = feats.to(self.device)
        with torch.inference_mode():
            preds = self.postprocess(images, logits, self.net.pooled(feats), texture)
        out = []
        for i, (image, pred, heat) in enumerate(zip(images, preds, heatmaps, strict=True)):
            gray = as_gray(image)
            heat = cv2.resize(heat, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)
            heat = np.clip(heat, 0.0, 1.0).astype(np.float32)
            target = self.classes[targets[i]] if targets is not None else pred.label
            out.append(Explanation(**asdict(pred), cam_class=target, heatmap=heat,
                                   overlay=overlay_heatmap(gray, heat) if overlays else None))
        return out

    # frames of any size: tiled at the model's scale (tiling.py) -------------------------------------
    def _plans(self, grays: Sequence[np.ndarray], tiling: TilingConfig) -> list[FramePlan]:
        return [plan_frame(as_gray(gray), tiling, self.input_size) for gray in grays]

    def predict_frames(self, grays: Sequence[np.ndarray], tiling: TilingConfig
                       ) -> list[FramePrediction]:
        """:meth:`predict` for frames of any size: a frame larger than one tile is tiled (tiling.py) and
        its tiles of all frames go through the network in shared batches.

        Raises ``tiling.TooManyTiles`` (a ValueError) for a frame over ``tiling.max_tiles``, before any
        inference; callers that must answer the other frames plan each one first (``tiling.plan_frame``)
        and hand the plans to :meth:`predict_plans`.
        """
        return self.predict_plans(self._plans(grays, tiling))

    def predict_plans(self, plans: Sequence[FramePlan]) -> list[FramePrediction]:
        """:meth:`predict_frames` for frames already planned."""
        crops = [crop for plan in plans for crop in plan.crops()]
        preds = iter(self.predict(crops) if crops else [])
        out = []
        for plan in plans:
            if plan.single:
                out.append(FramePrediction(**asdict(next(preds))))
                continue
            tiles = [self._tile(plan, window, None if window.background else next(preds))
                     for window in plan.windows]
            out.append(FramePrediction(**self._frame_fields(tiles, plan.unknown_share)))
        return out

    def explain_frames(self, grays: Sequence[np.ndarray], tiling: TilingConfig,
                       method: str = "gradcam") -> list[FrameExplanation]:
        """:meth:`explain` for frames of any size (see :meth:`predict_frames`): each tile is explained for
        its own predicted class; the heatmap is stitched at the frame's size and overlaid on the frame."""
        return self.explain_plans(self._plans(grays, tiling), method)

    def explain_plans(self, plans: Sequence[FramePlan], method: str = "gradcam") -> list[FrameExplanation]:
        """:meth:`explain_frames` for frames already planned."""
        crops = [crop for plan in plans for crop in plan.crops()]
        exps = iter(self._explain(crops, method, None, overlays=False) if crops else [])
        out = []
        for plan in plans:
            if plan.single:
                exp = next(exps)
                exp.overlay = overlay_heatmap(plan.gray, exp.heatmap)
                out.append(FrameExplanation(**{f.name: getattr(exp, f.name) for f in fields(exp)}))
                continue
            heatmaps, tiles = [], []
            for window in plan.windows:
                exp = None if window.background else next(exps)
                tiles.append(self._tile(plan, window, exp))
                heatmaps.append(None if exp is None else exp.heatmap)
            frame = self._frame_fields(tiles, plan.unknown_share)
            heat = stitch(plan, heatmaps)
            top = frame["top_defect"]
            out.append(FrameExplanation(**frame, cam_class="" if top is None else top.label, heatmap=heat,
                                        overlay=overlay_heatmap(plan.gray, heat)))
        return out

    @staticmethod
    def _tile(plan: FramePlan, window, pred: Prediction | None) -> Tile:
        x, y, w, h = plan.frame_box(window)
        if pred is None:
            return Tile(x, y, w, h, BACKGROUND, 1.0)
        return Tile(x, y, w, h, pred.label, pred.confidence, pred.unknown, pred.unknown_reason,
                    dict(pred.probabilities), pred.ood_score)

    @staticmethod
    def _frame_fields(tiles: list[Tile], unknown_share: float) -> dict:
        summary = summarise(tiles, unknown_share)
        rep = summary.representative
        return {
            "label": summary.label,
            "confidence": 1.0 if rep is None else rep.confidence,
            "probabilities": {} if rep is None or rep.probabilities is None else dict(rep.probabilities),
            "ood_score": None if rep is None else rep.ood_score,
            "unknown": summary.label == UNKNOWN,
            "unknown_reason": rep.unknown_reason if summary.label == UNKNOWN else None,
            "tiles": tiles,
            "defect_counts": summary.defect_counts,
            "top_defect": summary.top_defect,
        }
