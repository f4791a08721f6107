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

from steelsight.contract import Settings
from steelsight.model.inference.cam import CAM_METHODS
from steelsight.model.inference.imageio import DecodeLimits, ImageRejected, decode_gray
from steelsight.model.inference.labels import CLASSES
from steelsight.model.inference.predictor import Predictor
from steelsight.model.inference.tiling import tile_count

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
from .tiles import draw_tiles, legend_html, summary_html, summary_text

GALLERY_SIZE = 12
METRICS_RESULTS = 2000  # the metrics tab's counts and latency quantiles are over this many latest results
PLACEHOLDER = np.full((64, 64, 3), 90, np.uint8)
CSS = """
.unknown-banner {background:#b45309;color:white;padding:4px 8px;border-radius:4px;font-weight:600}
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
    return (f"**queue depth** {state['queue_depth']} · **workers alive** {state['workers_alive']} · "
            f"**failed jobs** {state['failed_jobs']} · **frames in window** {len(shown)} "
            f"{_window_text(window)} · **latency p50** {q['p50']:.2f}s · **p95** {q['p95']:.2f}s")


def _counts_markdown(counts) -> str:
    cells = " | ".join(f"{row['class']}: {row['frames']}" for _, row in counts.iterrows())
    return f"<span id='class-counts'>{cells}</span>"


def _bars_html(name: str, pred, error: str | None = None, threshold: float | None = None, tiles_html: str = "") -> str:
    """Label, unknown banner and probability bars; a tiled frame's summary (``tiles_html``) goes before its bars,
    which are then its top defect tile's."""
    title = f"<h4>{html.escape(name)}</h4>"
    if error:
        return title + f"<p class='upload-error'>Rejected: {html.escape(error)}</p>"
    score = f"OOD score {pred.ood_score:.2f}" if pred.ood_score is not None else "no OOD scorer"
    if pred.ood_score is not None and threshold is not None:
        score += f" against a threshold of {threshold:.2f}"  # the score alone means nothing to an operator
    banner = ("<p class='unknown-banner'>UNKNOWN — this surface does not look like the training data "
              f"({pred.unknown_reason}, {score})</p>") if pred.unknown else ""
    rows = "".join(
        f"<div>{html.escape(c)} — {p:.1%}</div><div class='bar'><div style='width:{100 * p:.1f}%'></div></div>"
        for c, p in sorted(pred.probabilities.items(), key=lambda kv: -kv[1])
    )
    if tiles_html and rows:
        tiles_html += "<p class='bars-note'>probabilities of the tile the label comes from:</p>"
    return (f"{title}{banner}<p class='upload-label'><b>{html.escape(pred.label)}</b> {pred.confidence:.1%}</p>"
            f"{tiles_html}{rows}")


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

    # live tab --------------------------------------------------------------------
    def refresh_live(self, line: str, camera: str, label: str, window_min: float):
        started = time.perf_counter()
        window = self.source.window(int(window_min * 60))
        results = window.results
        lines = sorted({r.line_id for r in results})
        cameras = sorted({r.camera_id for r in results})
        shown = apply_filters(results, Filters(line, camera, label, int(window_min * 60)))
        latest = shown[:GALLERY_SIZE]
        gallery = [(self._thumb(r), caption(r)) for r in latest]
        counts = class_counts(shown)
        state = self.source.pipeline_state()
        metrics.REFRESH_SECONDS.observe(time.perf_counter() - started)
        return (
            gallery, counts, rate_over_time(shown), _stats_markdown(state, window, shown),
            _counts_markdown(counts), {caption(r): r.model_dump_json() for r in latest},
            gr.update(choices=[ALL, *lines]), gr.update(choices=[ALL, *cameras]),
        )

    def _thumb(self, r):
        image = self.source.overlay(r) if r.status == "ok" else self.source.original(r)
        if image is None:
            return PLACEHOLDER
        return draw_tiles(image, r.tiles) if r.status == "ok" and r.tiles else image

    def select_frame(self, shown: dict[str, str], evt: gr.SelectData):
        """Find the result by the selected item's caption: the gallery may have refreshed since the click."""
        from steelsight.contract import FrameResult

        selected = (evt.value or {}).get("caption") if evt is not None else None
        if selected not in shown:
            return None, None, {}, "that frame has scrolled out of the gallery; select another"
        r = FrameResult.model_validate_json(shown[selected])
        detail = caption(r) + (f"\n\nreason: `{r.reason}`" if r.reason else "")
        overlay = self.source.overlay(r)
        if r.tiles:
            detail += "\n\n**tiles:** " + summary_text(r.tiles, r.defect_counts, r.top_defect)
            if overlay is not None:
                overlay = draw_tiles(overlay, r.tiles)
        return self.source.original(r), overlay, r.probabilities, detail

    # upload tab ------------------------------------------------------------------
    def explain_uploads(self, files, method: str):
        if not files:
            return [], "<p>Drop one or more images above.</p>"
        refused = uploads.refusal(list(files), self.settings)
        if refused:
            metrics.UPLOADS.labels(outcome="refused").inc()
            gr.Warning(f"Upload refused: {refused}")
            return [], f"<p class='upload-error'>Upload refused: {html.escape(refused)}</p>"
        names, grays, blocks = [], [], []
        tiling, max_side = self.settings.tiling(), self.settings.dashboard_image_max_side
        for path in files:
            name = Path(path).name
            try:
                gray = decode_gray(Path(path).read_bytes(), self.limits)
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
        # at the frame's own size: the worker's path, where a frame larger than one tile is tiled at the
        # model's scale (shrinking it first would change its pixels per mm); only the overlay is shrunk, to show
        explained = self.predictor.explain_frames(grays, tiling, method) if grays else []
        gallery = []
        for name, gray, exp in zip(names, grays, explained, strict=True):
            metrics.UPLOADS.labels(outcome="unknown" if exp.unknown else "ok").inc()
            overlay = _shrink(exp.overlay, max_side)
            summary = ""
            if exp.tiles:
                overlay = draw_tiles(overlay, exp.tiles, (gray.shape[1], gray.shape[0]))
                summary = summary_html(exp.tiles, exp.defect_counts, exp.top_defect)
            block = _bars_html(name, exp, threshold=self.predictor.ood_threshold, tiles_html=summary)
            said = f"{name}: {UNKNOWN + ' · ' if exp.unknown else ''}{exp.label}"
            gallery.append((overlay, said + (f" · {len(exp.tiles)} tiles" if exp.tiles else "")))
            blocks.append(block)
        return gallery, "".join(blocks)

    # metrics tab -----------------------------------------------------------------
    def refresh_metrics(self):
        results = self.source.recent(METRICS_RESULTS)
        counts = class_counts(results)
        q = latency_quantiles(results)
        state = self.source.pipeline_state()
        rows = "\n".join(f"| {name} | {v['p50']:.3f} | {v['p95']:.3f} | {v['p99']:.3f} |" for name, v in q.items())
        table = ("| latency (s) | p50 | p95 | p99 |\n|---|---:|---:|---:|\n" + rows +
                 f"\n\n**latest results read** {len(results)} (of {self.source.stream_length()} in the stream) · "
                 f"**queue depth** {state['queue_depth']} · "
                 f"**workers alive** {state['workers_alive']} · **failed jobs** {state['failed_jobs']} · "
                 f"**rejected** {int(counts.loc[counts['class'] == REJECTED, 'frames'].sum())}")
        latency = [{"frame": i, "stage": stage, "seconds": getattr(r.timings, stage)}
                   for i, r in enumerate(reversed(results[:300])) for stage in ("queue_wait_s", "inference_s")]
        return table, counts, pd.DataFrame(latency, columns=["frame", "stage", "seconds"])

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
            rates = gr.LinePlot(x="time", y="value", color="series", title="throughput and defect rate")
        with gr.Row():
            original = gr.Image(label="selected frame: original", interactive=False)
            overlay = gr.Image(label="selected frame: Grad-CAM", interactive=False)
            with gr.Column():
                probs = gr.Label(label="probabilities", num_top_classes=len(CLASSES))
                detail = gr.Markdown(elem_id="selected-detail")
        shown = gr.State({})
        timer = gr.Timer(self.settings.dashboard_refresh_s)
        inputs = [line, camera, label, window]
        outputs = [gallery, bars, rates, stats, counts_text, shown, line, camera]
        # trigger_mode="once": a tick while a refresh is still running is dropped, so requests never pile up
        timer.tick(self.refresh_live, inputs, outputs, trigger_mode="once", concurrency_limit=1,
                   show_progress="hidden")
        for control in inputs:
            control.change(self.refresh_live, inputs, outputs, trigger_mode="always_last", show_progress="hidden")
        gallery.select(self.select_frame, [shown], [original, overlay, probs, detail])

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
        run.click(self.explain_uploads, [files, method], [gallery, report], concurrency_limit=2)
        files.upload(self.explain_uploads, [files, method], [gallery, report], concurrency_limit=2)

    def _metrics_tab(self):
        gr.Markdown(self.scrape_help())
        table = gr.Markdown(elem_id="metrics-table")
        with gr.Row():
            counts = gr.BarPlot(x="class", y="frames", title=f"frames by verdict (latest {METRICS_RESULTS:,} results)",
                                sort=VERDICTS)
            latency = gr.LinePlot(x="frame", y="seconds", color="stage", title="latency of the last 300 frames")
        timer = gr.Timer(max(self.settings.dashboard_refresh_s * 2.5, 5))
        timer.tick(self.refresh_metrics, None, [table, counts, latency], trigger_mode="once", concurrency_limit=1,
                   show_progress="hidden")


def launch(settings: Settings, predictor: Predictor | None = None, block: bool = True,
           insecure_no_auth: bool = False):
    """Serve the dashboard; :func:`check_access` refuses an open one beyond loopback before anything loads."""
    from prometheus_client import start_http_server

    auth = check_access(settings, insecure_no_auth)
    predictor = predictor or Predictor.load(settings.checkpoint, device="cpu", backend=settings.backend)
    app = Dashboard(settings, LiveSource(settings), predictor).build()
    start_http_server(settings.dashboard_metrics_port, addr=settings.metrics_host)
    app.queue(default_concurrency_limit=4)
    limits = Middleware(uploads.UploadLimits, max_files=settings.max_upload_files,
                        max_total_bytes=settings.max_upload_total_bytes)
    app.launch(server_name=settings.dashboard_host, server_port=settings.dashboard_port, auth=auth,
               max_file_size=settings.max_upload_bytes, prevent_thread_lock=not block, show_error=True, css=CSS,
               footer_links=["api"], quiet=False, app_kwargs={"middleware": [limits]})
    return app
