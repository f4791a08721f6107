"""The ``steelsight`` command line. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from steelsight import model_command
from steelsight.contract import (
    COMPARE_ALPHA,
    COMPARE_MIN_DISCORDANT,
    COMPARE_MIN_IMAGES,
    FRAME_UNKNOWN_SHARE,
    UNKNOWN_FALSE_RATE,
)
from steelsight.model.inference.backends import BACKEND_NAMES  # the registry: light, --help stays fast
from steelsight.model.training.transforms import AUGMENT_PRESETS

EXIT_SOME_REJECTED = 3
EXIT_WORKER_CRASHED = 4  # the work loop quit on an unhandled error (the log has the traceback)
EXIT_BAD_SETUP = 2  # a one-line error: bad settings, a missing file, credentials refused for good


def _add_checkpoint_args(p: argparse.ArgumentParser, batch_size: int = 16, backend: bool = True) -> None:
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="model .safetensors (default: the checkpoint shipped in the repository)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"images per forward pass (default: {batch_size})")
    if not backend:
        return
    p.add_argument("--backend", choices=BACKEND_NAMES, default="auto",
                   help="trunk runtime: auto = on CPU the faster of ONNX Runtime and OpenVINO, timed once per "
                        "machine (see bench/); PyTorch on GPU; torch-fp16, torch-bf16 = half precision, for GPUs")


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune the attention-ResNet-50 on one folder per class",
        description="Fine-tune on DIR/<class>/*.{bmp,png,jpg,...} (or DIR/images/<class>/, the NEU layout) "
                    "with a seeded stratified train/val split, focal loss, AdamW + cosine annealing and "
                    "the full augmentation pipeline. Writes best.safetensors, model.safetensors (calibrated, "
                    "with OOD scorer), last_state.pt, history.json and training_curves.png to --out.",
    )
    _training_options(p)
    p.set_defaults(func=cmd_train)


def _kfold_parser(sub) -> None:
    p = sub.add_parser(
        "kfold", help="k-fold cross-validation of a training recipe",
        description="Train one model per fold with the same options as `train` (val = that fold's part of every "
                    "class), evaluate each on its own val part, and pool the confusion matrices: every image is "
                    "scored once by a model that never trained on it. Writes --out/fold<i>/ and --out/kfold.json "
                    "and prints a table. Resumable: finished folds are only re-evaluated.",
    )
    _training_options(p, out_default="runs/kfold", folds_default=5)
    p.add_argument("--then", action="append", default=[], metavar="OPTIONS",
                   help="a further training stage, repeatable: `train` options in one quoted string, e.g. "
                        "--then '--epochs 2 --lr 1e-4 --loc-weight 0.5'. Each stage starts from the previous "
                        "stage's best.safetensors and keeps its options except those given here; only the last "
                        "stage is evaluated (its model in --out/fold<i>/, earlier ones in fold<i>/stage<n>/)")
    p.add_argument("--only", type=int, nargs="+", default=None, metavar="FOLD",
                   help="train and score only these folds, e.g. to split the folds across machines "
                        "(default: all; kfold.json then pools only these)")
    p.add_argument("--corruptions", action="store_true",
                   help="also score each fold under the corruptions of `evaluate --corruptions` and pool "
                        "them; with --annotations (on the last stage) Grad-CAM localisation is pooled too")
    p.set_defaults(func=cmd_kfold, parser=p)


def _training_options(p, out_default: str = "runs/neu", folds_default: int = 0) -> None:
    p.add_argument("--data", type=Path, required=True, help="folder with one sub-folder per class")
    p.add_argument("--out", type=Path, default=Path(out_default), help=f"output folder (default: {out_default})")
    p.add_argument("--pretrained", default="keras",
                   help="trunk init: keras (offline ImageNet port, default), torchvision, none, or a file")
    p.add_argument("--init-from", default=None,
                   help="start from every weight of an earlier steelsight checkpoint instead of --pretrained")
    p.add_argument("--augment", choices=list(AUGMENT_PRESETS), default="standard",
                   help="augmentation preset (default: standard): " + "; ".join(
                       # argparse %-formats help text
                       f"{name} = {what}" for name, (what, _) in AUGMENT_PRESETS.items()).replace("%", "%%"))
    p.add_argument("--image-size", type=int, default=160, help="square input side in pixels (default: 160)")
    p.add_argument("--epochs", type=int, default=6, help="default: 6")
    p.add_argument("--batch-size", type=int, default=32, help="default: 32")
    p.add_argument("--lr", type=float, default=1e-3, help="head learning rate (default: 1e-3)")
    p.add_argument("--trunk-lr-scale", type=float, default=0.1, help="trunk lr = lr x this (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    p.add_argument("--freeze-stages", type=int, default=0,
                   help="freeze the stem and the first N-1 ResNet stages, 0-5 (default: 0, nothing frozen)")
    p.add_argument("--annotations", type=Path, default=None,
                   help="NEU-DET annotations folder (annotations/ next to images/ in the NEU layout), "
                        "for --loc-weight")
    p.add_argument("--loc-weight", type=float, default=0.0,
                   help="weight of the Grad-CAM box loss: the share of the true class's CAM outside the image's "
                        "own-class boxes (default: 0, off; needs --annotations)")
    p.add_argument("--freeze-bn", action="store_true",
                   help="keep every BatchNorm's running statistics fixed (for fine-tunes with --init-from)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each class for val (default: 0.2)")
    p.add_argument("--seed", type=int, default=0, help="split and init seed (default: 0)")
    p.add_argument("--folds", type=int, default=folds_default,
                   help=f"k-fold cross-validation: deal each class into K parts; --val-fraction is then unused "
                        f"(default: {folds_default}{', off' if not folds_default else ''})")
    if not folds_default:
        p.add_argument("--fold", type=int, default=0, help="with --folds K: which part (0..K-1) is val (default: 0)")
    p.add_argument("--workers", type=int, default=1, help="data-loader processes (default: 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--limit-per-class", type=int, default=0, help="use only N images per class (smoke runs)")
    p.add_argument("--half", action="store_true", help="store model.safetensors weights in float16")
    p.add_argument("--resume", action="store_true", help="continue from --out/last_state.pt")
    p.add_argument("--finalize-only", action="store_true",
                   help="skip training: recalibrate --out/best.safetensors and write model.safetensors")


def _refit_ood_parser(sub) -> None:
    p = sub.add_parser(
        "refit-ood", help="fit a trained checkpoint's OOD scorer anew (weights and temperature unchanged)",
        description="Re-extracts features of the checkpoint's own train/val split (from the seed and fraction "
                    "stored in it), fits the current OOD scorer (model/inference/ood.py) and its val threshold, and "
                    "writes a copy of the checkpoint with them to --out. For a checkpoint trained before the "
                    "OOD method changed; `train` does the same at its end.",
    )
    p.add_argument("--data", type=Path, required=True, help="the data the checkpoint was trained on")
    p.add_argument("--out", type=Path, required=True, help="where to write the refitted .safetensors")
    _add_checkpoint_args(p, batch_size=32, backend=False)  # refitting runs the network itself, in PyTorch
    p.add_argument("--with-corruptions", action="store_true",
                   help="also fit on the training images under the five moderate corruptions: fewer unknowns "
                        "on blurred or noisy steel, for a lower AUROC on noise-like OOD frames (see the model card)")
    p.set_defaults(func=cmd_refit_ood)


def _evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="accuracy, macro-F1, calibration, latency and Grad-CAM localisation; tiles of wide frames",
        description="Writes report.json and confusion_matrix.png to --out; with --annotations also scores "
                    "Grad-CAM on NEU-DET boxes (pointing game, energy in box) and writes gradcam_grid.png. "
                    "With --tiles it scores the tiled path on wide frames with per-tile ground truth instead; "
                    "--make-strips builds such frames from NEU's held-out val split and scores them (docs/tiles.md).",
        epilog="Per-tile ground truth (--tiles): one file beside each frame, <frame>.json (or <stem>.json) as "
               '{"tiles": [{"x": 0, "y": 0, "w": 200, "h": 200, "label": "crazing"}, ...]} (frame pixels, top-left '
               "corner and size; a region labelled background is defect-free; other keys are ignored), or "
               "<stem>.xml with NEU-DET-style Pascal-VOC boxes (<object><name>, <bndbox> xmin/ymin/xmax/ymax, "
               "1-based, inclusive). A predicted tile's truth is the class of the region covering the largest part "
               "of it when that covers at least --min-cover of the tile, else background. Reported: per-tile "
               "accuracy with a 95% Wilson interval (an unknown tile counts as wrong; also given ignoring the "
               "unknown flag), the unknown rate, a tile confusion matrix (tile_confusion.png), and per frame the "
               "all-classes-found rate (every class in the truth has at least one defect tile) and the exact "
               "class-set rate (no extra class either).",
    )
    p.add_argument("--data", type=Path, required=True,
                   help="folder with one sub-folder per class; with --tiles: frames with truth files beside them "
                        "(searched recursively); with --make-strips: the NEU folder the checkpoint was trained on")
    p.add_argument("--annotations", type=Path, default=None,
                   help="NEU-DET XML folder (annotations/<class>/<stem>.xml) for localisation scores")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--split", choices=["all", "val", "train"], default="all",
                   help="all images, or the checkpoint's own val/train split (default: all)")
    p.add_argument("--cam-method", default="gradcam", help="CAM method for localisation (default: gradcam)")
    p.add_argument("--corruptions", action="store_true",
                   help="also score accuracy under noise, blur, motion blur (5-17 px), brightness/contrast "
                        "(five settings) and JPEG")
    p.add_argument("--ood", action="store_true",
                   help="also score the unknown verdict against blank, noise, pattern, photo and corrupted images")
    tiles = p.add_argument_group(
        "tiles", "Wide frames, tiled as `predict` and the worker tile them (STEELSIGHT_TILE_* settings unless given)")
    mode = tiles.add_mutually_exclusive_group()
    mode.add_argument("--tiles", action="store_true",
                      help="score per-tile verdicts of the frames in --data against their truth files (format below)")
    mode.add_argument("--make-strips", type=int, default=None, metavar="N",
                      help="write N strips of 8 held-out val images side by side (NEU: 1600x200) with their JSON "
                           "truth to --out/strips/ (a seeded shuffle of the checkpoint's val split; an image repeats "
                           "only once val is used up), then score them as --tiles does")
    tiles.add_argument("--strip-seed", type=int, default=0, help="shuffle seed of --make-strips (default: 0)")
    tiles.add_argument("--min-cover", type=float, default=None, metavar="SHARE",
                       help="share of a tile a truth region must cover to give it its class "
                            "(default: MIN_COVER of model/evaluation/tiles.py)")
    _add_tiling_args(tiles)
    _add_checkpoint_args(p)
    _add_unknown_args(p)
    p.set_defaults(func=cmd_evaluate)


def _add_tiling_args(group) -> None:
    """The tiling options predict and evaluate share; unset, each falls back to its STEELSIGHT_* setting."""
    group.add_argument("--tile-size", type=int, default=None, metavar="PX",
                       help="tile side in pixels at the training images' scale (default: STEELSIGHT_TILE_SIZE, "
                            "200: NEU's images)")
    group.add_argument("--tile-overlap", type=int, default=None, metavar="PX",
                       help="least overlap between neighbouring tiles in pixels (default: STEELSIGHT_TILE_OVERLAP_PX)")
    group.add_argument("--frame-px-per-mm", type=float, default=None, metavar="PX",
                       help="the images' resolution; with --model-px-per-mm an image is rescaled by model/frame "
                            "before tiling, so a tile covers the surface a training image did")
    group.add_argument("--model-px-per-mm", type=float, default=None, metavar="PX",
                       help="the resolution of the images the checkpoint was trained on")
    group.add_argument("--frame-unknown-share", type=float, default=None, metavar="SHARE",
                       help="a tiled image is unknown when at least this share of its tiles is (default: "
                            f"STEELSIGHT_FRAME_UNKNOWN_SHARE, {FRAME_UNKNOWN_SHARE}; 1: any defect tile names "
                            "the image)")


def _add_unknown_args(p) -> None:
    p.add_argument("--unknown-false-rate", type=float, default=None, metavar="RATE",
                   help="share of in-distribution images (the checkpoint's val) the unknown verdict may flag; sets "
                        f"the OOD threshold (default: STEELSIGHT_UNKNOWN_FALSE_RATE, {UNKNOWN_FALSE_RATE})")


def _predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict", help="label images, optionally with Grad-CAM overlays",
        description="Prints label, confidence, probabilities, OOD score and unknown verdict per image. "
                    f"Unreadable files and overlays that could not be written are reported per file; the exit "
                    f"status is {EXIT_SOME_REJECTED} when any file was rejected or any overlay not written.",
    )
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--cam-out", type=Path, default=None,
                   help="write <stem>_cam.png overlays here, under a new name (<stem>_cam_N.png) when the name "
                        "exists; existing files and links are never written through; long stems are shortened "
                        "with a hash to fit the 255-byte file-name limit")
    p.add_argument("--cam-method", default="gradcam",
                   help="gradcam, gradcam++, hirescam, xgradcam, layercam or eigencam (default: gradcam)")
    tiles = p.add_argument_group(
        "tiling", "An image larger than one tile (after rescaling) is cut into tiles, each labelled on its own: "
                  "its row then also has tiles, defect_counts and top_defect, its label is unknown when at "
                  "least --frame-unknown-share of its tiles are, else the most confident defect tile's class, else "
                  "background (dark or blown-out margins) and its "
                  "overlay is the tiles' Grad-CAM stitched at the image's full size. Defaults: the "
                  "STEELSIGHT_TILE_SIZE, _TILE_OVERLAP_PX, _FRAME_PIXELS_PER_MM, _MODEL_PIXELS_PER_MM and "
                  "_MAX_TILES_PER_FRAME settings; an image needing more tiles is rejected (too_many_tiles).")
    _add_tiling_args(tiles)
    _add_checkpoint_args(p)
    _add_unknown_args(p)
    p.set_defaults(func=cmd_predict)


def _worker_parser(sub) -> None:
    from steelsight.worker.processes import MAX_PROCESSES, process_count  # light: no torch, Redis or RQ

    p = sub.add_parser(
        "worker", help="serve the frame queue: predict, Grad-CAM, write results",
        description="Loads the checkpoint once, then takes frames from the Redis queue in micro-batches, "
                    "uploads Grad-CAM overlays and writes results (job result, per-frame record, stream). "
                    "Connection settings come from STEELSIGHT_* environment variables or .env.",
    )
    p.add_argument("--checkpoint", default=None, help="model .safetensors (default: settings, then the shipped one)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None, help="default: settings (auto)")
    p.add_argument("--batch-size", type=int, default=None, help="max frames per micro-batch (default: settings, 8)")
    p.add_argument("--backend", choices=BACKEND_NAMES, default=None,
                   help="trunk runtime (default: settings, auto = on CPU the faster of ONNX Runtime and OpenVINO, "
                        "timed once per machine; PyTorch on GPU; torch-fp16, torch-bf16 = half precision, for GPUs)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="port of /metrics (Prometheus) and /healthz (200 while the work loop beats, else 503) "
                        "(default: settings, 9100)")
    p.add_argument("--metrics-host", default=None,
                   help="address that port binds (default: settings, 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--name", default=None,
                   help="worker name shown in RQ (default: <hostname>-<pid>-<6 hex chars>, unique per process)")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--processes", type=process_count, default=1, metavar="N",
                   help="run N worker processes under this one (default 1: the worker runs in this process; at "
                        f"most {MAX_PROCESSES}). Use it to keep one GPU busy: each process has its own CUDA context "
                        "and copy of the model, and while one computes a batch the others fetch frames, write to "
                        "S3 and book jobs with RQ. Process i serves /metrics and /healthz on the metrics port + i "
                        "(i = 0..N-1; all must be free); with --name X they are X-1 .. X-N (one restarted while RQ "
                        "still lists its predecessor works as X-1-r1). Each uses cores/N torch CPU threads. One that "
                        "dies is restarted (after 1 s, doubling to 30 s) unless --burst, or unless it exits 2, a "
                        "setup error, which stops them all; SIGTERM or Ctrl-C is passed on to all: they finish the "
                        "batch in hand (a second one: stop now; any still running 10 s later is killed)")
    p.set_defaults(func=cmd_worker)


def _produce_parser(sub) -> None:
    p = sub.add_parser(
        "produce", help="send frames from a folder into the pipeline",
        description="Uploads each image to the frames bucket under {line}/{camera}/{yyyy}/{mm}/{dd}/{frame_id}.{ext} "
                    "and enqueues one job per frame. The frame id is the file name made safe plus a hash of its "
                    "path, extension and modification time, so a re-sent file is skipped as a duplicate while "
                    "a new file under an old name is a new frame; a frame whose job failed is sent again. "
                    "Waits when the queue is deeper than STEELSIGHT_MAX_QUEUE_DEPTH. Dotfiles and other "
                    "temporary names are never sent: write frames under one and rename them.",
    )
    p.add_argument("--source", type=Path, required=True, help="folder of images (searched recursively)")
    p.add_argument("--watch", action="store_true",
                   help="send files as they are completed instead of replaying; files already there and not yet "
                        "sent (per --state) are sent first")
    p.add_argument("--state", type=Path, default=None,
                   help="with --watch: file recording what was sent, kept across restarts "
                        "(default: SOURCE/.steelsight/sent-LINE__CAMERA.sqlite)")
    p.add_argument("--settle", type=float, default=None,
                   help="with --watch: seconds a file must stay unchanged when its format has no end marker "
                        "(TIFF, PGM) (default: 2)")
    p.add_argument("--loop", action="store_true", help="replay the folder forever (fresh frame ids per pass)")
    p.add_argument("--fps", type=float, default=None, help="frames per second (default: as fast as possible)")
    p.add_argument("--limit", type=int, default=None, help="stop after N frames")
    p.add_argument("--line", default="line-1", help="line id (default: line-1)")
    p.add_argument("--camera", default="cam-1", help="camera id (default: cam-1)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default: none)")
    p.set_defaults(func=cmd_produce)


def _requeue_parser(sub) -> None:
    p = sub.add_parser(
        "requeue", help="list failed frames, or send them through the pipeline again",
        description="Frames whose job failed (retries used up: S3 or a worker down too long) wait in RQ's failed "
                    "registry for STEELSIGHT_FAILURE_TTL_S. Without JOB_IDs or --all this lists them with the "
                    "reason; with them it puts each back on the queue with fresh retries (the frame in S3 is "
                    "used again) and prints one line per frame. Exits 1 when a named job is not a failed one.",
    )
    p.add_argument("job_ids", nargs="*", metavar="JOB_ID", help="LINE__CAMERA__FRAME of a failed job")
    p.add_argument("--all", action="store_true", help="requeue every failed frame (narrowed by --line/--camera)")
    p.add_argument("--line", default=None, help="only frames of this line")
    p.add_argument("--camera", default=None, help="only frames of this camera")
    p.add_argument("--dry-run", action="store_true", help="print what would be requeued, change nothing")
    p.set_defaults(func=cmd_requeue)


def _dashboard_parser(sub) -> None:
    p = sub.add_parser(
        "dashboard", help="the Gradio dashboard: live results, upload tab, metrics",
        description="Reads results from Redis and images from S3 (settings from STEELSIGHT_* variables or .env). "
                    "Login is enabled when STEELSIGHT_DASHBOARD_USER and STEELSIGHT_DASHBOARD_PASSWORD are set; "
                    "setting only one of them is an error, and without them it serves only on loopback.",
    )
    p.add_argument("--host", default=None,
                   help="bind address (default: settings, 127.0.0.1); any address beyond loopback needs the login "
                        "set, or --insecure-no-auth")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: settings, 7860)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default: settings, 9102)")
    p.add_argument("--checkpoint", default=None, help="model for the upload tab (default: the shipped one)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="serve beyond loopback without a login (logged as a warning); only behind something that "
                        "guards access itself, such as a proxy with its own login")
    p.set_defaults(func=cmd_dashboard)


def _up_parser(sub) -> None:
    p = sub.add_parser(
        "up", help="run the whole product locally: Redis, SeaweedFS, Prometheus, 2 workers, producer, dashboard",
        description="Starts redis-server (append-only) and an S3 object store (SeaweedFS from the virtual "
                    "environment, or a minio binary from PATH), both keeping their data under --data so a second "
                    "run finds the first one's frames; Prometheus scraping every process with the alert rules "
                    "(STEELSIGHT_ALERT_RULES, default deploy/prometheus/rules.yml, checked with promtool first); "
                    "then two workers and the dashboard, and, once every worker has loaded the model, the producer "
                    "replaying the bundled samples. Prints the URLs. Ctrl-C stops everything.",
    )
    p.add_argument("--s3", choices=["seaweedfs", "minio"], default="seaweedfs",
                   help="object store to run: seaweedfs (default, installed by make) or minio (a minio binary on "
                        "PATH; MinIO is what docker-compose.yml and deploy/k8s run)")
    p.add_argument("--data", type=Path, default=Path("runs/stack"), help="state and logs (default: runs/stack)")
    p.add_argument("--frames", type=int, default=None, help="stop producing after N frames (default: loop forever)")
    p.add_argument("--fps", type=float, default=2.0, help="producer frames per second (default: 2)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    p.add_argument("--port-offset", type=int, default=0,
                   help="add to every port (redis 16379, s3 19000, prometheus 19090, dashboard 7860, "
                        "metrics 9100-9103)")
    p.add_argument("--no-prometheus", action="store_true",
                   help="do not start Prometheus (the dashboard then lists no alerts)")
    p.set_defaults(func=cmd_up)


def _link_parser(sub) -> None:
    p = sub.add_parser(
        "link", help="print an expiring link to a finished frame's overlay or original",
        description="Looks up the job's result in Redis and prints a presigned S3 URL, signed for "
                    "STEELSIGHT_S3_PUBLIC_ENDPOINT when set. Buckets stay private; the link stops working after "
                    "the expiry (default: STEELSIGHT_PRESIGN_EXPIRY_S, 900 s).",
    )
    p.add_argument("job_id", help="LINE__CAMERA__FRAME, as in the result records and the dashboard")
    p.add_argument("--frame", action="store_true", help="link the original frame instead of the Grad-CAM overlay")
    p.add_argument("--expires", type=int, default=None, help="seconds the link stays valid (1 to 604800)")
    p.set_defaults(func=cmd_link)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _check_sizing_parser(sub) -> None:
    p = sub.add_parser(
        "check-sizing", help="check that Redis can hold the results of a line running at N frames/s",
        description="Computes the Redis memory a steady frame rate needs from the settings (result, job and failure "
                    "TTLs, stream length, queue depth, the event sinks' outboxes; steelsight.contract."
                    "redis_bytes_needed) and compares it with "
                    "--redis-maxmemory, or with the maxmemory and maxmemory-policy of the Redis in "
                    "STEELSIGHT_REDIS_URL. Exits 1 when it does not fit or the policy could evict queued frames.",
    )
    p.add_argument("--fps", type=float, required=True, help="frames per second over all lines and cameras")
    p.add_argument("--redis-maxmemory", default=None,
                   help="Redis maxmemory to check, e.g. 3gb or 3221225472 (default: ask the configured Redis)")
    p.add_argument("--tiles-per-frame", type=_non_negative, default=0, metavar="N",
                   help="tiles of a typical frame when the cameras send frames wider than one tile (a 1600x256 "
                        "frame at the default 200 px tile: 16); each tile's verdict is kept with the result "
                        "(default: 0, frames of one tile)")
    p.set_defaults(func=cmd_check_sizing)


def _compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="champion against challenger on the same images: accuracy gaps, McNemar, a verdict",
        description="Scores checkpoint A (the champion) and B (the challenger) on the same images, paired per "
                    "image: A's val split (rebuilt from --data and the seed and fraction A's checkpoint records), "
                    "an exported feedback set (--feedback) and the val split under five corruptions "
                    "(--corruptions). Per set it prints each model's accuracy with a 95% Wilson interval, the "
                    "difference B-A with a 95% interval for paired proportions (Newcombe), McNemar's exact test "
                    "on the images exactly one model gets right, per-class recall differences, and a verdict: "
                    f"'B better', 'A better' or 'no call'. A verdict needs at least {COMPARE_MIN_IMAGES} images, "
                    f"at least {COMPARE_MIN_DISCORDANT} images exactly one model gets right and McNemar's "
                    f"p < {COMPARE_ALPHA}; otherwise it is 'no call'. It warns when B trained on images of a set "
                    "(that set's comparison favours B). Exit status 0 for any finished comparison (the verdict is "
                    "in the output), 2 for bad input. How to read it: docs/compare.md.",
    )
    p.add_argument("a", type=Path, metavar="A.safetensors", help="the champion: the checkpoint in service")
    p.add_argument("b", type=Path, metavar="B.safetensors", help="the challenger, e.g. a fine-tune on feedback")
    p.add_argument("--data", type=Path, required=True,
                   help="the base data A was trained on (one sub-folder per class, or the NEU layout): A's val "
                        "split is rebuilt from it")
    p.add_argument("--feedback", type=Path, default=None, metavar="DIR",
                   help="also compare on an exported feedback set (`steelsight dataset export`: one folder per "
                        "class); folders of other classes (clean, other) are skipped and counted")
    p.add_argument("--corruptions", action="store_true",
                   help="also compare on the val split under noise, blur, motion blur, brightness/contrast and "
                        "JPEG at `evaluate --corruptions` severities (five more sets; about 6x the time)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="also write everything to FILE: per set the counts, intervals, p-value, per-class "
                        "recalls and every image's true class and both labels")
    p.add_argument("--limit-per-class", type=int, default=0, metavar="N",
                   help="only the first N images of each class in each set (quick looks; few images mostly "
                        "give 'no call') (default: 0, all)")
    p.add_argument("--b-data", type=Path, default=None, metavar="DIR",
                   help="the folder B was trained on, to find test images B has seen (default: the folder B's "
                        "checkpoint records, when it exists here)")
    p.add_argument("--exclude-overlap", action="store_true",
                   help="leave out the test images B trained on instead of only warning about them")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="auto",
                   help="trunk runtime for both models (default: auto, as `evaluate`)")
    p.set_defaults(func=cmd_compare)


def _dataset_parser(sub) -> None:
    p = sub.add_parser("dataset", help="training sets from operator feedback (dataset export)",
                       description="Training data from the verdicts operators marked on the dashboard.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    e = actions.add_parser(
        "export", help="write a one-folder-per-class training set from the labelled feedback",
        description="Reads every operator mark from its provenance JSON under feedback/ in STEELSIGHT_LIBRARY_BUCKET "
                    "(the durable copy; undone marks are left out) and writes each frame to DIR/<true class>/ as "
                    "feedback-<job id>.<ext>, the layout `steelsight train --data DIR` reads. With --base the base "
                    "data's class folders are copied in too. DIR/manifest.json lists every file with its sha256, "
                    "its provenance (line, camera, capture time, verdict, model sha256, operator, time) or base path, "
                    "and the counts per class. The same marks and base data give byte-identical output. Settings "
                    "come from STEELSIGHT_* variables or .env.",
        epilog="Example: steelsight dataset export --out runs/feedback-set --base NEU_DIR && "
               "steelsight train --data runs/feedback-set --init-from model/checkpoints/steelsight-neu.safetensors")
    e.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder to write; it must be empty or missing (see --force)")
    e.add_argument("--base", type=Path, default=None, metavar="DATA_DIR",
                   help="also copy this data's images (DATA_DIR/<class>/ or DATA_DIR/images/<class>/, the NEU "
                        "layout) (default: feedback only)")
    e.add_argument("--include-extra", action="store_true",
                   help="also write the clean (no defect) and other (a defect not in the six) folders; training "
                        "knows the six classes only, so they are left out by default")
    e.add_argument("--force", action="store_true",
                   help="replace an earlier export in DIR (the files its manifest lists); other files are refused")
    e.add_argument("--no-progress", action="store_true", help="no progress bar (it shows on a terminal only)")
    p.set_defaults(func=cmd_dataset)


def _quantize_parser(sub) -> None:
    p = sub.add_parser(
        "quantize", help="int8 trunk for the CPU (NNCF), held to float32's verdicts: --backend openvino-int8",
        description="Quantizes the checkpoint's ResNet-50 trunk to int8 with NNCF post-training quantization "
                    "(pip install 'steelsight[quantize]'; serving needs OpenVINO only), calibrated on the "
                    "checkpoint's own training split of --data, and fits an OOD scorer on the int8 trunk's features. "
                    "It then compares int8 with the float32 PyTorch trunk on the val split: top-1 agreement "
                    "(>= 99.7%), each class's recall (no drop over 0.5 point), unknown verdicts on val and its "
                    "corrupted copies (>= 99%), OOD scores and Grad-CAM heatmaps (correlation; pointing game on the "
                    "NEU-DET boxes under DATA/annotations). Where a criterion fails it keeps more layers in float32 "
                    "and tries again. The int8 model, its OOD scorer and its parity file (*.parity.json: every "
                    "figure, the layers kept in float32, passed or not) go into this machine's ONNX cache folder "
                    "($STEELSIGHT_CACHE/onnx), keyed by the checkpoint's sha256; `--backend auto` picks the int8 "
                    "trunk only where that file says it passed and it is the fastest runtime on the machine. Exit "
                    "status 1 when it did not pass.",
        epilog="Example: steelsight quantize --data NEU_DIR (the shipped checkpoint); "
               "steelsight quantize runs/neu/model.safetensors --data NEU_DIR; a smoke run: "
               "steelsight quantize --data NEU_DIR --limit-per-class 12 --max-attempts 1 --from-step stem+layer3")
    p.add_argument("checkpoint", type=Path, nargs="?", default=None, metavar="CHECKPOINT",
                   help="model .safetensors (default: the checkpoint shipped in the repository)")
    p.add_argument("--data", type=Path, required=True, metavar="NEU_DIR",
                   help="the data the checkpoint was trained on (DIR/<class>/ or DIR/images/<class>/)")
    p.add_argument("--annotations", type=Path, default=None,
                   help="NEU-DET boxes for the pointing game (default: DATA/annotations when it exists)")
    p.add_argument("--calibration-images", type=int, default=None,
                   help="training images NNCF calibrates on, spread over the split (default: 300, NNCF's own)")
    p.add_argument("--limit-per-class", type=int, default=0,
                   help="use only this many train and val images per class: a smoke run, written under a name of "
                        "its own and never served (default: 0 = all)")
    p.add_argument("--max-attempts", type=int, default=None,
                   help="stop keeping more layers in float32 after this many tries (default: every step)")
    p.add_argument("--from-step", default=None, metavar="STEP",
                   help="start the float32 ladder at this step, one of tap, stem, stem+layer3, stem+layers1,3, "
                        "stem+layers1-3 (docs/int8.md; default: tap, the fewest layers in float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quantize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steelsight",
        description="Steel-strip surface defect inspection with Grad-CAM explanations.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _kfold_parser(sub)
    _refit_ood_parser(sub)
    _evaluate_parser(sub)
    _predict_parser(sub)
    _worker_parser(sub)
    _produce_parser(sub)
    _requeue_parser(sub)
    _dashboard_parser(sub)
    _up_parser(sub)
    _link_parser(sub)
    _check_sizing_parser(sub)
    _compare_parser(sub)
    _dataset_parser(sub)
    _quantize_parser(sub)
    model_command.add_parser(sub)
    return parser


def _train_config(args, command: str):
    from steelsight.model.training.train import TrainConfig

    if args.loc_weight > 0 and args.annotations is None:
        raise SystemExit(f"steelsight {command}: --loc-weight needs --annotations (the NEU-DET boxes)")
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k in fields})


def cmd_train(args) -> int:
    from steelsight.model.training.train import train

    train(_train_config(args, "train"))
    return 0


def _stage_args(previous: argparse.Namespace, options: str) -> argparse.Namespace:
    """The previous stage's options, overridden by those ``options`` sets to other than their defaults."""
    import shlex

    parser = previous.parser
    given = vars(parser.parse_args(["--data", str(previous.data), *shlex.split(options)]))
    changed = {k: v for k, v in given.items()
               if k not in ("data", "then", "corruptions", "only") and v != parser.get_default(k)}
    return argparse.Namespace(**(vars(previous) | changed))


