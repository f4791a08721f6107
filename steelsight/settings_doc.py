"""The README's settings table, rendered from ``Settings`` so that it cannot drift from the code.

``python -m steelsight.settings_doc`` prints the table; ``--write README.md`` replaces the
block between the markers; ``--check README.md`` exits 1 when that block is stale.
A field's text is its ``Field(description=...)`` where it has one, else its entry in
``DESCRIPTIONS``; ``tests/unit/test_docs.py`` fails for a field that has neither.
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from annotated_types import Ge, Gt, Le, Lt
from pydantic import SecretStr

from .contract import Settings

START = "<!-- settings:start -->"
END = "<!-- settings:end -->"

# one line per field; say what it changes, not how it is implemented
DESCRIPTIONS: dict[str, str] = {
    "redis_url": "Redis; password and TLS go in the URL (`redis://:pw@host:6379/0`, `rediss://…`)",
    "queue_name": "the RQ queue the producer fills and the workers serve",
    "key_prefix": "prefix of the result records (`<prefix>:result:<job id>`) and the results stream "
                  "(`<prefix>:results`)",
    "s3_endpoint": "the object store, `host:port` (SeaweedFS, MinIO or any S3)",
    "s3_public_endpoint": "`host:port` the browser reaches, for presigned links; unset: `STEELSIGHT_S3_ENDPOINT`",
    "s3_secure": "HTTPS to the object store",
    "s3_public_secure": "HTTPS for presigned links; unset: as `STEELSIGHT_S3_SECURE`",
    "s3_region": "region the S3 requests are signed for",
    "s3_access_key": "S3 access key; required, no default",
    "s3_secret_key": "S3 secret key; required, no default",
    "frames_bucket": "private bucket of the original frames",
    "overlays_bucket": "private bucket of the Grad-CAM overlays",
    "presign_expiry_s": "lifetime of a link from `steelsight link`, in seconds (at most 7 days)",
    "s3_retry_window_s": "how long one job attempt rides out an S3 outage; keep it below the job timeout",
    "object_expiry_days": "the store deletes frames and overlays this many days after upload; unset: the result "
                          "records' lifetime in whole days; `0`: never",
    "job_timeout_s": "RQ's limit for one job; a batch computing longer stops its worker's heartbeats",
    "job_retries": "retries of a failed attempt",
    "job_retry_backoff_s": "delay before the first retry, doubling after each",
    "job_retry_window_s": "no retry starts later than this after the frame was enqueued",
    "result_ttl_s": "how long a frame's result record stays in Redis (size Redis with `steelsight check-sizing`)",
    "job_result_ttl_s": "how long RQ keeps its own copy of a finished job and its return value",
    "failure_ttl_s": "how long a failed job stays in RQ's failed registry",
    "stream_maxlen": "the results stream (the dashboard's live feed) is capped at about this many entries",
    "max_queue_depth": "the producer waits while the queue is deeper",
    "max_frame_bytes": "largest frame file: the producer refuses it (`too_large`), a worker rejects it",
    "checkpoint": "model file; unset: the shipped `model/checkpoints/steelsight-neu.safetensors`",
    "device": "`cpu`, `cuda` or `auto`",
    "backend": "trunk runtime; `auto`: the fastest of ONNX Runtime, OpenVINO and the int8 trunk on CPU (int8 "
               "only where `steelsight quantize` passed its parity: docs/int8.md), PyTorch on GPU; "
               "`torch-fp16`, `torch-bf16`: half precision on GPU",
    "batch_size": "frames a worker runs through the model together, at most",
    "cam_method": "explanation of the overlays (`gradcam`, `gradcam++`, `hirescam`, `xgradcam`, `layercam`, "
                  "`eigencam`)",
    "overlay_format": "overlay file: JPEG, or PNG for pixel-exact copies",
    "overlay_jpeg_quality": "JPEG quality of the overlays",
    "overlay_png_level": "PNG deflate level of the overlays: `0` stores, `1`–`9` compress, smaller and slower",
    "maintenance_interval_s": "how often a worker runs RQ's registry maintenance",
    "claim_ttl_s": "a claimed frame's heartbeat lives this long (renewed every second)",
    "reclaim_interval_s": "how often every worker re-queues the frames of expired claims",
    "health_stale_s": "`/healthz` answers 503 once the worker's loop has not beaten this long",
    "max_frame_side": "a frame that fits one tile shrinks to this longer side right after decoding (tiled "
                      "frames stay full size, bounded by `STEELSIGHT_MAX_TILES_PER_FRAME`)",
    "decode_pixel_budget": "full-size pixels a worker decodes at once, at most",
    "dashboard_host": "address the dashboard binds; beyond loopback it needs a login or `--insecure-no-auth`",
    "dashboard_port": "the dashboard's HTTP port",
    "dashboard_metrics_port": "the dashboard's `/metrics` port",
    "dashboard_user": "dashboard login; set both user and password, or neither",
    "dashboard_password": "dashboard login password",
    "dashboard_refresh_s": "live tab refresh period",
    "max_upload_bytes": "largest file the upload tab accepts",
    "max_upload_files": "files per upload request, at most",
    "max_upload_total_bytes": "bytes per upload request, at most",
    "dashboard_image_max_side": "the dashboard decodes images at most this long on their longer side",
    "dashboard_image_wait_s": "seconds a live refresh waits for the images it reads; the rest show \"loading\" "
                              "until a later refresh, so a stalled object store never stalls the live tab",
    "dashboard_cache_bytes": "decoded images the dashboard keeps, in bytes",
    "dashboard_window_max_frames": "results read per refresh: the live window covers at most this many frames",
    "metrics_port": "the worker's `/metrics` and `/healthz` port",
    "metrics_host": "address of the `/metrics` and `/healthz` servers; `0.0.0.0` where a scraper runs on another "
                    "host",
}


def env_name(name: str) -> str:
    field = Settings.model_fields[name]
    alias = field.validation_alias or field.alias
    if isinstance(alias, str):  # pydantic-settings reads an alias as is, without the prefix
        return alias.upper()
    return (Settings.model_config.get("env_prefix", "") + name).upper()


def _default(name: str, field) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        value = str(value).lower()
    text = f"`{value}`"
    if name.endswith("_bytes") and isinstance(value, int) and value >= 1024**2:
        text += f" ({value / 1024**2:g} MiB)"
    return text


def _bounds(field) -> str:
    """Allowed values, from a ``Literal`` annotation or the field's numeric constraints."""
    args = [a for a in typing.get_args(field.annotation) if a is not type(None)]
    if typing.get_origin(field.annotation) is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    signs = {Ge: ("≥", "ge"), Gt: (">", "gt"), Le: ("≤", "le"), Lt: ("<", "lt")}
    return ", ".join(f"{sign} {getattr(meta, attr)}" for meta in field.metadata
                     for kind, (sign, attr) in signs.items() if isinstance(meta, kind))


