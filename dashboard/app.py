"""The Gradio dashboard: live line view, ad-hoc upload with CAM comparison, pipeline metrics.

Results come from Redis and images from S3 through :class:`LiveSource`; the
model for uploads is a :class:`Predictor` loaded once. Images reach the browser
served by the app itself (Gradio's file cache), so buckets stay private and the
browser needs no route to S3.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import cv2
import gradio as gr
import numpy as np
import pandas as pd
from starlette.middleware import Middleware

from steelsight.alerts import DRIFT_ALERTS, active_alerts, drift_summary
from steelsight.contract import CAMERA_REASONS, Settings, unknown_kind
from steelsight.feedback import FeedbackError, upload_frame_id, upload_result
from steelsight.model.inference.cam import CAM_METHODS
from steelsight.model.inference.imageio import DecodeLimits, ImageRejected, decode_gray
from steelsight.model.inference.labels import CLASSES
from steelsight.model.inference.predictor import Predictor
from steelsight.model.inference.tiling import TilingConfig, tile_count

from . import metrics, uploads
from .access import check_access
from .data import (
    ALL,
    REJECTED,
    UNKNOWN,
    VERDICTS,
    Filters,
    LiveSource,
    Window,
    apply_filters,
    caption,
    class_counts,
    latency_quantiles,
    rate_over_time,
)
from .feedback import FeedbackControls, FeedbackViews, short_sha
from .models import ModelsView
from .tiles import draw_tiles, legend_html, summary_html, summary_text

GALLERY_SIZE = 12
METRICS_RESULTS = 2000  # the metrics tab's counts and latency quantiles are over this many latest results


def _tile(shade: int, text: str) -> np.ndarray:
    tile = np.full((96, 96, 3), shade, np.uint8)
    cv2.putText(tile, text, (8, 52), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255 - shade,) * 3, 1, cv2.LINE_AA)
    return tile


PLACEHOLDER = _tile(90, "no image")  # expired, refused by the decoder, or the store failed this time
LOADING = _tile(200, "loading")  # still on its way from the object store
CSS = """
.unknown-banner {background:#b45309;color:white;padding:4px 8px;border-radius:4px;font-weight:600}
.unknown-banner.camera {background:#7c3aed}
.ood-gauge {position:relative;background:#e5e7eb;border-radius:3px;height:10px;margin:4px 0 2px 0}
.ood-fill {height:10px;border-radius:3px;background:#16a34a}
.ood-fill.above {background:#b45309}
.ood-threshold {position:absolute;top:-3px;width:2px;height:16px;background:#111827}
.ood-score {font-size:0.85em;margin:0 0 6px 0}
.bar {background:#e5e7eb;border-radius:3px;height:14px;margin:2px 0 6px 0}
.bar > div {background:#2563eb;height:14px;border-radius:3px}
.upload-error {color:#b91c1c;font-weight:600}
.swatch {display:inline-block;width:12px;height:12px;margin:0 4px 0 2px;vertical-align:middle}
.legend-item {margin-right:10px;white-space:nowrap}
.tile-summary ul {margin:2px 0 6px 0}
/* Gradio's gallery cells are square: a wide frame contained in one would be a thin strip in its middle.
   Thumbnails of one height instead, each as wide as its frame's aspect ratio makes it, in wrapping rows. */
.frames-gallery .grid-container {display:flex;flex-wrap:wrap;align-items:flex-start}
.frames-gallery .thumbnail-item {aspect-ratio:auto;width:auto;height:auto;max-width:100%}
.frames-gallery .thumbnail-item > img {height:150px;width:auto;max-width:100%}
"""


def _window_text(window: Window) -> str:
    """The window as it is: the minutes asked for, or the part of them the frames shown cover."""
    asked = f"{window.window_s / 60:g} min"
    if window.limited_by is None:
        return f"({asked})"
    why = ("the dashboard reads at most STEELSIGHT_DASHBOARD_WINDOW_MAX_FRAMES results"
           if window.limited_by == "read limit" else "older results have left the stream (STEELSIGHT_STREAM_MAXLEN)")
    return f"(the last {window.covered_s / 60:.1f} min of the {asked} window: {why})"


def _stats_markdown(state: dict, window: Window, shown=None) -> str:
    shown = window.results if shown is None else shown
    q = latency_quantiles(shown)["total_s"]
    throughput = len(shown) / window.covered_s if window.covered_s else 0.0
    return (f"**queue depth** {state['queue_depth']} · **workers alive** {state['workers_alive']} · "
            f"**failed jobs** {state['failed_jobs']} · **frames in window** {len(shown)} "
            f"{_window_text(window)} · **throughput** {throughput:.2f} frames/s · "
            f"**latency p50** {_seconds(q['p50'])} · **p95** {_seconds(q['p95'])}")


def _seconds(value: float, digits: int = 2, unit: str = "s") -> str:
    return "–" if np.isnan(value) else f"{value:.{digits}f}{unit}"  # no frame: no latency


def _counts_markdown(counts) -> str:
    cells = " | ".join(f"{row['class']}: {row['frames']}" for _, row in counts.iterrows())
    return f"<span id='class-counts'>{cells}</span>"


def _score_gauge(score: float, threshold: float, val_share: float | None, floor: float = 0.0) -> str:
    """Where the frame's OOD score sits: a bar from ``floor`` (the lowest val score: scores can be negative) with
    the threshold marked, and its rank among the checkpoint's in-distribution val images."""
    floor = min(floor, threshold, score)
    top = max(threshold + (threshold - floor), score + 0.1 * (score - floor), floor + 1e-6)
    left = 100 * (score - floor) / (top - floor)
    mark = 100 * (threshold - floor) / (top - floor)
    side = "above" if score > threshold else "below"
    rank = "" if val_share is None else f"; higher than {val_share:.1%} of the model's in-distribution val images"
    return (f"<div class='ood-gauge' title='OOD score {score:.2f}, threshold {threshold:.2f}'>"
            f"<div class='ood-fill {side}' style='width:{left:.1f}%'></div>"
            f"<div class='ood-threshold' style='left:{mark:.1f}%'></div></div>"
            f"<p class='ood-score'>OOD score {score:.2f}, {side} the threshold {threshold:.2f}{rank}</p>")


def _bars_html(name: str, pred, error: str | None = None, threshold: float | None = None, tiles_html: str = "",
               val_share: float | None = None, floor: float = 0.0) -> str:
    """Label, unknown banner, the OOD score against the threshold and probability bars; a tiled frame's summary
    (``tiles_html``) goes before its bars, which are then its top defect tile's (or its most unknown tile's)."""
    title = f"<h4>{html.escape(name)}</h4>"
    if error:
        return title + f"<p class='upload-error'>Rejected: {html.escape(error)}</p>"
    if pred.ood_score is not None and threshold is not None:
        score = _score_gauge(pred.ood_score, threshold, val_share, floor)
    else:
        score = "<p class='ood-score'>no OOD scorer</p>" if pred.ood_score is None else \
            f"<p class='ood-score'>OOD score {pred.ood_score:.2f}</p>"
    banner = ""
    if pred.unknown:
        reason = pred.unknown_reason or ""
        if unknown_kind(reason) == "camera":  # operators act on the two differently
            banner = (f"<p class='unknown-banner camera'>UNKNOWN — camera problem ({html.escape(reason)}): "
                      f"check {html.escape(CAMERA_REASONS[reason])}</p>")
        else:
            banner = ("<p class='unknown-banner unfamiliar'>UNKNOWN — not what the model knows: another material, "
                      f"product or defect ({html.escape(reason)})</p>")
    rows = "".join(
        f"<div>{html.escape(c)} — {p:.1%}</div><div class='bar'><div style='width:{100 * p:.1f}%'></div></div>"
        for c, p in sorted(pred.probabilities.items(), key=lambda kv: -kv[1])
    )
    if tiles_html and rows:
        tiles_html += "<p class='bars-note'>probabilities of the tile the label comes from:</p>"
    return (f"{title}{banner}<p class='upload-label'><b>{html.escape(pred.label)}</b> {pred.confidence:.1%}</p>"
            f"{score}{tiles_html}{rows}")


def _shrink(gray: np.ndarray, max_side: int) -> np.ndarray:
    """(Gray or RGB) at most ``max_side`` px on the longer side (INTER_AREA, as the model's own resize)."""
    h, w = gray.shape[:2]
    if max(h, w) <= max_side:
        return gray
    scale = max_side / max(h, w)
    return cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


class Dashboard:
    def __init__(self, settings: Settings, source: LiveSource, predictor: Predictor):
        self.settings = settings
        self.source = source
        self.predictor = predictor
        self.limits = DecodeLimits(max_bytes=settings.max_upload_bytes)
        checkpoint = getattr(predictor, "checkpoint", None)
        self.feedback = FeedbackViews(settings, source, checkpoint.sha256 if checkpoint is not None else "")
        self.models = ModelsView(settings, source)

    # live tab --------------------------------------------------------------------
    def refresh_live(self, line: str, camera: str, label: str, window_min: float):
        started = time.perf_counter()
        window = self.source.window(int(window_min * 60))
        results = window.results
        lines = sorted({r.line_id for r in results})
        cameras = sorted({r.camera_id for r in results})
        shown = apply_filters(results, Filters(line, camera, label, int(window_min * 60)))
        latest = shown[:GALLERY_SIZE]
        refs = [self._thumb_ref(r) for r in latest]
        wanted = [ref for ref in refs if ref]
        images = self.source.images(wanted, self.settings.dashboard_image_wait_s)
        metrics.IMAGES_LATE.inc(len(set(wanted) - images.keys()))
        gallery = [(self._thumb(r, images.get(ref, LOADING) if ref else None), caption(r))
                   for r, ref in zip(latest, refs, strict=True)]
        counts = class_counts(shown)
        state = self.source.pipeline_state()
        metrics.REFRESH_SECONDS.observe(time.perf_counter() - started)
        return (
            gallery, counts, rate_over_time(shown), _stats_markdown(state, window, shown),
            _counts_markdown(counts), {caption(r): r.model_dump_json() for r in latest},
            gr.update(choices=[ALL, *lines]), gr.update(choices=[ALL, *cameras]),
        )

    def _thumb_ref(self, r):
        return self.source.overlay_ref(r) if r.status == "ok" else self.source.original_ref(r)

    @staticmethod
    def _thumb(r, image):
        if image is None:
            return PLACEHOLDER
        if image is LOADING:
            return LOADING
        return draw_tiles(image, r.tiles) if r.status == "ok" and r.tiles else image

    def select_frame(self, shown: dict[str, str], evt: gr.SelectData):
        """Find the result by the selected item's caption: the gallery may have refreshed since the click."""
        from steelsight.contract import FrameResult

        selected = (evt.value or {}).get("caption") if evt is not None else None
        if selected not in shown:
            return None, None, {}, "that frame has scrolled out of the gallery; select another", ""
        r = FrameResult.model_validate_json(shown[selected])
        detail = caption(r) + (f"\n\nreason: `{r.reason}`" if r.reason else "")
        detail += f"\n\nmodel `{short_sha(r.checkpoint_sha256)}`"
        overlay = self.source.overlay(r)
        if r.tiles:
            detail += "\n\n**tiles:** " + summary_text(r.tiles, r.defect_counts, r.top_defect)
            if overlay is not None:
                overlay = draw_tiles(overlay, r.tiles)
        return self.source.original(r), overlay, r.probabilities, detail, shown[selected]

    # upload tab ------------------------------------------------------------------
    def explain_uploads(self, files, method: str):
        if not files:
            return [], "<p>Drop one or more images above.</p>"
        refused = uploads.refusal(list(files), self.settings)
        if refused:
            metrics.UPLOADS.labels(outcome="refused").inc()
            gr.Warning(f"Upload refused: {refused}")
            return [], f"<p class='upload-error'>Upload refused: {html.escape(refused)}</p>"
        names, frame_ids, grays, blocks = [], [], [], []
        tiling, max_side = TilingConfig.from_settings(self.settings), self.settings.dashboard_image_max_side
        for path in files:
            name = Path(path).name
            try:
                data = Path(path).read_bytes()
                frame_id = upload_frame_id(data)  # names the upload if an operator marks its verdict
                gray = decode_gray(data, self.limits)
                del data
            except ImageRejected as exc:
                metrics.UPLOADS.labels(outcome="rejected").inc()
                gr.Warning(f"{name}: {exc}")
                blocks.append(_bars_html(name, None, str(exc)))
                continue
            tiles = tile_count(*gray.shape[:2], tiling, self.predictor.input_size)
            if tiles > tiling.max_tiles:  # refused from its size, before any tile runs
                metrics.UPLOADS.labels(outcome="rejected").inc()
                why = (f"too_many_tiles: {gray.shape[1]}x{gray.shape[0]} needs {tiles} tiles at the model's scale, "
                       f"over the limit of {tiling.max_tiles} (STEELSIGHT_MAX_TILES_PER_FRAME)")
                gr.Warning(f"{name}: {why}")
                blocks.append(_bars_html(name, None, why))
                continue
            grays.append(gray)
            names.append(name)
            frame_ids.append((path, frame_id))
        # at the frame's own size: the worker's path, where a frame larger than one tile is tiled at the
        # model's scale (shrinking it first would change its pixels per mm); only the overlay is shrunk, to show
        explained = self.predictor.explain_frames(grays, tiling, method) if grays else []
        gallery = []
        for name, (path, frame_id), gray, exp in zip(names, frame_ids, grays, explained, strict=True):
            metrics.UPLOADS.labels(outcome="unknown" if exp.unknown else "ok").inc()
            self._remember_upload(path, frame_id, name, exp)
            overlay = _shrink(exp.overlay, max_side)
            summary = ""
            if exp.tiles:
                overlay = draw_tiles(overlay, exp.tiles, (gray.shape[1], gray.shape[0]))
                summary = summary_html(exp.tiles, exp.defect_counts, exp.top_defect)
            val_share = None if exp.ood_score is None else self.predictor.val_share_below(exp.ood_score)
            floor = float(self.predictor.val_ood_scores.min()) if len(self.predictor.val_ood_scores) else 0.0
            block = _bars_html(name, exp, threshold=self.predictor.ood_threshold, tiles_html=summary,
                               val_share=val_share, floor=floor)
            said = f"{name}: {UNKNOWN + ' · ' if exp.unknown else ''}{exp.label}"
            gallery.append((overlay, said + (f" · {len(exp.tiles)} tiles" if exp.tiles else "")))
            blocks.append(block)
        return gallery, "".join(blocks)

    def _remember_upload(self, path: str, frame_id: str, name: str, exp) -> None:
        """Keep the upload's verdict so an operator can mark it (upload tab, below the report)."""
        try:
            result = upload_result(frame_id, name, exp.label, exp.confidence, unknown=exp.unknown,
                                   unknown_reason=exp.unknown_reason, probabilities=exp.probabilities,
                                   checkpoint_sha256=self.feedback.checkpoint_sha256)
        except FeedbackError:  # no image extension: it could not be kept as a training image
            return
        self.feedback.remember_upload(path, result)

    # metrics tab -----------------------------------------------------------------
    def alerts_markdown(self) -> str:
        """The pending and firing alerts of ``STEELSIGHT_PROMETHEUS_URL``, one row each."""
        url = self.settings.prometheus_url
        if not url:
            return "**alerts** — no Prometheus configured (`STEELSIGHT_PROMETHEUS_URL`)"
        try:
            active = active_alerts(url)
        except (OSError, ValueError) as exc:
            return f"**alerts** — Prometheus at {html.escape(url)} does not answer ({html.escape(str(exc))})"
        if not active:
            return f"**alerts** — none pending or firing ([Prometheus]({url}/alerts))"
        rows = "\n".join(
            f"| {a.state} | {a.severity} | {a.name} | "
            f"{html.escape(', '.join(f'{k}={v}' for k, v in sorted(a.labels.items()) if k not in ('job', 'instance')))}"
            f" | {html.escape(a.summary)} | {a.active_since[:19].replace('T', ' ')} |" for a in active)
        firing = sum(a.state == "firing" for a in active)
        return (f"**alerts** — {firing} firing, {len(active) - firing} pending ([Prometheus]({url}/alerts), "
                "runbooks in `docs/alerts.md`)\n\n| state | severity | alert | where | summary | since (UTC) |\n"
                "|---|---|---|---|---|---|\n" + rows)

    def drift_html(self) -> str:
        """Each line's drift (rules.yml's recording rules) in one table row; a cell is flagged while the drift
        alert judging it is pending or firing, so the table shows what the alerts evaluate."""
        url = self.settings.prometheus_url
        if not url:
            return "<p><b>drift</b> — no Prometheus configured (<code>STEELSIGHT_PROMETHEUS_URL</code>)</p>"
        try:
            lines = drift_summary(url)
        except (OSError, ValueError) as exc:
            return f"<p><b>drift</b> — Prometheus at {html.escape(url)} does not answer ({html.escape(str(exc))})</p>"
        if not lines:
            return "<p><b>drift</b> — no line has drift series yet (workers export them once they read frames)</p>"
        e = html.escape
        alert_of = {cell: name for name, cell in DRIFT_ALERTS.items()}

        def num(v, fmt="{:.2f}"):
            return "—" if v is None else fmt.format(v)

        def pct(v):
            return num(v, "{:.1%}")

        def cell(d, key: str, text: str) -> str:
            state = d.flags.get(key)
            if not state:
                return f"<td>{text}</td>"
            name = alert_of[key.partition(":")[0]]
            return (f'<td style="background:#fde68a" title="{e(name)} {e(state)}">&#9888; {text} '
                    f"<small>{e(name)} {e(state)}</small></td>")

        stats = sorted({s for d in lines for s in d.inputs})
        head = "".join(f"<th>{e(s)} (training mean ± std)</th>" for s in stats)
        rows = []
        for d in lines:
            mix = f"TV {num(d.mix_distance)}"
            if d.mix_class is not None:
                mix += f" · {e(d.mix_class)} {pct(d.mix_share)} vs {pct(d.mix_prior)}"
            inputs = ""
            for s in stats:
                i = d.inputs.get(s)
                if i is None:
                    inputs += "<td>—</td>"
                    continue
                train = ("no training record" if i.training_mean is None
                         else f"{i.training_mean:.2f} ± {num(i.training_std)}"
                         + ("" if i.sigmas is None else f" · {i.sigmas:.1f} σ"))
                inputs += cell(d, f"input:{s}", f"{num(i.mean)} <small>({e(train)})</small>")
            rows.append(f"<tr><td>{e(d.line)}</td>"
                        + cell(d, "confidence", f"{num(d.confidence)} <small>(6 h {num(d.confidence_6h)})</small>")
                        + cell(d, "unknown", f"{pct(d.unknown)} <small>(6 h {pct(d.unknown_6h)})</small>")
                        + cell(d, "class_mix", mix) + inputs + "</tr>")
        return ("<p><b>drift</b> — last 30 minutes per line, against the line's 6 hours or the training set "
                "(runbooks in <code>docs/alerts.md</code>)</p><table><tr><th>line</th><th>mean confidence</th>"
                "<th>unknown share</th><th>class mix vs training prior (largest deviation)</th>"
                f"{head}</tr>{''.join(rows)}</table>")

    def refresh_metrics(self):
        results = self.source.recent(METRICS_RESULTS)
        counts = class_counts(results)
        q = latency_quantiles(results)
        state = self.source.pipeline_state()
        cells = {name: " | ".join(_seconds(v[p], 3, unit="") for p in ("p50", "p95", "p99")) for name, v in q.items()}
        rows = "\n".join(f"| {name} | {row} |" for name, row in cells.items())
        table = ("| latency (s) | p50 | p95 | p99 |\n|---|---:|---:|---:|\n" + rows +
                 f"\n\n**latest results read** {len(results)} (of {self.source.stream_length()} in the stream) · "
                 f"**queue depth** {state['queue_depth']} · "
                 f"**workers alive** {state['workers_alive']} · **failed jobs** {state['failed_jobs']} · "
                 f"**rejected** {int(counts.loc[counts['class'] == REJECTED, 'frames'].sum())}")
        latency = [{"frame": i, "stage": stage, "seconds": getattr(r.timings, stage)}
                   for i, r in enumerate(reversed(results[:300])) for stage in ("queue_wait_s", "inference_s")]
        return (self.alerts_markdown(), self.drift_html(), table, counts,
                pd.DataFrame(latency, columns=["frame", "stage", "seconds"]))

    def scrape_help(self) -> str:
        s = self.settings
        return (f"Prometheus scrapes each worker on `:{s.metrics_port}/metrics` (one port per worker, "
                f"`STEELSIGHT_METRICS_PORT`), the producer on the port given by `produce --metrics-port`, and this "
                f"dashboard on `:{s.dashboard_metrics_port}/metrics`. The numbers here are read from the results "
                f"stream `{s.results_stream}` in Redis.")

    # layout ------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        with gr.Blocks(title="steelsight", delete_cache=(300, 600)) as demo:
            gr.Markdown("# steelsight — live steel-strip inspection")
            with gr.Tab("Live", id="live"):
                self._live_tab()
            with gr.Tab("Upload", id="upload"):
                self._upload_tab()
            with gr.Tab("Review", id="review") as review:
                filters, outputs = self.feedback.review_tab()
            review.select(self.feedback.refresh_review, filters, outputs, show_progress="hidden")
            with gr.Tab("Models", id="models"):
                self.models.tab()
            with gr.Tab("Metrics", id="metrics"):
                self._metrics_tab()
        return demo

    def _live_tab(self):
        with gr.Row():
            line = gr.Dropdown([ALL], value=ALL, label="line", allow_custom_value=True)
            camera = gr.Dropdown([ALL], value=ALL, label="camera", allow_custom_value=True)
            label = gr.Dropdown([ALL, *VERDICTS], value=ALL, label="class")
            window = gr.Slider(1, 240, value=15, step=1, label="window (minutes)")
        stats = gr.Markdown(elem_id="live-stats")
        counts_text = gr.HTML(elem_id="live-counts")
        # contain: a wide line-camera frame is shown whole at its own aspect ratio, never cropped to a square
        gallery = gr.Gallery(label="latest frames (Grad-CAM overlays)", columns=6, height=420,
                             elem_id="live-gallery", allow_preview=False, object_fit="contain",
                             elem_classes=["frames-gallery"])
        gr.HTML(legend_html(), elem_id="live-legend")
        with gr.Row():
            bars = gr.BarPlot(x="class", y="frames", title="frames per class in window", sort=VERDICTS)
            rates = gr.LinePlot(x="time", y="value", color="series", elem_id="live-rates",
                                title="share of frames per class and unknown (10 s buckets), against the window's")
        with gr.Row():
            original = gr.Image(label="selected frame: original", interactive=False)
            overlay = gr.Image(label="selected frame: Grad-CAM", interactive=False)
            with gr.Column():
                probs = gr.Label(label="probabilities", num_top_classes=len(CLASSES))
                detail = gr.Markdown(elem_id="selected-detail")
        selected = gr.State("")  # the selected frame's result (JSON), for marking it
        controls = FeedbackControls("live")
        shown = gr.State({})
        timer = gr.Timer(self.settings.dashboard_refresh_s)
        inputs = [line, camera, label, window]
        outputs = [gallery, bars, rates, stats, counts_text, shown, line, camera]
        # trigger_mode="once": a tick while a refresh is still running is dropped, so requests never pile up
        timer.tick(self.refresh_live, inputs, outputs, trigger_mode="once", concurrency_limit=1,
                   show_progress="hidden")
        for control in inputs:
            control.change(self.refresh_live, inputs, outputs, trigger_mode="always_last", show_progress="hidden")
        gallery.select(self.select_frame, [shown], [original, overlay, probs, detail, selected]).then(
            self.feedback.live_mark, [selected], [controls.status, *controls.inputs], show_progress="hidden")
        controls.submit.click(self.feedback.submit_live, [selected, *controls.inputs], controls.status,
                              show_progress="hidden")
        controls.undo.click(self.feedback.undo_live, [selected], controls.status, show_progress="hidden")

    def _upload_tab(self):
        s = self.settings
        gr.Markdown(f"Drop up to {s.max_upload_files} images at once (up to {s.max_upload_bytes / 2**20:g} MiB each, "
                    f"{s.max_upload_total_bytes / 2**20:g} MiB together).")
        with gr.Row():
            files = gr.File(file_count="multiple", label="images", elem_id="upload-files")
            method = gr.Dropdown(list(CAM_METHODS), value="gradcam", label="CAM method")
        run = gr.Button("Explain", variant="primary", elem_id="upload-run")
        gallery = gr.Gallery(label="overlays", columns=4, height=340, elem_id="upload-gallery",
                             allow_preview=True, preview=False, object_fit="contain", elem_classes=["frames-gallery"])
        gr.HTML(legend_html(), elem_id="upload-legend")
        report = gr.HTML(elem_id="upload-report")
        gr.Markdown("### Mark an upload's verdict")
        with gr.Row():
            chosen = gr.Dropdown([], label="uploaded file", elem_id="upload-fb-file")
            model = gr.Markdown(f"model `{short_sha(self.feedback.checkpoint_sha256)}`", elem_id="upload-model")
        known = gr.State({})
        controls = FeedbackControls("upload")
        choices = (self.feedback.upload_choices, [files], [chosen, known, model])
        run.click(self.explain_uploads, [files, method], [gallery, report], concurrency_limit=2).then(*choices)
        files.upload(self.explain_uploads, [files, method], [gallery, report], concurrency_limit=2).then(*choices)
        controls.submit.click(self.feedback.submit_upload, [chosen, known, *controls.inputs], controls.status,
                              show_progress="hidden")
        controls.undo.click(self.feedback.undo_upload, [chosen, known], controls.status, show_progress="hidden")

    def _metrics_tab(self):
        gr.Markdown(self.scrape_help())
        alerts = gr.Markdown(elem_id="metrics-alerts")
        drift = gr.HTML(elem_id="metrics-drift")
        table = gr.Markdown(elem_id="metrics-table")
        with gr.Row():
            counts = gr.BarPlot(x="class", y="frames", title=f"frames by verdict (latest {METRICS_RESULTS:,} results)",
                                sort=VERDICTS)
            latency = gr.LinePlot(x="frame", y="seconds", color="stage", title="latency of the last 300 frames")
        timer = gr.Timer(max(self.settings.dashboard_refresh_s * 2.5, 5))
        timer.tick(self.refresh_metrics, None, [alerts, drift, table, counts, latency], trigger_mode="once",
                   concurrency_limit=1, show_progress="hidden")


def launch(settings: Settings, predictor: Predictor | None = None, block: bool = True,
           insecure_no_auth: bool = False):
    """Serve the dashboard; :func:`check_access` refuses an open one beyond loopback before anything loads."""
    from prometheus_client import start_http_server

    auth = check_access(settings, insecure_no_auth)
    predictor = predictor or Predictor.load(settings.checkpoint, device="cpu", backend=settings.backend,
                                            unknown_false_rate=settings.unknown_false_rate)
    source = LiveSource(settings)
    app = Dashboard(settings, source, predictor).build()
    start_http_server(settings.dashboard_metrics_port, addr=settings.metrics_host)
    app.queue(default_concurrency_limit=4)
    limits = Middleware(uploads.UploadLimits, max_files=settings.max_upload_files,
                        max_total_bytes=settings.max_upload_total_bytes)
    app.launch(server_name=settings.dashboard_host, server_port=settings.dashboard_port, auth=auth,
               max_file_size=settings.max_upload_bytes, prevent_thread_lock=not block, show_error=True, css=CSS,
               footer_links=["api"], quiet=False, app_kwargs={"middleware": [limits]})
    if block:  # served until Ctrl-C: reads still queued are dropped rather than waited for at exit
        source.close()
    return app