def cmd_kfold(args) -> int:
    from steelsight.model.training.kfold import run_kfold, summary_table

    if args.folds < 2:
        raise SystemExit("steelsight kfold: --folds must be at least 2")
    stages, stage_args = [_train_config(args, "kfold")], args
    for options in args.then:
        stage_args = _stage_args(stage_args, options)
        stages.append(_train_config(stage_args, "kfold --then"))
    if args.only and not all(0 <= f < args.folds for f in args.only):
        raise SystemExit(f"steelsight kfold: --only takes folds 0..{args.folds - 1}")
    summary = run_kfold(stages, args.folds, args.out, corruptions=args.corruptions, only=args.only)
    print(summary_table(summary))
    print(f"wrote {args.out / 'kfold.json'}")
    return 0


def _load_predictor(args):
    from steelsight.model.inference.predictor import Predictor

    rate = getattr(args, "unknown_false_rate", None)
    if rate is None:
        rate = _settings_with().unknown_false_rate
    try:
        return Predictor.load(args.checkpoint, device=args.device, batch_size=args.batch_size, backend=args.backend,
                              unknown_false_rate=rate)
    except ValueError as exc:
        raise SystemExit(f"steelsight {args.command}: {exc}") from exc


def cmd_refit_ood(args) -> int:
    from steelsight.model.inference.checkpoint import resolve_checkpoint
    from steelsight.model.training.train import refit_ood

    refit_ood(resolve_checkpoint(args.checkpoint), args.data, args.out, args.device, args.batch_size,
              args.with_corruptions)
    return 0


