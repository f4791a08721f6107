"""The pipeline contract: settings, names, object keys and the job/result schemas.

Producer, worker and dashboard import this module and nothing of each other.
"""

from __future__ import annotations

import base64
import hashlib
import re
import unicodedata
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, computed_field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from steelsight.model.inference.backends import BACKEND_NAMES

JOB_FUNCTION = "steelsight.worker.jobs.process_frame"
# letters, digits, '-' and '_' (RQ's job-id alphabet); '__' is reserved as the job-id separator
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,95}$")
JOB_ID_SEPARATOR = "__"
IMAGE_EXTENSIONS = ("bmp", "png", "jpg", "jpeg", "tif", "tiff", "webp", "gif", "pgm", "ppm")
CONTENT_TYPES = {"bmp": "image/bmp", "png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg",
                 "tif": "image/tiff", "tiff": "image/tiff", "webp": "image/webp", "gif": "image/gif",
                 "pgm": "image/x-portable-graymap", "ppm": "image/x-portable-pixmap"}
MAX_FRAME_BYTES = 20 * 1024 * 1024  # a frame file larger than this is refused (the decoder's default too)
OVERLAY_FORMATS = {"jpeg": ("jpg", "image/jpeg"), "png": ("png", "image/png")}  # extension, content type
# the bundled labelled frames (a folder per class): the demo's replay and a new checkpoint's smoke check
SAMPLE_FRAMES = Path(__file__).resolve().parents[1] / "deploy" / "samples"


# a tiled frame whose analysed tiles are at least this share unknown is unknown (Settings.frame_unknown_share)
FRAME_UNKNOWN_SHARE = 0.5
# share of in-distribution images (the checkpoint's val) the unknown verdict may flag (Settings.unknown_false_rate)
UNKNOWN_FALSE_RATE = 0.005
# what explain_on_device computes on the model's device: this CAM method, overlays in this format
ON_DEVICE_EXPLAIN = ("gradcam", "jpeg")

# an event a sink runner has held this long without refreshing its claim (its worker died) is taken over by
# another worker's runner; a live runner refreshes before each attempt, so one attempt and the pause before
# it (webhook_timeout_s + sink_retry_max_s) must stay well inside it (Settings._sink_claims_held)
SINK_CLAIM_IDLE_S = 60.0


