"""Frame engine: fetch frames, run one batched predict + Grad-CAM, upload overlays.

It turns frames into outcomes (:mod:`worker.outcome`) and knows nothing about RQ;
the worker and the plain job function hand it work and settle what it hands back.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import cv2
import numpy as np
from PIL import Image

from steelsight.clients import PERMANENT, MissingObject, ObjectStore, s3_transient
from steelsight.contract import OVERLAY_FORMATS, UNKNOWN, Frame, FrameResult, Settings, Timings
from steelsight.model.inference.imageio import DecodeLimits, ImageRejected, decode_gray, encode_overlay
from steelsight.model.inference.ondevice import DeviceExplainer, explain_plans_on_device
from steelsight.model.inference.predictor import Predictor
from steelsight.model.inference.tiling import FramePlan, TilingConfig, TooManyTiles, plan_frame, tile_count
from steelsight.retry import with_backoff

from . import metrics
from .health import Liveness
from .outcome import Done, Failed, Outcome, Pending, ShadowVerdict

log = logging.getLogger("steelsight.worker")
T = TypeVar("T")


@dataclass
class Loaded:
    """A fetched frame, decoded and planned: the model will run ``tiles`` inputs for it."""

    plan: FramePlan
    tiles: int


@dataclass
class Decoded:
    frame: Frame
    plan: FramePlan


class PixelBudget:
    """At most ``limit`` pixels held at once across threads; a larger request waits until it is alone."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int):
        pixels = min(pixels, self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header, without decoding; (0, 0) when unreadable (the decoder says why)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:
        return 0, 0


def shrink(gray: np.ndarray, max_side: int) -> np.ndarray:
    """``gray`` at most ``max_side`` px on its longer side (area-averaged), so nothing downstream is full size."""
    height, width = gray.shape[:2]
    if max(height, width) <= max_side:
        return gray
    scale = max_side / max(height, width)
    size = (max(round(width * scale), 1), max(round(height * scale), 1))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA)