def cmd_evaluate(args) -> int:
    from steelsight.model.evaluation.evaluate import evaluate
    from steelsight.model.training.calibrate import format_unseen

    if args.tiles or args.make_strips is not None:
        return _evaluate_tiles(args)
    report = evaluate(_load_predictor(args), args.data, args.out, args.annotations, args.split, args.cam_method,
                      corruptions=args.corruptions, ood=args.ood)
    lo, hi = report["accuracy_ci95"]
    print(f"n={report['n']} accuracy {report['accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f}) "
          f"macro-F1 {report['macro_f1']:.4f} ECE {report['ece']:.4f} "
          f"(uncalibrated {report['ece_uncalibrated']:.4f}) {report['mean_latency_ms_per_image']:.1f} ms/image")
    if "localisation" in report:
        loc = report["localisation"]
        print(f"Grad-CAM pointing game {loc['pointing_game']:.3f}, energy in box {loc['energy_in_box']:.3f} "
              f"over {loc['images_scored']} images")
    width = max(map(len, report.get("corruptions", {})), default=0)
    for name, row in report.get("corruptions", {}).items():
        print(f"  {name:{width}s} ({row['severity']}): accuracy {row['accuracy']:.4f}, "
              f"unknown {row['unknown_rate']:.4f}, wrong and not unknown {row['wrong_not_unknown_rate']:.4f}")
    if "ood" in report:
        far, held_out = report["ood"]["far_ood"], report["ood"]["far_ood_held_out"]
        in_dist = report["ood"]["in_distribution"]
        unseen = in_dist.get("score_false_unknown_rate_unseen")
        print(f"OOD: far AUROC {far['auroc']:.4f} (max-softmax {far['auroc_max_softmax']:.4f}), "
              f"held-out far AUROC {held_out['auroc']:.4f}, false-unknown rate {in_dist['false_unknown_rate']:.2%}"
              + (f" (on unseen frames {format_unseen(unseen)})" if unseen else ""))
    print(f"wrote {args.out / 'report.json'}")
    return 0