class Settings(BaseSettings):
    """Every knob of the pipeline; env vars ``STEELSIGHT_<FIELD>`` or a ``.env`` file."""

    model_config = SettingsConfigDict(env_prefix="STEELSIGHT_", env_file=".env", extra="ignore")

    # Redis: password and TLS go in the URL (redis://:pw@host:6379/0, rediss://...)
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    queue_name: str = "steelsight-frames"
    key_prefix: str = "steelsight"

    # S3 / MinIO
    s3_endpoint: str = "localhost:9000"
    s3_public_endpoint: str | None = None  # host the browser can reach, for presigned URLs
    s3_secure: bool = False
    s3_public_secure: bool | None = None
    s3_region: str = "us-east-1"
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    frames_bucket: str = "steelsight-frames"
    overlays_bucket: str = "steelsight-overlays"
    library_bucket: str = Field(default="steelsight-library", description=(
        "private bucket of what is kept until deleted by hand (no expiry): the model registry (`models/`) and "
        "operator feedback with its frames (`feedback/`)"))
    presign_expiry_s: int = 900
    # a worker rides out an S3 outage this long per attempt; keep it below job_timeout_s
    s3_retry_window_s: float = 30.0
    # the object store deletes frames and overlays this many days after upload (a lifecycle rule on
    # both buckets); unset: as long as the result records (result_ttl_s, rounded up to whole days,
    # S3's unit); 0: never
    object_expiry_days: int | None = Field(default=None, ge=0)

    # jobs and results
    job_timeout_s: int = 60
    job_retries: int = 3
    # a failed attempt is retried after job_retry_backoff_s, doubling each time (5, 10, 20 s), and
    # never later than job_retry_window_s after the frame was enqueued
    job_retry_backoff_s: float = Field(default=5.0, ge=0)
    job_retry_window_s: float = Field(default=600.0, ge=0)
    # per-frame record (~1 KB in Redis), read by the dashboard, result and link; size Redis with
    # redis_bytes_needed (`steelsight check-sizing`): 1 day at 16 frames/s needs ~2.9 GiB
    result_ttl_s: int = 24 * 3600
    # RQ's own copy of a finished job and its return value (several times a record's size): kept short
    job_result_ttl_s: int = 3600
    failure_ttl_s: int = 30 * 24 * 3600
    stream_maxlen: int = 10_000
    max_queue_depth: int = 1_000
    max_frame_bytes: int = MAX_FRAME_BYTES

    # worker
    checkpoint: str | None = None
    device: str = "auto"
    # trunk runtime; auto: the fastest of ONNX Runtime, OpenVINO and a passing int8 trunk on CPU, torch on GPU
    backend: Literal[BACKEND_NAMES] = "auto"
    batch_size: int = 8
    cam_method: str = "gradcam"
    # Grad-CAM overlay file: JPEG (fast and small) or PNG for pixel-exact copies (bench/explain_overhead.py)
    overlay_format: Literal["jpeg", "png"] = "jpeg"
    overlay_jpeg_quality: int = Field(default=90, ge=50, le=100)
    # PNG deflate level: 0 stores it (fastest, largest), 1-9 compress (an order of magnitude slower)
    overlay_png_level: int = Field(default=0, ge=0, le=9)
    explain_on_device: Literal["auto", "on", "off"] = Field(default="auto", description=(
        "run resize, Grad-CAM, colormap, blend and the JPEG encode of single-tile frames (up to `tile_size`) on "
        "the model's device (model/inference/ondevice.py); the CPU keeps the decode, the quality gate and the "
        "upload, and the inference time then includes the encode. `auto`: on with a GPU, off on CPU. Tiled "
        "frames, PNG overlays and other CAM methods take the CPU path"))
    maintenance_interval_s: int = 30
    # a claimed frame's heartbeat lives claim_ttl_s and is renewed every second; every worker checks
    # for expired claims every reclaim_interval_s, so a dead worker's frames are re-queued within ~7 s
    claim_ttl_s: int = Field(default=6, ge=3)
    reclaim_interval_s: float = Field(default=1.0, gt=0)
    # /healthz on the metrics port fails once the work loop has not beaten this long
    health_stale_s: float = Field(default=20.0, gt=0)
    # memory: each frame is shrunk to max_frame_side on its longer side right after decoding (the model
    # works at its input size, overlays are for display), and a worker decodes at most
    # decode_pixel_budget full-size pixels at once (~1 byte each, plus the decoder's copy)
    max_frame_side: int = Field(default=1024, ge=256)
    decode_pixel_budget: int = Field(default=80_000_000, ge=1_000_000)
    # tiling (model/inference/tiling.py, docs/tiles.md)
    tile_size: int = Field(default=200, ge=8, description=(
        "a frame larger than one tile is cut into tiles of this side, each resized to the checkpoint's input and "
        "labelled on its own; 200: NEU's images, the scale the shipped model learned at"))
    tile_overlap_px: int = Field(default=0, ge=0, description="least overlap between neighbouring tiles, in pixels")
    frame_pixels_per_mm: float | None = Field(default=None, gt=0, description=(
        "the frames' resolution; with `model_pixels_per_mm` a frame is rescaled by model/frame before tiling, "
        "so a tile covers the surface a training image did"))
    model_pixels_per_mm: float | None = Field(default=None, gt=0, description=(
        "the resolution of the training images (NEU's for the shipped model), in which `tile_size` is counted"))
    max_tiles_per_frame: int = Field(default=256, ge=1, description=(
        "a frame needing more tiles is rejected (`too_many_tiles`) instead of tying up a worker"))
    frame_unknown_share: float = Field(default=FRAME_UNKNOWN_SHARE, gt=0, le=1, description=(
        "a tiled frame is `unknown` when at least this share of its (not background) tiles is: most of it is not "
        "what the model knows, so a defect label on the rest would be a guess; its defect tiles stay listed "
        "(`top_defect`). A 2-tile frame is then unknown with one unknown tile. 1: any defect tile names the frame"))
    # the unknown verdict (model/inference/ood.py, MODEL_CARD.md "Unknown verdict")
    unknown_false_rate: float = Field(default=UNKNOWN_FALSE_RATE, ge=0, lt=1, description=(
        "share of in-distribution images (the checkpoint's NEU val, in steps of one image) the unknown verdict may "
        "flag, per image or tile: sets the OOD score threshold. Lower: fewer false unknowns, more unfamiliar "
        "frames given a defect label (the trade-off per source: docs/model_card/ood_operating_curve.png). On "
        "unseen frames expect about one image more than on val (`evaluate --ood` prints the expectation and its "
        "interval)"))

    # model lifecycle: registry, hot reload, shadow (steelsight/registry.py, worker/models.py, docs/lifecycle.md)
    model_poll_s: float = Field(default=1.0, gt=0, description=(
        "how often a worker checks the live model pointer (`steelsight model promote`) and the shadow pointer"))
    model_cache_dir: str = Field(default="~/.cache/steelsight/models", description=(
        "where a worker keeps the registry's checkpoints it has downloaded (verified by sha256)"))
    smoke_samples: str | None = Field(default=None, description=(
        "folder of labelled sample frames (a subfolder per class) a checkpoint must pass before a worker serves "
        "it; unset: the bundled `deploy/samples`"))
    smoke_min_accuracy: float = Field(default=0.9, ge=0, le=1, description=(
        "share of the smoke samples a new checkpoint must label right (they are training images: any sound "
        "model of these classes labels nearly all); below it, or on any non-finite output, it is refused"))
    # active sampling: frames sent to the review queue without an operator (steelsight/feedback.py)
    review_unknown_share: float = Field(default=0.2, ge=0, le=1, description=(
        "share of unknown verdicts sent to the review queue"))
    review_margin: float = Field(default=0.2, ge=0, le=1, description=(
        "a verdict whose top two class probabilities are closer than this is low-margin"))
    review_low_margin_share: float = Field(default=0.2, ge=0, le=1, description=(
        "share of low-margin verdicts sent to the review queue"))
    review_random_share: float = Field(default=0.002, ge=0, le=1, description=(
        "share of all other analysed frames sent to the review queue, a random sample"))
    review_max_per_line_hour: int = Field(default=60, ge=0, description=(
        "frames sent to the review queue per line and clock hour at most (operators label them by hand)"))

    # dashboard
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 7860
    dashboard_metrics_port: int = 9102
    dashboard_user: str | None = None
    dashboard_password: SecretStr | None = None
    dashboard_refresh_s: float = 2.0
    max_upload_bytes: int = 10 * 1024 * 1024  # per file
    # per request: the upload route and the upload tab refuse more files, or more bytes together
    max_upload_files: int = Field(default=32, ge=1)
    max_upload_total_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    # images are decoded at most this many pixels on their longer side: a screen shows no more
    dashboard_image_max_side: int = Field(default=1024, ge=64)
    # a refresh waits this long for the images it shows; the rest keep loading for the next refresh
    dashboard_image_wait_s: float = Field(default=1.5, ge=0)
    # decoded images the dashboard keeps, in bytes (~3 MB for a 1024 px RGB frame)
    dashboard_cache_bytes: int = Field(default=128 * 1024 * 1024, ge=0)
    # results read per refresh at most: the live window covers at most this many frames
    dashboard_window_max_frames: int = Field(default=10_000, ge=100)

    # metrics
    metrics_port: int = 9100
    # the worker's /metrics and /healthz; 0.0.0.0 where a scraper or probe runs on another host (containers)
    metrics_host: str = "127.0.0.1"

    # alerts and event sinks
    prometheus_url: str | None = Field(default=None, description=(
        "Prometheus whose firing and pending alerts the dashboard's Metrics tab lists (`steelsight up` sets it); "
        "unset: none are shown"))
    alert_rules: str | None = Field(default=None, description=(
        "alert rules file `steelsight up` loads into its Prometheus; unset: `deploy/prometheus/rules.yml`"))
    sink_verdicts: str = Field(default="all", description=(
        "which finished frames are pushed to the event sinks: `all`, or a comma list of verdicts "
        "(a class, `background`, `unknown`, `rejected`)"))
    webhook_url: str | None = Field(default=None, description=(
        "http(s) URL each event is POSTed to as JSON, signed with `STEELSIGHT_WEBHOOK_SECRET`; unset: no webhook"))
    webhook_secret: SecretStr | None = Field(default=None, description=(
        "HMAC-SHA256 key of the webhook's `X-Steelsight-Signature` header; required with a webhook"))
    webhook_timeout_s: float = Field(default=5.0, gt=0, description="one webhook request's time limit, in seconds")
    mqtt_url: SecretStr | None = Field(default=None, description=(
        "MQTT broker events are published to at QoS 1, `mqtt://user:password@host:1883` (`mqtts://` for TLS); "
        "unset: no MQTT"))
    mqtt_topic: str = Field(default="steelsight", description=(
        "topic prefix: an event goes to `<prefix>/<line>/<camera>/<verdict>`"))
    sink_queue_max: int = Field(default=10_000, ge=1, description=(
        "events waiting per sink (in Redis) at most; while that many wait, newer events for the sink are dropped "
        "and counted (`steelsight_sink_dropped`)"))
    sink_retry_window_s: float = Field(default=3600.0, gt=0, description=(
        "an event a sink has not taken this long after its first attempt goes to the sink's dead-letter stream"))
    sink_retry_max_s: float = Field(default=20.0, gt=0, description=(
        "longest pause between two attempts of one event (the pause doubles from 0.5 s); with "
        "`webhook_timeout_s` under 30 s, so no other worker takes the event over meanwhile"))

    @property
    def smoke_samples_dir(self) -> Path:
        return Path(self.smoke_samples).expanduser() if self.smoke_samples else SAMPLE_FRAMES

    def to_env(self) -> dict[str, str]:
        """``STEELSIGHT_*`` variables that recreate these settings in a child process."""
        env = {}
        for name, value in self.model_dump().items():
            if value is not None:
                secret = getattr(value, "get_secret_value", None)
                env[f"STEELSIGHT_{name.upper()}"] = secret() if secret else str(value)
        return env

    @property
    def object_expiry(self) -> int:
        """Days the object store keeps a frame or overlay; 0 keeps them for good."""
        if self.object_expiry_days is not None:
            return self.object_expiry_days
        return -(-self.result_ttl_s // 86400)

    @property
    def results_stream(self) -> str:
        return f"{self.key_prefix}:results"

    def result_key(self, job_id: str) -> str:
        return f"{self.key_prefix}:result:{job_id}"

    # model lifecycle (steelsight/registry.py)
    @property
    def model_live_key(self) -> str:
        """The live model's sha256 (a string); unset: workers serve ``checkpoint``."""
        return f"{self.key_prefix}:model:live"

    @property
    def model_history_key(self) -> str:
        """Earlier live models, newest first (a list), for ``model rollback``."""
        return f"{self.key_prefix}:model:history"

    @property
    def model_audit_stream(self) -> str:
        """Who pushed, promoted, rolled back or shadowed what, and when (a stream of :class:`ModelEvent`)."""
        return f"{self.key_prefix}:model:audit"

    @property
    def model_shadow_key(self) -> str:
        """The challenger workers also score, and the share of frames (a hash: sha256, share)."""
        return f"{self.key_prefix}:model:shadow"

    @property
    def model_workers_key(self) -> str:
        """Each worker's model state (a hash: worker name -> :class:`WorkerModelState` JSON)."""
        return f"{self.key_prefix}:model:workers"

    def shadow_stats_key(self, challenger: str, champion: str) -> str:
        """Shadow counts of a challenger against one live model (a hash: ``frames:<verdict>``,
        ``agree:<verdict>`` per live verdict); a promotion or rollback starts a new pair."""
        return f"{self.key_prefix}:shadow:{challenger}:{champion}:stats"

    def shadow_seen_key(self, challenger: str, champion: str) -> str:
        return f"{self.key_prefix}:shadow:{challenger}:{champion}:seen"

    def shadow_disagree_stream(self, challenger: str, champion: str) -> str:
        return f"{self.key_prefix}:shadow:{challenger}:{champion}:disagree"

    # feedback and review (steelsight/feedback.py)
    @property
    def feedback_index_key(self) -> str:
        return f"{self.key_prefix}:feedback"

    def feedback_key(self, job_id: str) -> str:
        return f"{self.key_prefix}:feedback:{job_id}"

    @property
    def review_queue_key(self) -> str:
        return f"{self.key_prefix}:review"

    def review_item_key(self, job_id: str) -> str:
        return f"{self.key_prefix}:review:item:{job_id}"

    @field_validator("webhook_url")
    @classmethod
    def _http_webhook(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"webhook_url must be an http:// or https:// URL, not {value!r}")
        if value is not None and not urlsplit(value).hostname:
            raise ValueError(f"webhook_url {value!r} names no host")
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_broker(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parts = urlsplit(value.get_secret_value())
            if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
                raise ValueError("mqtt_url must be mqtt://[user:password@]host[:port] or mqtts://…")
        return value

    def event_sinks(self) -> list[str]:
        """The configured event sinks' names, each with an outbox stream in Redis."""
        return [name for name, url in (("webhook", self.webhook_url), ("mqtt", self.mqtt_url)) if url]

    @model_validator(mode="after")
    def _signed_webhook(self):
        if self.webhook_url and not (self.webhook_secret and self.webhook_secret.get_secret_value()):
            raise ValueError("webhook_url needs webhook_secret: every event is signed with it (HMAC-SHA256)")
        return self

    @model_validator(mode="after")
    def _sink_claims_held(self):
        longest = self.sink_retry_max_s + self.webhook_timeout_s
        if self.event_sinks() and longest >= SINK_CLAIM_IDLE_S / 2:
            raise ValueError(
                f"sink_retry_max_s + webhook_timeout_s must stay under {SINK_CLAIM_IDLE_S / 2:g} s (they are "
                f"{longest:g} s): a runner that goes longer without refreshing its claim on an event may see another "
                f"worker take the event over after {SINK_CLAIM_IDLE_S:g} s, and the sink gets it twice")
        return self

    def explains_on_device(self, device_type: str) -> bool:
        """Whether a worker whose model runs on ``device_type`` ("cpu", "cuda") takes the on-device explain path."""
        if (self.cam_method, self.overlay_format) != ON_DEVICE_EXPLAIN:
            return False  # what the validator refuses with "on"; "auto" keeps the CPU path then
        return self.explain_on_device == "on" or (self.explain_on_device == "auto" and device_type == "cuda")

    @model_validator(mode="after")
    def _device_explain_possible(self):
        if self.explain_on_device == "on" and (self.cam_method, self.overlay_format) != ON_DEVICE_EXPLAIN:
            cam, fmt = ON_DEVICE_EXPLAIN
            raise ValueError(f"explain_on_device=on computes {cam} overlays as {fmt.upper()}, not {self.cam_method} "
                             f"as {self.overlay_format}: set cam_method={cam} and overlay_format={fmt}, or "
                             "explain_on_device=auto")
        return self

    @model_validator(mode="after")
    def _coherent_tiling(self):
        if self.tile_overlap_px >= self.tile_size:
            raise ValueError(f"tile_overlap_px ({self.tile_overlap_px}) must be smaller than tile_size "
                             f"({self.tile_size})")
        if (self.frame_pixels_per_mm is None) != (self.model_pixels_per_mm is None):
            raise ValueError("frame_pixels_per_mm and model_pixels_per_mm go together: set both or neither")
        return self


# Redis bytes per frame, upper bounds of MEMORY USAGE after frames through a worker
# (tests/integration/test_redis_sizing.py and test_wide_frames.py fail when a measurement exceeds them)
REDIS_RECORD_BYTES = 1_200  # steelsight:result:<job id>, kept result_ttl_s
REDIS_JOB_BYTES = 7_500  # RQ's job hash and its result, kept job_result_ttl_s
REDIS_STREAM_ENTRY_BYTES = 1_400  # one results-stream entry, capped at stream_maxlen
REDIS_TILE_BYTES = 200  # each tile of a tiled frame, in each of the record, RQ's result and the stream entry
# an event in a sink's outbox is a stream entry holding the result (REDIS_STREAM_ENTRY_BYTES); a dead letter
# adds its error (at most 500 characters) and attempt count
REDIS_DEAD_LETTER_EXTRA_BYTES = 600
REDIS_BASE_BYTES = 16 * 1024**2  # an idle Redis with RQ's registries, scripts and clients
REDIS_HEADROOM = 1.25  # allocator fragmentation and the copy-on-write of an AOF rewrite stay outside maxmemory
# Redis evicts only keys with a TTL: results and finished or failed jobs, never a queue or a waiting job
REDIS_MAXMEMORY_POLICY = "volatile-lru"


def redis_bytes_needed(settings: Settings, fps: float, failed_fraction: float = 0.001, tiles_per_frame: int = 0
                       ) -> int:
    """Redis ``maxmemory`` for a steady ``fps`` frames/s: the one sizing formula.

    Every frame leaves a record for ``result_ttl_s`` and RQ's job for ``job_result_ttl_s``
    (``failure_ttl_s`` for the ``failed_fraction`` that fail); the stream and a full queue are bounded, and
    so are each event sink's outbox and dead-letter stream (``sink_queue_max`` events each, no TTL: a
    volatile policy never evicts them).
    """
    tiles = tiles_per_frame * REDIS_TILE_BYTES  # wide frames carry a verdict per tile
    per_frame = ((REDIS_RECORD_BYTES + tiles) * settings.result_ttl_s
                 + (REDIS_JOB_BYTES + tiles) * settings.job_result_ttl_s
                 + failed_fraction * REDIS_JOB_BYTES * settings.failure_ttl_s)
    bounded = (settings.stream_maxlen * (REDIS_STREAM_ENTRY_BYTES + tiles) + settings.max_queue_depth * REDIS_JOB_BYTES
               + REDIS_BASE_BYTES + sink_bytes_needed(settings, tiles_per_frame))
    return int((fps * per_frame + bounded) * REDIS_HEADROOM)


def sink_bytes_needed(settings: Settings, tiles_per_frame: int = 0) -> int:
    """Redis bytes the event sinks' outboxes and dead-letter streams take when full (part of the sizing)."""
    event = REDIS_STREAM_ENTRY_BYTES + tiles_per_frame * REDIS_TILE_BYTES
    return len(settings.event_sinks()) * settings.sink_queue_max * (2 * event + REDIS_DEAD_LETTER_EXTRA_BYTES)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read once per process; tests build their own ``Settings(...)`` instead."""
    return Settings()


def validate_id(value: str, what: str = "id") -> str:
    if not ID_PATTERN.match(value) or JOB_ID_SEPARATOR in value:
        raise ValueError(f"{what} {value!r} must match {ID_PATTERN.pattern} and contain no '{JOB_ID_SEPARATOR}'")
    return value


_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9-]+")
# readable part + '-' + hash stays within ID_PATTERN's 96 characters
FRAME_ID_READABLE_CHARS = 80
FRAME_ID_HASH_BYTES = 8  # 64 bits: 13 base32 characters


def safe_frame_id(name: str, captured_at: datetime | None = None, occurrence: str = "") -> str:
    """A valid frame id for a file name: a readable part, '-', and a hash of what makes the frame unique.

    The readable part is the name without folders and image extension, accents folded
    (``Kratzer_ä`` -> ``Kratzer_a``), other characters as '_', at most 80 characters.
    It merges names (``a b``, ``a.b``, ``a_b``, ``a__b``), so the hash of the exact
    name (folders and extension included), the capture time and ``occurrence`` (a
    replay pass) keeps them apart, while the same file captured at the same time gets
    the same id again: a re-sent frame is still recognised as a duplicate.
    """
    base = PurePosixPath(name.replace("\\", "/")).name
    stem, dot, ext = base.rpartition(".")
    if dot and ext.lower() in IMAGE_EXTENSIONS:
        base = stem
    folded = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    readable = _UNSAFE_ID_CHARS.sub("_", folded).strip("_-")[:FRAME_ID_READABLE_CHARS].rstrip("_-") or "frame"
    when = captured_at.astimezone(UTC).isoformat() if captured_at is not None else ""
    digest = hashlib.blake2b("\0".join((name, when, occurrence)).encode("utf-8", "surrogatepass"),
                             digest_size=FRAME_ID_HASH_BYTES).digest()
    return f"{readable}-{base64.b32encode(digest).decode().rstrip('=').lower()}"


class Frame(BaseModel):
    """A job's payload: where the frame is and where it came from."""

    frame_id: str
    line_id: str
    camera_id: str
    captured_at: datetime
    ext: str
    enqueued_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("frame_id", "line_id", "camera_id")
    @classmethod
    def _safe_id(cls, value: str, info) -> str:
        return validate_id(value, info.field_name)

    @field_validator("ext")
    @classmethod
    def _known_ext(cls, value: str) -> str:
        value = value.lower().lstrip(".")
        if value not in IMAGE_EXTENSIONS:
            raise ValueError(f"extension {value!r} is not one of {', '.join(IMAGE_EXTENSIONS)}")
        return value

    @property
    def object_key(self) -> str:
        """``{line}/{camera}/{yyyy}/{mm}/{dd}/{frame_id}.{ext}``, from validated parts only."""
        t = self.captured_at.astimezone(UTC)  # from integers: several times faster than strftime, same text
        return f"{self.line_id}/{self.camera_id}/{t.year:04d}/{t.month:02d}/{t.day:02d}/{self.frame_id}.{self.ext}"

    def overlay_key(self, overlay_format: str) -> str:
        """The frame's key with the overlay format's extension instead of its own."""
        return self.object_key.rsplit(".", 1)[0] + "." + OVERLAY_FORMATS[overlay_format][0]

    @property
    def job_id(self) -> str:
        """Deterministic: re-sending a frame can never create a second job.

        Unique per frame because the frame id is: the producer names files with
        :func:`safe_frame_id`, whose hash covers the name, extension and capture time.
        """
        return JOB_ID_SEPARATOR.join((self.line_id, self.camera_id, self.frame_id))


class Timings(BaseModel):
    queue_wait_s: float
    inference_s: float
    total_s: float


# FrameResult.unknown_reason, in the two kinds operators act on differently
UNFAMILIAR_REASON = "ood_score"  # not a camera fault: a surface the model does not know (another material,
# product or defect); check what the line is running
CAMERA_REASONS: dict[str, str] = {  # the camera or its light is at fault, not the surface: reason -> what to check
    "blank_frame": "a uniform frame: lens cap, dead sensor or no strip in view",
    "saturated_frame": "black or blown out: exposure and lighting",
    "no_spatial_structure": "pixel noise only: sensor or cable",
    "blurred": "focus, exposure time or vibration",
    "noisy": "sensor gain too high or too little light",
    "bad_exposure": "too dark, too bright or too flat: lighting and exposure",
}


def unknown_kind(reason: str | None) -> str | None:
    """"camera" for a camera fault, "unfamiliar" for a surface the model does not know, None when not unknown."""
    if reason is None:
        return None
    return "camera" if reason in CAMERA_REASONS else "unfamiliar"


class TileVerdict(BaseModel):
    """One tile of a frame larger than the model's input: its window in frame pixels and its verdict."""

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    w: int = Field(ge=1)
    h: int = Field(ge=1)
    label: str  # a class or "background"; an unknown tile keeps its most probable class
    confidence: float
    unknown: bool = False
    unknown_reason: str | None = None


REJECTED = "rejected"  # the verdict of a frame no model read (FrameResult.status)
UNKNOWN = "unknown"  # the verdict of a frame the model cannot vouch for (the tiling's word for such a tile too)


class FrameResult(BaseModel):
    """What a worker writes back for one frame."""

    frame_id: str
    job_id: str
    line_id: str
    camera_id: str
    captured_at: datetime
    status: Literal["ok", "rejected"]
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] = Field(default_factory=dict)
    ood_score: float | None = None
    unknown: bool = False
    unknown_reason: str | None = None  # UNFAMILIAR_REASON or one of CAMERA_REASONS
    # frames larger than one tile (empty otherwise): label is then "unknown" when at least frame_unknown_share
    # of the analysed tiles are, else the most confident defect tile's class, else "background"; counts are
    # of tiles neither background nor unknown
    tiles: list[TileVerdict] = Field(default_factory=list)
    defect_counts: dict[str, int] = Field(default_factory=dict)
    top_defect: TileVerdict | None = None
    reason: str | None = None  # why a frame was rejected
    frame_key: str
    overlay_key: str | None = None
    timings: Timings
    worker: str = ""
    checkpoint_sha256: str = ""
    finished_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @computed_field
    @property
    def unknown_kind(self) -> str | None:
        """"camera" or "unfamiliar" for an unknown frame (see :func:`unknown_kind`), else None."""
        return unknown_kind(self.unknown_reason) if self.unknown else None

    @property
    def verdict(self) -> str:
        """The one word an operator reads: a class, "background" (margin only), "unknown" or "rejected"."""
        if self.status == REJECTED:
            return REJECTED
        return UNKNOWN if self.unknown else self.label or UNKNOWN


# model registry (steelsight/registry.py): object keys in library_bucket
MODELS_PREFIX = "models/"
FEEDBACK_PREFIX = "feedback/"
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def model_object_key(sha256: str) -> str:
    """``models/<sha256>.safetensors``: the checkpoint's own hash names it, so a key is never overwritten."""
    if not SHA256_PATTERN.match(sha256):
        raise ValueError(f"{sha256!r} is not a sha256 (64 lowercase hex digits)")
    return f"{MODELS_PREFIX}{sha256}.safetensors"


def model_card_key(sha256: str) -> str:
    return model_object_key(sha256).removesuffix(".safetensors") + ".json"


class RegisteredModel(BaseModel):
    """A checkpoint in the registry: ``models/<sha256>.json`` beside the file."""

    sha256: str
    size: int
    name: str  # the file name it was pushed from
    pushed_at: datetime
    pushed_by: str
    classes: list[str]
    input_size: int
    metrics: dict[str, float] = Field(default_factory=dict)  # the checkpoint card's figures (val accuracy, ...)


ModelAction = Literal["push", "promote", "rollback", "shadow", "shadow_off"]


class ModelEvent(BaseModel):
    """One line of the audit log (``model_audit_stream``)."""

    action: ModelAction
    sha256: str | None = None
    previous: str | None = None
    share: float | None = None
    by: str
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class WorkerModelState(BaseModel):
    """What a worker serves, as it reports it (``model_workers_key``)."""

    worker: str
    sha256: str
    shadow_sha256: str | None = None
    refused_sha256: str | None = None  # the last checkpoint it would not serve, and why
    refused_reason: str | None = None
    switched_at: datetime | None = None
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


# feedback: the six classes, plus what an operator may say a frame is instead
CLEAN_CLASS = "clean"  # no defect
OTHER_CLASS = "other"  # a defect not in the six
FEEDBACK_EXTRA_CLASSES = (CLEAN_CLASS, OTHER_CLASS)
FEEDBACK_NOTE_MAX = 1000
ReviewReason = Literal["unknown", "low_margin", "random"]


# --- feedback and review queue: schemas (steelsight/feedback.py, steelsight/dataset.py, docs/feedback.md) ---
FeedbackSource = Literal["live", "upload", "review"]
UPLOAD_LINE = "upload"  # the line and camera an upload's feedback is filed under (it came from no line)
UPLOAD_CAMERA = "dashboard"
ANONYMOUS_OPERATOR = "anonymous"  # the operator's name when the dashboard runs without a login


def feedback_classes() -> tuple[str, ...]:
    """What an operator may say a frame is: the model's six classes, then ``clean`` and ``other``."""
    from steelsight.model.inference.labels import CLASSES

    return (*CLASSES, *FEEDBACK_EXTRA_CLASSES)


def feedback_object_key(line_id: str, camera_id: str, job_id: str, ext: str) -> str:
    """``feedback/<line>/<camera>/<job_id>.<ext>`` in ``library_bucket``; its provenance JSON beside it."""
    return f"{FEEDBACK_PREFIX}{line_id}/{camera_id}/{job_id}.{ext}"


def feedback_lock_key(settings: Settings, job_id: str) -> str:
    """Held while one frame's feedback is written or undone, so S3 and Redis end up with the same mark."""
    return f"{settings.feedback_key(job_id)}:lock"


def review_count_key(settings: Settings, line_id: str, hour: str) -> str:
    """Frames sent to the review queue for a line in one clock hour (``hour``: ``YYYYmmddHH``, UTC)."""
    return f"{settings.key_prefix}:review:count:{line_id}:{hour}"


class Feedback(BaseModel):
    """An operator's mark on one frame's verdict: ``feedback/<line>/<camera>/<job_id>.json`` beside the frame's copy
    in ``library_bucket`` (the durable record), and ``feedback_key(job_id)`` in Redis (the index)."""

    job_id: str
    frame_id: str
    line_id: str
    camera_id: str
    captured_at: datetime
    frame_key: str  # where the frame was in frames_bucket; "" for an upload
    file_name: str | None = None  # an upload's file name
    feedback_key: str  # the frame's copy in library_bucket
    content_sha256: str  # of the copy's bytes
    verdict: str  # FrameResult.verdict: a class, "background", "unknown" or "rejected"
    label: str | None = None
    confidence: float | None = None
    unknown: bool = False
    unknown_reason: str | None = None
    checkpoint_sha256: str = ""  # the model that gave the verdict
    correct: bool
    true_class: str
    note: str = Field(default="", max_length=FEEDBACK_NOTE_MAX)
    operator: str = ANONYMOUS_OPERATOR
    created_at: datetime
    source: FeedbackSource
    review_reason: ReviewReason | None = None  # why the frame was in the review queue
    undone_at: datetime | None = None
    undone_by: str | None = None

    @field_validator("true_class")
    @classmethod
    def _known_class(cls, value: str) -> str:
        if value not in feedback_classes():
            raise ValueError(f"true class {value!r} is not one of {', '.join(feedback_classes())}")
        return value

    @model_validator(mode="after")
    def _safe_ids(self):
        # the ids name files of an export and keys in Redis: a JSON edited in the store must not reach elsewhere
        for name in ("line_id", "camera_id", "frame_id"):
            validate_id(getattr(self, name), name)
        if self.job_id != JOB_ID_SEPARATOR.join((self.line_id, self.camera_id, self.frame_id)):
            raise ValueError(f"job_id {self.job_id!r} is not line__camera__frame of its own ids")
        return self

    @property
    def json_key(self) -> str:
        return self.feedback_key.rsplit(".", 1)[0] + ".json"


class ReviewItem(BaseModel):
    """A frame sent to the review queue without an operator (``review_item_key(job_id)`` while it waits; once
    labelled or dismissed the key keeps a short marker instead, so the frame is never queued again)."""

    result: FrameResult
    reason: ReviewReason
    queued_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
# --- end of feedback and review queue ---


# --- champion/challenger comparison (model/evaluation/compare.py, `steelsight compare`, docs/compare.md) ---
# A set names a winner only when all three hold; otherwise its verdict is "no call".
COMPARE_ALPHA = 0.05  # McNemar's exact two-sided p must be below this
COMPARE_MIN_IMAGES = 30  # fewer images do not stand for a line's mix of defects, whatever the p-value
COMPARE_MIN_DISCORDANT = 10  # images exactly one model gets right; fewer decide nothing a retrain should rest on
# `steelsight dataset export` lists its files here; rows with "source": "base" are base data, not feedback
EXPORT_MANIFEST = "manifest.json"
# --- end of comparison ---