def sampled(job_id: str, share: float) -> bool:
    """Whether a frame is in a ``share`` sample: by its job id's hash, so a retried frame is sampled alike."""
    digest = hashlib.blake2b(job_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2**64


def verdict_of(prediction) -> str:
    """A prediction's verdict as :attr:`FrameResult.verdict` words it (it was read, so never "rejected")."""
    return UNKNOWN if prediction.unknown else prediction.label


@dataclass(frozen=True)
class Shadow:
    """A challenger scoring ``share`` of the frames beside the live model; its verdicts are only compared."""

    predictor: Predictor
    share: float


class FrameEngine:
    """Turns frames into outcomes with the live model; a new model or shadow is staged and taken up between batches.

    :meth:`stage` and :meth:`set_shadow` may be called from any thread; :meth:`compute`
    picks the staged model up as it starts a batch, so a batch is computed, and its
    results stamped, by one model only.
    """

    def __init__(self, predictor: Predictor, store: ObjectStore, settings: Settings,
                 on_shadow: Callable[[list[ShadowVerdict]], None] | None = None):
        self.predictor = predictor
        self.store = store
        self.settings = settings
        self.on_shadow = on_shadow
        self._staged: Predictor | None = None
        self._shadow: Shadow | None = None
        self._models = threading.Lock()
        self._batch = threading.Lock()  # held while a batch computes: a switch waits for the batch's end
        self.switched_at: datetime | None = None
        self.limits = DecodeLimits(max_bytes=settings.max_frame_bytes)
        self.worker_name = socket.gethostname()  # results name their worker; run_worker sets its full name
        self.io = ThreadPoolExecutor(max_workers=8, thread_name_prefix="s3-io")
        self.decoding = PixelBudget(settings.decode_pixel_budget)
        self.tiling = TilingConfig.from_settings(settings)
        self.tiling.size(predictor.input_size)  # a tiling the checkpoint cannot use stops the worker at start
        self._on_device: DeviceExplainer | None = None
        self._publish_model(predictor)

    @staticmethod
    def _publish_model(predictor: Predictor) -> None:
        metrics.MODEL.info({"checkpoint_sha256": predictor.checkpoint.sha256,
                            "checkpoint": predictor.checkpoint.path.name,
                            "input_size": str(predictor.input_size), "device": str(predictor.device)})

    # -- models: the live one, one staged to replace it, a shadow

    @property
    def serving_sha256(self) -> str:
        return self.predictor.checkpoint.sha256

    @property
    def staged_sha256(self) -> str | None:
        with self._models:
            return self._staged.checkpoint.sha256 if self._staged else None

    @property
    def shadow(self) -> Shadow | None:
        return self._shadow

    @property
    def shadow_sha256(self) -> str | None:
        shadow = self._shadow
        return shadow.predictor.checkpoint.sha256 if shadow else None

    def stage(self, predictor: Predictor) -> None:
        """Serve ``predictor`` from the next batch on; the batch in hand finishes with the model it started with.

        An idle engine switches at once, so an idle worker reports the new model too.
        """
        self.tiling.size(predictor.input_size)  # raises before staging a checkpoint the tiling cannot use
        with self._models:
            self._staged = predictor
        self.switch_if_idle()

    def unstage(self) -> None:
        """Drop a staged model that has not been taken up (the live pointer moved on)."""
        with self._models:
            self._staged = None

    def switch_if_idle(self) -> None:
        """Take a staged model up now if no batch is in hand (else the next batch takes it up)."""
        if self._batch.acquire(blocking=False):
            try:
                self._take_staged()
            finally:
                self._batch.release()

    def between_batches(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` while no batch computes (the work loop waits for it before its next batch)."""
        with self._batch:
            return fn()

    def set_shadow(self, shadow: Shadow | None) -> None:
        with self._models:
            self._shadow = shadow

    def _take_staged(self) -> Predictor:
        """The model for the batch about to start: the staged one if any (a switch), else the current one."""
        with self._models:
            staged, self._staged = self._staged, None
        if staged is not None and staged is not self.predictor:
            previous, self.predictor = self.predictor, staged
            self.switched_at = datetime.now(UTC)
            self._publish_model(staged)
            metrics.MODEL_SWITCHES.inc()
            log.info("switched model %s… -> %s… between batches", previous.checkpoint.sha256[:12],
                     staged.checkpoint.sha256[:12])
        return self.predictor

    def _s3_retry(self, fn, what: str):
        """Ride out an S3 outage for up to ``s3_retry_window_s``; then the job fails and RQ retries it."""
        return with_backoff(fn, what, s3_transient, attempts=None, give_up_after_s=self.settings.s3_retry_window_s,
                            permanent=PERMANENT,
                            on_retry=lambda exc, delay: metrics.RETRIES.labels(service="s3").inc())

    def _fetch(self, frame: Frame) -> bytes:
        key = frame.object_key
        return self._s3_retry(lambda: self.store.get(self.settings.frames_bucket, key, self.settings.max_frame_bytes),
                              f"fetch {key}")

    def _load(self, frame: Frame) -> Loaded:
        """The frame decoded: at full size when it will be tiled, else shrunk (it is resized to one input anyway).

        A frame needing more tiles than allowed is refused from its header, before decoding. The frame is
        planned here, on its own, so a frame the tiling cannot plan fails its job alone, not the batch.
        """
        data = self._fetch(frame)
        width, height = header_size(data)
        if width and height:
            self._tile_count(height, width)
        with self.decoding.hold(width * height):  # planning's float copies count against the budget too
            gray = decode_gray(data, self.limits)
            tiles = self._tile_count(*gray.shape[:2])
            if tiles == 1:
                gray = shrink(gray, self.settings.max_frame_side)
            plan = plan_frame(gray, self.tiling, self.predictor.input_size)
            # input drift (the InputDrift alert): brightness, contrast and sharpness at the model's scale
            metrics.observe_input(frame.line_id, plan.scaled)
            return Loaded(plan, tiles)

    def _tile_count(self, height: int, width: int) -> int:
        """Tiles a frame this size takes; raises :class:`TooManyTiles` past ``max_tiles_per_frame``."""
        tiles = tile_count(height, width, self.tiling, self.predictor.input_size)
        if tiles > self.tiling.max_tiles:
            raise TooManyTiles(tiles, self.tiling.max_tiles, (height, width))
        return tiles

    def _upload_overlay(self, frame: Frame, exp) -> str:
        fmt = self.settings.overlay_format
        key, content_type = frame.overlay_key(fmt), OVERLAY_FORMATS[fmt][1]
        data = exp.overlay_bytes or encode_overlay(exp.overlay, fmt, self.settings.overlay_jpeg_quality,
                                                   self.settings.overlay_png_level)
        self._s3_retry(lambda: self.store.put(self.settings.overlays_bucket, key, data, content_type),
                       f"upload overlay {key}")
        return key

    def _rejected(self, frame: Frame, reason: str, started: float, batch_start: datetime, model: str) -> FrameResult:
        return self._result(frame, started, batch_start, 0.0, model, status="rejected", reason=reason)

    def _result(self, frame, started, batch_start, inference_s, model: str, **fields) -> FrameResult:
        wait = max((batch_start - frame.enqueued_at).total_seconds(), 0.0)
        return FrameResult(
            frame_id=frame.frame_id, job_id=frame.job_id, line_id=frame.line_id, camera_id=frame.camera_id,
            captured_at=frame.captured_at, frame_key=frame.object_key, worker=self.worker_name,
            checkpoint_sha256=model,
            timings=Timings(queue_wait_s=wait, inference_s=inference_s, total_s=wait + time.perf_counter() - started),
            **fields,
        )

    def prefetch(self, frames: list[Frame]) -> dict[str, Future]:
        """Start fetching and decoding ``frames`` on the I/O threads; hand the futures to :meth:`compute`.

        Concurrent, so a batch's S3 round trips overlap instead of adding up, and the
        worker can fetch the next batch while this one computes.
        """
        return {frame.job_id: self.io.submit(self._load, frame) for frame in frames}

    def compute(self, frames: list[Frame], loads: dict[str, Future] | None = None) -> dict[str, Outcome | Pending]:
        """One outcome per job id, without waiting for the overlay uploads: an ok frame's is :class:`Pending`.

        The caller settles them (:func:`worker.outcome.settle`), so the model can start
        the next batch while this one's overlays are still on their way to S3.
        """
        with self._batch:
            return self._compute(frames, loads)

    def _compute(self, frames: list[Frame], loads: dict[str, Future] | None) -> dict[str, Outcome | Pending]:
        started, batch_start = time.perf_counter(), datetime.now(UTC)
        predictor = self._take_staged()
        model = predictor.checkpoint.sha256
        outcomes: dict[str, Outcome | Pending] = {}
        decoded: list[Decoded] = []
        loads = loads if loads is not None else self.prefetch(frames)
        for frame in frames:
            load = loads[frame.job_id]
            metrics.QUEUE_WAIT_SECONDS.observe(max((batch_start - frame.enqueued_at).total_seconds(), 0.0))
            try:
                decoded.append(Decoded(frame, load.result().plan))
            except ImageRejected as exc:
                outcomes[frame.job_id] = Done(self._rejected(frame, f"{exc.reason.value}: {exc.detail}", started,
                                                             batch_start, model))
            except MissingObject as exc:
                outcomes[frame.job_id] = Done(self._rejected(frame, f"missing_object: {exc}", started, batch_start,
                                                             model))
            except TooManyTiles as exc:
                outcomes[frame.job_id] = Done(self._rejected(frame, f"too_many_tiles: {exc}", started, batch_start,
                                                             model))
            except Exception as exc:  # transient after retries, or unexpected: fail this job only
                outcomes[frame.job_id] = Failed(exc)
        if decoded:
            explained, inference_s = self._infer(predictor, decoded)
            share = inference_s / len(decoded)
            outcomes.update({item.frame.job_id: Pending(self.io.submit(self._upload_and_report, item.frame, exp,
                                                                       started, batch_start, share, model))
                             for item, exp in zip(decoded, explained, strict=True)})
            self._score_shadow(predictor, decoded, explained)
        metrics.BATCH_SIZE.observe(len(frames))
        return outcomes

    def _device_explainer(self, predictor: Predictor) -> DeviceExplainer | None:
        """The explainer that keeps the batch on the model's device (ondevice.py), when the settings ask for it
        (``explain_on_device``; ``auto``: on a GPU and where it computes what the settings ask), else None."""
        if not self.settings.explains_on_device(predictor.device.type):
            return None
        if self._on_device is None or self._on_device.predictor is not predictor:
            self._on_device = DeviceExplainer(predictor, self.settings.overlay_jpeg_quality)
            log.info("explaining single-tile frames on %s: resize, Grad-CAM, overlay and JPEG on the device",
                     predictor.device)
        return self._on_device

    def _infer(self, predictor: Predictor, decoded: list[Decoded]) -> tuple[list, float]:
        """The batch's explanations and the model time they took."""
        t0 = time.perf_counter()
        plans = [d.plan for d in decoded]
        on_device = self._device_explainer(predictor)
        # a wide frame's tiles share the model's batches with the other frames' tiles
        explained = (explain_plans_on_device(on_device, plans) if on_device
                     else predictor.explain_plans(plans, self.settings.cam_method))
        inference_s = time.perf_counter() - t0
        metrics.INFERENCE_SECONDS.observe(inference_s)
        return explained, inference_s

    def _score_shadow(self, champion: Predictor, decoded: list[Decoded], explained: list) -> None:
        """The challenger's verdicts on its share of the batch, handed to ``on_shadow`` beside the live ones."""
        shadow = self._shadow
        if shadow is None or self.on_shadow is None or shadow.predictor is champion:
            return  # a shadow promoted to live has nothing to be compared with
        picked = [(d, e) for d, e in zip(decoded, explained, strict=True) if sampled(d.frame.job_id, shadow.share)]
        if not picked:
            return
        t0 = time.perf_counter()
        try:
            challenged = shadow.predictor.predict_plans([d.plan for d, _ in picked])
        except Exception:  # the challenger must never cost the live frames anything
            log.exception("shadow model %s… failed on a batch; its verdicts are skipped",
                          shadow.predictor.checkpoint.sha256[:12])
            metrics.SHADOW_FAILURES.inc()
            return
        metrics.SHADOW_SECONDS.observe(time.perf_counter() - t0)
        verdicts = [ShadowVerdict(job_id=d.frame.job_id, line_id=d.frame.line_id,
                                  champion_sha256=champion.checkpoint.sha256,
                                  challenger_sha256=shadow.predictor.checkpoint.sha256, champion=verdict_of(e),
                                  challenger=verdict_of(c))
                    for (d, e), c in zip(picked, challenged, strict=True)]
        self.io.submit(self._record_shadow, verdicts)  # a slow Redis must not hold the model thread

    def _record_shadow(self, verdicts: list[ShadowVerdict]) -> None:
        try:
            self.on_shadow(verdicts)
        except Exception:
            log.exception("recording %d shadow verdicts failed", len(verdicts))
            metrics.SHADOW_FAILURES.inc()

    def _upload_and_report(self, frame: Frame, exp, started: float, batch_start: datetime,
                           inference_s: float, model: str) -> FrameResult:
        overlay_key = self._upload_overlay(frame, exp)
        return self._result(
            frame, started, batch_start, inference_s, model, status="ok", label=exp.label, confidence=exp.confidence,
            probabilities=exp.probabilities, ood_score=exp.ood_score, unknown=exp.unknown,
            unknown_reason=exp.unknown_reason, overlay_key=overlay_key,
            tiles=[t.to_dict() for t in exp.tiles], defect_counts=exp.defect_counts,
            top_defect=exp.top_defect.to_dict() if exp.top_defect else None,
        )


def tiles_in(loads: dict[str, Future]) -> int:
    """Model inputs the loaded frames of a batch take (a frame not loaded yet, or failed, counts one)."""
    return sum(getattr(f.result(), "tiles", 1) if f.done() and f.exception() is None else 1
               for f in loads.values())


def ensure_buckets(store: ObjectStore, liveness: Liveness | None = None) -> ObjectStore:
    """The buckets exist (created if not), waiting out an object store that is not up yet."""
    with liveness.waiting("the object store") if liveness else contextlib.nullcontext():
        with_backoff(store.ensure_buckets, "create buckets", s3_transient, attempts=None, permanent=PERMANENT)
    return store


def build_engine(settings: Settings, liveness: Liveness | None = None, predictor: Predictor | None = None,
                 on_shadow: Callable[[list[ShadowVerdict]], None] | None = None) -> FrameEngine:
    """Load the model once (``settings.checkpoint`` unless ``predictor`` is given) and make sure the buckets
    exist (waiting out an object store that is not up yet)."""
    store = ensure_buckets(ObjectStore(settings), liveness)
    if predictor is None:
        predictor = Predictor.load(settings.checkpoint, device=settings.device,
                                   batch_size=max(settings.batch_size, 1), backend=settings.backend,
                                   unknown_false_rate=settings.unknown_false_rate)
    log.info("model %s loaded on %s (sha256 %s…)", predictor.checkpoint.path.name, predictor.device,
             predictor.checkpoint.sha256[:12])
    return FrameEngine(predictor, store, settings, on_shadow)