def _tiling(args, predictor, command: str):
    """The settings' tiling with the command's tiling options over it; a bad combination exits with why."""
    from steelsight.model.inference.tiling import TilingConfig

    try:  # model_copy does not validate: TilingConfig does
        tiling = TilingConfig.from_settings(_settings_with(
            tile_size=args.tile_size, tile_overlap_px=args.tile_overlap, frame_pixels_per_mm=args.frame_px_per_mm,
            model_pixels_per_mm=args.model_px_per_mm, frame_unknown_share=args.frame_unknown_share))
        tiling.size(predictor.input_size)
    except ValueError as exc:
        raise SystemExit(f"steelsight {command}: {exc}") from exc
    return tiling


def _evaluate_tiles(args) -> int:
    from steelsight.model.evaluation.tiles import MIN_COVER, evaluate_tiles, make_strips

    predictor = _load_predictor(args)
    data = args.data
    if args.make_strips is not None:
        data = args.out / "strips"
        strips = make_strips(predictor, args.data, data, args.make_strips, seed=args.strip_seed)
        print(f"wrote {len(strips)} strips to {data}")
    tiling = _tiling(args, predictor, "evaluate")
    min_cover = MIN_COVER if args.min_cover is None else args.min_cover
    if not 0 <= min_cover <= 1:
        raise SystemExit("steelsight evaluate: --min-cover is a share of the tile, 0 to 1")
    t = evaluate_tiles(predictor, data, args.out, tiling, min_cover)["tiles"]
    lo, hi = t["tile_accuracy_ci95"]
    flo, fhi = t["all_classes_found_ci95"]
    print(f"{t['tiles']} tiles of {t['frames']} frames: tile accuracy {t['tile_accuracy']:.4f} "
          f"(95% CI {lo:.4f}-{hi:.4f}; {t['tile_accuracy_ignoring_unknown']:.4f} ignoring the unknown flag), "
          f"unknown {t['tile_unknown_rate']:.4f}")
    print(f"all defect classes found in {t['all_classes_found_rate']:.4f} of frames (95% CI {flo:.4f}-{fhi:.4f}), "
          f"exactly the truth's classes in {t['exact_class_set_rate']:.4f}")
    if t["frames_without_truth"]:
        print(f"skipped {len(t['frames_without_truth'])} frames without a truth file (listed in report.json)")
    print(f"wrote {args.out / 'report.json'}")
    return 0


NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


def _overlay_name(stem: str, n: int) -> str:
    """``<stem>_cam[_n].png``, with the stem cut (and a short hash of it added) to fit NAME_MAX bytes."""
    import hashlib

    suffix = f"_cam_{n}.png" if n else "_cam.png"
    raw = os.fsencode(stem)
    if len(raw) + len(suffix) <= NAME_MAX:
        return stem + suffix
    tag = "-" + hashlib.sha256(raw).hexdigest()[:10]
    keep = raw[: NAME_MAX - len(suffix) - len(tag)].decode("utf-8", "ignore")  # never half a character
    return keep + tag + suffix


def _write_overlay(folder: Path, stem: str, rgb) -> Path:
    """Write a PNG under a new name in ``folder``; an existing name, a link (even a dangling one) included,
    is never opened: O_CREAT | O_EXCL fails on any existing entry and does not follow links."""
    from PIL import Image

    for n in range(10_000):
        path = folder / _overlay_name(stem, n)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                Image.fromarray(rgb).save(f, format="PNG")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path
    raise FileExistsError(f"no free overlay name for {stem!r} in {folder}")


def cmd_predict(args) -> int:
    from steelsight.model.inference.imageio import ImageRejected, read_gray
    from steelsight.model.inference.tiling import tile_count

    predictor = _load_predictor(args)
    tiling = _tiling(args, predictor, "predict")
    rows: list[dict] = []
    good: list[tuple[int, object]] = []
    for path in args.images:
        try:
            gray = read_gray(path)
        except ImageRejected as exc:
            rows.append({"path": str(path), "error": {"reason": exc.reason.value, "detail": exc.detail}})
            continue
        tiles = tile_count(*gray.shape, tiling, predictor.input_size)
        if tiles > tiling.max_tiles:
            rows.append({"path": str(path), "error": {
                "reason": "too_many_tiles", "detail": f"{gray.shape[1]}x{gray.shape[0]} needs {tiles} tiles "
                                                      f"at the model's scale, over the limit of {tiling.max_tiles}"}})
            continue
        good.append((len(rows), gray))
        rows.append({"path": str(path)})
    images = [img for _, img in good]
    if args.cam_out:
        args.cam_out.mkdir(parents=True, exist_ok=True)
        results = predictor.explain_frames(images, tiling, args.cam_method) if images else []
    else:
        results = predictor.predict_frames(images, tiling) if images else []
    for (row_index, _), result in zip(good, results, strict=True):
        row = rows[row_index]
        row.update(result.to_dict())
        if args.cam_out:
            try:  # one file's failure is reported on its own row, never hides the others
                row["overlay"] = str(_write_overlay(args.cam_out, Path(row["path"]).stem, result.overlay))
            except OSError as exc:
                row["overlay_error"] = f"{type(exc).__name__}: {exc}"
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    return EXIT_SOME_REJECTED if any("error" in r or "overlay_error" in r for r in rows) else 0


