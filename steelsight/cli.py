"""The ``steelsight`` command line. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_SOME_REJECTED = 3
# model/backends.py's names, kept here so --help stays light
TRUNK_BACKENDS = ["auto", "torch", "torch-fp16", "onnxruntime", "openvino"]


def _add_checkpoint_args(p: argparse.ArgumentParser, batch_size: int = 16, backend: bool = True) -> None:
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="model .safetensors (default: the checkpoint shipped in the repository)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"images per forward pass (default: {batch_size})")
    if not backend:
        return
    p.add_argument("--backend", choices=TRUNK_BACKENDS, default="auto",
                   help="trunk runtime: auto = on CPU the faster of ONNX Runtime and OpenVINO, timed once per "
                        "machine (see bench/); PyTorch on GPU; torch-fp16 = half precision, for GPUs")


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
                   help="also score each fold under the five corruptions of `evaluate --corruptions` and pool "
                        "them; with --annotations (on the last stage) Grad-CAM localisation is pooled too")
    p.set_defaults(func=cmd_kfold, parser=p)


def _training_options(p, out_default: str = "runs/neu", folds_default: int = 0) -> None:
    p.add_argument("--data", type=Path, required=True, help="folder with one sub-folder per class")
    p.add_argument("--out", type=Path, default=Path(out_default), help=f"output folder (default: {out_default})")
    p.add_argument("--pretrained", default="keras",
                   help="trunk init: keras (offline ImageNet port, default), torchvision, none, or a file")
    p.add_argument("--init-from", default=None,
                   help="start from every weight of an earlier steelsight checkpoint instead of --pretrained")
    p.add_argument("--augment", choices=["standard", "strong", "blur", "motion"], default="standard",
                   help="augmentation preset; strong = harder photometric faults, blur = more and longer blur, "
                        "motion = standard plus motion streaks on a further quarter of the images "
                        "(default: standard)")
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
                    "stored in it), fits the current OOD scorer (model/ood.py) and its val threshold, and "
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
        "evaluate", help="accuracy, macro-F1, calibration, latency and Grad-CAM localisation",
        description="Writes report.json and confusion_matrix.png to --out; with --annotations also scores "
                    "Grad-CAM on NEU-DET boxes (pointing game, energy in box) and writes gradcam_grid.png.",
    )
    p.add_argument("--data", type=Path, required=True, help="folder with one sub-folder per class")
    p.add_argument("--annotations", type=Path, default=None,
                   help="NEU-DET XML folder (annotations/<class>/<stem>.xml) for localisation scores")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--split", choices=["all", "val", "train"], default="all",
                   help="all images, or the checkpoint's own val/train split (default: all)")
    p.add_argument("--cam-method", default="gradcam", help="CAM method for localisation (default: gradcam)")
    p.add_argument("--corruptions", action="store_true",
                   help="also score accuracy under noise, blur, motion blur, brightness/contrast and JPEG")
    p.add_argument("--ood", action="store_true",
                   help="also score the unknown verdict against blank, noise, pattern, photo and corrupted images")
    _add_checkpoint_args(p)
    p.set_defaults(func=cmd_evaluate)


def _predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict", help="label images, optionally with Grad-CAM overlays",
        description="Prints label, confidence, probabilities, OOD score and unknown verdict per image. "
                    f"Unreadable files are reported per file; the exit status is {EXIT_SOME_REJECTED} "
                    "when any file was rejected.",
    )
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--cam-out", type=Path, default=None, help="write <stem>_cam.png overlays here")
    p.add_argument("--cam-method", default="gradcam",
                   help="gradcam, gradcam++, hirescam, xgradcam, layercam or eigencam (default: gradcam)")
    _add_checkpoint_args(p)
    p.set_defaults(func=cmd_predict)


def _worker_parser(sub) -> None:
    p = sub.add_parser(
        "worker", help="serve the frame queue: predict, Grad-CAM, write results",
        description="Loads the checkpoint once, then takes frames from the Redis queue in micro-batches, "
                    "uploads Grad-CAM overlays and writes results (job result, per-frame record, stream). "
                    "Connection settings come from STEELSIGHT_* environment variables or .env.",
    )
    p.add_argument("--checkpoint", default=None, help="model .safetensors (default: settings, then the shipped one)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None, help="default: settings (auto)")
    p.add_argument("--batch-size", type=int, default=None, help="max frames per micro-batch (default: settings, 8)")
    p.add_argument("--backend", choices=TRUNK_BACKENDS, default=None,
                   help="trunk runtime (default: settings, auto = on CPU the faster of ONNX Runtime and OpenVINO, "
                        "timed once per machine; PyTorch on GPU; torch-fp16 = half precision, for GPUs)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default: settings, 9100)")
    p.add_argument("--name", default=None, help="worker name shown in RQ (default: steelsight-<pid>)")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.set_defaults(func=cmd_worker)


def _produce_parser(sub) -> None:
    p = sub.add_parser(
        "produce", help="send frames from a folder into the pipeline",
        description="Uploads each image to the frames bucket under {line}/{camera}/{yyyy}/{mm}/{dd}/{frame_id}.{ext} "
                    "and enqueues one job per frame (job id from line, camera and frame id, so a re-sent frame is "
                    "skipped). Waits when the queue is deeper than STEELSIGHT_MAX_QUEUE_DEPTH.",
    )
    p.add_argument("--source", type=Path, required=True, help="folder of images (searched recursively)")
    p.add_argument("--watch", action="store_true", help="send new files as they appear instead of replaying")
    p.add_argument("--loop", action="store_true", help="replay the folder forever (fresh frame ids per pass)")
    p.add_argument("--fps", type=float, default=None, help="frames per second (default: as fast as possible)")
    p.add_argument("--limit", type=int, default=None, help="stop after N frames")
    p.add_argument("--line", default="line-1", help="line id (default: line-1)")
    p.add_argument("--camera", default="cam-1", help="camera id (default: cam-1)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default: none)")
    p.set_defaults(func=cmd_produce)


def _dashboard_parser(sub) -> None:
    p = sub.add_parser(
        "dashboard", help="the Gradio dashboard: live results, upload tab, metrics",
        description="Reads results from Redis and images from S3 (settings from STEELSIGHT_* variables or .env). "
                    "Login is enabled when STEELSIGHT_DASHBOARD_USER and STEELSIGHT_DASHBOARD_PASSWORD are set.",
    )
    p.add_argument("--host", default=None, help="bind address (default: settings, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: settings, 7860)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default: settings, 9102)")
    p.add_argument("--checkpoint", default=None, help="model for the upload tab (default: the shipped one)")
    p.set_defaults(func=cmd_dashboard)


def _up_parser(sub) -> None:
    p = sub.add_parser(
        "up", help="run the whole product locally: Redis, S3, 2 workers, producer, dashboard",
        description="Starts redis-server (append-only), an S3 endpoint (minio when on PATH, else a non-persistent "
                    "moto stand-in), two workers, the producer replaying the bundled samples and the dashboard, "
                    "then prints the URLs. Ctrl-C stops everything.",
    )
    p.add_argument("--data", type=Path, default=Path("runs/stack"), help="state and logs (default: runs/stack)")
    p.add_argument("--frames", type=int, default=None, help="stop producing after N frames (default: loop forever)")
    p.add_argument("--fps", type=float, default=2.0, help="producer frames per second (default: 2)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    p.add_argument("--port-offset", type=int, default=0,
                   help="add to every port (redis 16379, s3 19000, dashboard 7860, metrics 9100-9103)")
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
    _dashboard_parser(sub)
    _up_parser(sub)
    _link_parser(sub)
    return parser


def _train_config(args, command: str):
    from steelsight.model.train import TrainConfig

    if args.loc_weight > 0 and args.annotations is None:
        raise SystemExit(f"steelsight {command}: --loc-weight needs --annotations (the NEU-DET boxes)")
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k in fields})


def cmd_train(args) -> int:
    from steelsight.model.train import train

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
    from steelsight.model.kfold import run_kfold, summary_table

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
    from steelsight.model.predictor import Predictor

    return Predictor.load(args.checkpoint, device=args.device, batch_size=args.batch_size, backend=args.backend)


def cmd_refit_ood(args) -> int:
    from steelsight.model.checkpoint import resolve_checkpoint
    from steelsight.model.train import refit_ood

    refit_ood(resolve_checkpoint(args.checkpoint), args.data, args.out, args.device, args.batch_size,
              args.with_corruptions)
    return 0


def cmd_evaluate(args) -> int:
    from steelsight.model.evaluate import evaluate

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
    for name, row in report.get("corruptions", {}).items():
        print(f"  {name:20s} ({row['severity']}): accuracy {row['accuracy']:.4f}, unknown {row['unknown_rate']:.4f}")
    if "ood" in report:
        far, held_out = report["ood"]["far_ood"], report["ood"]["far_ood_held_out"]
        print(f"OOD: far AUROC {far['auroc']:.4f} (max-softmax {far['auroc_max_softmax']:.4f}), "
              f"held-out far AUROC {held_out['auroc']:.4f}, "
              f"false-unknown rate {report['ood']['in_distribution']['false_unknown_rate']:.4f}")
    print(f"wrote {args.out / 'report.json'}")
    return 0


def _unique_png(folder: Path, stem: str) -> Path:
    path, n = folder / f"{stem}_cam.png", 1
    while path.exists():
        path, n = folder / f"{stem}_cam_{n}.png", n + 1
    return path


def cmd_predict(args) -> int:
    from PIL import Image

    from steelsight.model.imageio import ImageRejected, read_gray

    predictor = _load_predictor(args)
    rows: list[dict] = []
    good: list[tuple[int, object]] = []
    for path in args.images:
        try:
            good.append((len(rows), read_gray(path)))
            rows.append({"path": str(path)})
        except ImageRejected as exc:
            rows.append({"path": str(path), "error": {"reason": exc.reason.value, "detail": exc.detail}})
    images = [img for _, img in good]
    if args.cam_out:
        args.cam_out.mkdir(parents=True, exist_ok=True)
        results = predictor.explain(images, args.cam_method) if images else []
    else:
        results = predictor.predict(images) if images else []
    for (row_index, _), result in zip(good, results, strict=True):
        row = rows[row_index]
        row.update(result.to_dict())
        if args.cam_out:
            png = _unique_png(args.cam_out, Path(row["path"]).stem)
            Image.fromarray(result.overlay).save(png)
            row["overlay"] = str(png)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    return EXIT_SOME_REJECTED if any("error" in r for r in rows) else 0


def _print_table(rows: list[dict]) -> None:
    for row in rows:
        if "error" in row:
            print(f"{row['path']}: REJECTED ({row['error']['reason']}) {row['error']['detail']}")
            continue
        verdict = "UNKNOWN " if row.get("unknown") else ""
        ood = f" ood {row['ood_score']:.2f}" if row.get("ood_score") is not None else ""
        extra = f" overlay {row['overlay']}" if "overlay" in row else ""
        print(f"{row['path']}: {verdict}{row['label']} {row['confidence']:.3f}{ood}{extra}")


def _settings_with(**overrides):
    from steelsight.contract import get_settings

    return get_settings().model_copy(update={k: v for k, v in overrides.items() if v is not None})


def _logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def cmd_worker(args) -> int:
    from steelsight.worker.service import run_worker

    _logging()
    settings = _settings_with(checkpoint=args.checkpoint, device=args.device, batch_size=args.batch_size,
                              metrics_port=args.metrics_port, backend=args.backend)
    run_worker(settings, burst=args.burst, name=args.name)
    return 0


def cmd_produce(args) -> int:
    from prometheus_client import start_http_server

    from steelsight.contract import validate_id
    from steelsight.producer.service import Producer, replay, run_producer, watch

    _logging()
    validate_id(args.line, "--line")
    validate_id(args.camera, "--camera")
    settings = _settings_with()
    if args.metrics_port:
        start_http_server(args.metrics_port)
    producer = Producer(settings, args.line, args.camera)
    frames = watch(args.source, limit=args.limit) if args.watch else replay(args.source, args.loop, args.limit)
    counts = run_producer(producer, frames, args.fps)
    print("sent: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts else "sent nothing")
    return 0


def cmd_dashboard(args) -> int:
    from steelsight.dashboard.app import launch

    _logging()
    settings = _settings_with(dashboard_host=args.host, dashboard_port=args.port,
                              dashboard_metrics_port=args.metrics_port, checkpoint=args.checkpoint)
    launch(settings)
    return 0


def cmd_up(args) -> int:
    from steelsight.stack import Stack, run_stack

    return run_stack(Stack(args.data.resolve(), args.port_offset, args.frames, args.fps, args.workers))


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from steelsight.model.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"steelsight {args.command}: {exc}", file=sys.stderr)
        return 2
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
        return 2


if __name__ == "__main__":
    sys.exit(main())