def description(name: str) -> str | None:
    field = Settings.model_fields[name]
    return field.description or DESCRIPTIONS.get(name)


def render() -> str:
    """The markdown table: one row per ``Settings`` field, in declaration order."""
    rows = ["| variable | default | what it does |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        text = description(name) or "(undocumented: add it to steelsight/settings_doc.py)"
        bounds = _bounds(field)
        if bounds:
            text += f" ({bounds})"
        rows.append(f"| `{env_name(name)}` | {_default(name, field)} | {text.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def replace_block(text: str, table: str) -> str:
    """``text`` with the table between the markers replaced by ``table``."""
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"markers {START} and {END} not found")
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steelsight.settings_doc", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="FILE", help="replace the table between the markers in FILE")
    group.add_argument("--check", type=Path, metavar="FILE", help="exit 1 when FILE's table is stale")
    args = parser.parse_args(argv)
    table = render()
    if args.write:
        text = args.write.read_text(encoding="utf-8")
        args.write.write_text(replace_block(text, table), encoding="utf-8")
    elif args.check:
        text = args.check.read_text(encoding="utf-8")
        if replace_block(text, table) != text:
            print(f"{args.check}: settings table is stale; run python -m steelsight.settings_doc --write "
                  f"{args.check}", file=sys.stderr)
            return 1
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