def _print_table(rows: list[dict]) -> None:
    for row in rows:
        if "error" in row:
            print(f"{row['path']}: REJECTED ({row['error']['reason']}) {row['error']['detail']}")
            continue
        verdict = "UNKNOWN " if row.get("unknown") else ""
        ood = f" ood {row['ood_score']:.2f}" if row.get("ood_score") is not None else ""
        extra = f" overlay {row['overlay']}" if "overlay" in row else ""
        if "overlay_error" in row:
            extra = f" overlay NOT WRITTEN ({row['overlay_error']})"
        if row.get("tiles"):
            counts = ", ".join(f"{name} {n}" for name, n in sorted(row["defect_counts"].items())) or "no defects"
            extra = f" ({len(row['tiles'])} tiles: {counts}){extra}"
        print(f"{row['path']}: {verdict}{row['label']} {row['confidence']:.3f}{ood}{extra}")


def _settings_with(**overrides):
    from steelsight.contract import get_settings

    return get_settings().model_copy(update={k: v for k, v in overrides.items() if v is not None})


def _logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def cmd_worker(args) -> int:
    import logging

    _logging()
    settings = _settings_with(checkpoint=args.checkpoint, device=args.device, batch_size=args.batch_size,
                              metrics_port=args.metrics_port, metrics_host=args.metrics_host, backend=args.backend)
    if args.processes > 1:  # the supervisor imports no torch: its children load everything
        from steelsight.worker.processes import supervise

        def child_args(index: int) -> argparse.Namespace:
            name = args.name and f"{args.name}-{index + 1}"  # a restart within RQ's memory of it: X-1-r1
            return argparse.Namespace(**{**vars(args), "processes": 1, "name": name,
                                         "metrics_port": settings.metrics_port + index})
        ports = [settings.metrics_port + i for i in range(args.processes)]
        return supervise(run, child_args, args.processes, settings.metrics_host, ports, args.burst,
                         fatal_status=EXIT_BAD_SETUP)
    from steelsight.worker.service import WorkerCrashed, run_worker

    try:
        run_worker(settings, burst=args.burst, name=args.name)
    except WorkerCrashed as exc:
        logging.getLogger("steelsight.worker").error("%s", exc)
        return EXIT_WORKER_CRASHED
    return 0


def cmd_produce(args) -> int:
    from prometheus_client import start_http_server

    from steelsight.contract import validate_id
    from steelsight.producer.metrics import camera_started
    from steelsight.producer.service import Producer, replay, run_producer
    from steelsight.producer.watch import state_path, watch
    from steelsight.sizing import warn_if_undersized

    _logging()
    validate_id(args.line, "--line")
    validate_id(args.camera, "--camera")
    settings = _settings_with()
    if args.metrics_port:
        camera_started(args.line, args.camera)  # in the first scrape, even while S3 is still awaited
        start_http_server(args.metrics_port, addr=settings.metrics_host)
    producer = Producer(settings, args.line, args.camera)
    warn_if_undersized(settings, producer.connection, args.fps)  # loud, before the first frame
    on_sent = None
    if args.watch:
        state = args.state or state_path(args.source, args.line, args.camera)
        settle = {} if args.settle is None else {"settle_s": args.settle}
        frames, on_sent = watch(args.source, state, limit=args.limit, on_idle=producer.check_unconfirmed, **settle)
    else:
        frames = replay(args.source, args.loop, args.limit)
    counts = run_producer(producer, frames, args.fps, on_sent)
    print("sent: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts else "sent nothing")
    return 0


def cmd_requeue(args) -> int:
    from rq.job import Job
    from rq.registry import FailedJobRegistry
    from rq.serializers import JSONSerializer
    from rq.utils import now

    from steelsight.clients import redis_client
    from steelsight.contract import JOB_FUNCTION, JOB_ID_SEPARATOR

    settings = _settings_with()
    conn = redis_client(settings)
    registry = FailedJobRegistry(settings.queue_name, connection=conn, serializer=JSONSerializer)
    failed = set(registry.get_job_ids())
    if args.job_ids:
        wanted = list(dict.fromkeys(args.job_ids))
    else:
        wanted = [j for j in sorted(failed) if (args.line is None or j.split(JOB_ID_SEPARATOR)[0] == args.line)
                  and (args.camera is None or j.split(JOB_ID_SEPARATOR)[1:2] == [args.camera])]
    act = (bool(args.job_ids) or args.all) and not args.dry_run
    verb = "requeued" if act else "would requeue" if args.dry_run else "failed"
    missing = 0
    for job_id in wanted:
        try:
            job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer) if job_id in failed else None
        except Exception:  # gone meanwhile, or not a JSON job of ours (a pickle is never loaded)
            job = None
        if job is None or job.func_name != JOB_FUNCTION:
            print(f"not a failed frame: {job_id}")
            missing += 1
            continue
        result = job.latest_result()
        reason = (result.exc_string or "").strip().splitlines()[-1:] if result is not None else []
        if act:
            # a fresh set of retries: the worker bounds retries by time since created_at and spaces them
            # by meta["failed_attempts"], so both start again here
            job.retries_left = settings.job_retries or None
            job.created_at = now()
            job.meta["failed_attempts"] = 0
            job.save(include_meta=True)
            registry.requeue(job)
        print(f"{verb} {job_id}" + (f"  ({reason[0]})" if reason else ""))
    done = len(wanted) - missing
    if not act:
        print(f"{done} failed frame(s)" + ("; pass JOB_IDs or --all to requeue" if not args.dry_run else ""))
    else:
        print(f"requeued {done} frame(s)")
    return 1 if missing else 0


def cmd_dashboard(args) -> int:
    from steelsight.dashboard.access import check_access

    _logging()
    settings = _settings_with(dashboard_host=args.host, dashboard_port=args.port,
                              dashboard_metrics_port=args.metrics_port, checkpoint=args.checkpoint)
    check_access(settings, args.insecure_no_auth)  # refuse in a second, before Gradio and the model load

    from steelsight.dashboard.app import launch

    launch(settings, insecure_no_auth=args.insecure_no_auth)
    return 0


def cmd_up(args) -> int:
    from steelsight.stack import Stack, run_stack

    return run_stack(Stack(args.data.resolve(), args.port_offset, args.frames, args.fps, args.workers, args.s3,
                           prometheus=not args.no_prometheus))


def cmd_link(args) -> int:
    from steelsight.clients import ObjectStore, redis_client
    from steelsight.contract import FrameResult

    settings = _settings_with(presign_expiry_s=args.expires)
    if not 1 <= settings.presign_expiry_s <= 7 * 24 * 3600:
        raise ValueError("--expires must be between 1 s and 7 days (S3's limit)")
    record = redis_client(settings).get(settings.result_key(args.job_id))
    if record is None:
        raise ValueError(f"no result for job {args.job_id!r} (finished results live {settings.result_ttl_s} s)")
    result = FrameResult.model_validate_json(record)
    if not args.frame and result.overlay_key is None:
        raise ValueError(f"job {args.job_id!r} was {result.status} ({result.reason}): it has no overlay; use --frame")
    bucket, key = ((settings.frames_bucket, result.frame_key) if args.frame
                   else (settings.overlays_bucket, result.overlay_key))
    print(ObjectStore(settings).presigned_url(bucket, key))
    return 0


def cmd_check_sizing(args) -> int:
    from steelsight.contract import REDIS_HEADROOM, redis_bytes_needed, sink_bytes_needed
    from steelsight.sizing import mib, parse_bytes, redis_memory, sizing_problems

    settings = _settings_with()
    policy = None
    if args.redis_maxmemory is not None:
        maxmemory = parse_bytes(args.redis_maxmemory)
    else:
        from steelsight.clients import redis_client

        memory = redis_memory(redis_client(settings))
        maxmemory, policy = memory.maxmemory, memory.policy
        print(f"Redis uses {mib(memory.used)} of maxmemory {mib(maxmemory) if maxmemory else 'unset'} "
              f"(policy {policy})")
    print(f"{args.fps:g} frames/s, results kept {settings.result_ttl_s} s, RQ jobs {settings.job_result_ttl_s} s: "
          f"Redis needs {mib(redis_bytes_needed(settings, args.fps, tiles_per_frame=args.tiles_per_frame))}")
    if settings.event_sinks():  # their outboxes and dead letters have no TTL: no policy evicts them
        print(f"  of which event sinks ({', '.join(settings.event_sinks())}; up to {settings.sink_queue_max} events "
              f"waiting and as many dead letters each): "
              f"{mib(sink_bytes_needed(settings, args.tiles_per_frame) * REDIS_HEADROOM)}")
    problems = sizing_problems(settings, args.fps, maxmemory, policy, tiles_per_frame=args.tiles_per_frame)
    for problem in problems:
        print(f"steelsight check-sizing: {problem}", file=sys.stderr)
    if not problems:
        print("fits")
    return 1 if problems else 0


def cmd_compare(args) -> int:
    from safetensors import SafetensorError

    from steelsight.model.inference.checkpoint import CheckpointError, read_meta, resolve_checkpoint

    def meta(path):
        try:
            return read_meta(resolve_checkpoint(path))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc

    for flag, path in (("--data", args.data), ("--feedback", args.feedback), ("--b-data", args.b_data)):
        if path is not None and not path.is_dir():
            raise FileNotFoundError(f"{flag} {path} is not a folder")
    if args.limit_per_class < 0 or args.batch_size < 1:
        raise ValueError("--limit-per-class must be >= 0 and --batch-size >= 1")
    metas = {name: meta(path) for name, path in (("A", args.a), ("B", args.b))}
    if set(metas["A"].classes) != set(metas["B"].classes):  # before either network is built
        raise ValueError(f"A and B know different classes: A {', '.join(metas['A'].classes)}; "
                         f"B {', '.join(metas['B'].classes)}")

    from steelsight.model.evaluation.compare import compare, format_table
    from steelsight.model.inference.predictor import Predictor
    from steelsight.model.inference.tiling import TilingConfig

    settings = _settings_with()
    a, b = (Predictor.load(path, device=args.device, batch_size=args.batch_size, backend=args.backend,
                           unknown_false_rate=settings.unknown_false_rate) for path in (args.a, args.b))
    report = compare(a, b, args.data, args.feedback, args.corruptions, args.limit_per_class, args.b_data,
                     args.exclude_overlap, TilingConfig.from_settings(settings))
    print(format_table(report))
    for warning in report["warnings"]:
        print(f"steelsight compare: WARNING: {warning}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_quantize(args) -> int:
    from steelsight.model.training.quantize import FP32_LADDER, FP32_STEPS, quantize, summary

    if (args.calibration_images is not None and args.calibration_images < 1) or args.limit_per_class < 0 \
            or (args.max_attempts is not None and args.max_attempts < 1):
        raise SystemExit("steelsight quantize: --calibration-images and --max-attempts must be >= 1, "
                         "--limit-per-class >= 0")
    if args.from_step is not None and args.from_step not in FP32_STEPS:
        raise SystemExit(f"steelsight quantize: --from-step must be one of {', '.join(FP32_STEPS)}")
    try:
        import nncf  # noqa: F401 - only quantizing needs it
    except ImportError:
        raise SystemExit("steelsight quantize: NNCF is not installed: pip install 'steelsight[quantize]' "
                         "(or pip install nncf)") from None
    calibration = {} if args.calibration_images is None else {"calibration_images": args.calibration_images}
    _, parity = quantize(args.checkpoint, args.data, args.annotations, args.limit_per_class,
                         max_attempts=args.max_attempts or len(FP32_LADDER), progress=not args.no_progress,
                         from_step=args.from_step or FP32_STEPS[0], **calibration)
    print(summary(parity))
    return 0 if parity["passed"] else 1


def cmd_dataset(args) -> int:
    from steelsight.clients import ObjectStore
    from steelsight.contract import Settings
    from steelsight.dataset import export, summary

    settings = Settings()
    try:
        store = ObjectStore(settings)
    except RuntimeError as exc:  # no S3 credentials
        raise SystemExit(f"steelsight dataset: {exc}") from exc
    manifest = export(store, settings, args.out, base=args.base, include_extra=args.include_extra,
                      force=args.force, progress=False if args.no_progress else None)
    print(summary(manifest))
    print(f"written to {args.out} (manifest: {args.out / 'manifest.json'})")
    return 0


def run(args: argparse.Namespace) -> int:
    """A parsed command, with the one-line errors (``EXIT_BAD_SETUP``) for what no retry can mend."""
    from steelsight.model.inference.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"steelsight {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_SETUP
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from steelsight.clients import PERMANENT
        from steelsight.retry import caused_by

        if not caused_by(exc, PERMANENT):
            raise
        print(f"steelsight {args.command}: Redis or S3 refused the connection for good ({type(exc).__name__}: "
              f"{exc}); check the password, credentials and CA certificate in the settings", file=sys.stderr)
        return EXIT_BAD_SETUP


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
