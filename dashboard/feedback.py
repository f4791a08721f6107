"""Operator feedback on the dashboard: marks on live frames and uploads, and the Review tab.

The storage lives in :mod:`steelsight.feedback`; this module holds the controls and their
handlers. The operator's name is the login's (``gr.Request.username``), ``anonymous`` without one.
"""

from __future__ import annotations

import html
import threading
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import pandas as pd

from steelsight import feedback
from steelsight.contract import FEEDBACK_NOTE_MAX, FrameResult, ReviewItem, Settings, feedback_classes

from . import metrics
from .data import ALL, LiveSource

RIGHT, WRONG = "right", "wrong"
SOURCES = ("live", "upload", "review")
LIST_LIMIT = 500  # marks the Review tab lists at most (newest first); the rates cover every mark
QUEUE_LIMIT = 200
REVIEW_REFRESH_S = 10.0
UPLOAD_VERDICTS_KEPT = 256  # uploads whose verdict can still be marked (the most recent)
QUEUE_COLUMNS = ["queued (UTC)", "line", "camera", "frame", "verdict", "confidence", "reason", "model", "job"]
MARK_COLUMNS = ["marked (UTC)", "line", "camera", "frame", "verdict", "true class", "verdict was", "operator",
                "source", "note", "model", "job"]
RATE_COLUMNS = ["reviewed", "wrong", "correction rate"]


def short_sha(sha: str) -> str:
    return sha[:12] if sha else "unknown"


def operator(request: gr.Request | None) -> str:
    return feedback.operator_name(getattr(request, "username", None) if request is not None else None)


class FeedbackControls:
    """Right/wrong, true class, note, submit and undo, with a status line; ``prefix`` names their element ids."""

    def __init__(self, prefix: str):
        with gr.Row(elem_id=f"{prefix}-fb"):
            self.correct = gr.Radio([RIGHT, WRONG], label="the verdict is", elem_id=f"{prefix}-fb-correct")
            self.true_class = gr.Dropdown(list(feedback_classes()), value=None, label="true class",
                                          info="clean: no defect · other: a defect not in the six",
                                          elem_id=f"{prefix}-fb-class")
            self.note = gr.Textbox(label="note", max_length=FEEDBACK_NOTE_MAX, max_lines=3,
                                   elem_id=f"{prefix}-fb-note")
            with gr.Column(min_width=120):
                self.submit = gr.Button("Submit", variant="primary", elem_id=f"{prefix}-fb-submit")
                self.undo = gr.Button("Undo", elem_id=f"{prefix}-fb-undo")
        self.status = gr.Markdown(elem_id=f"{prefix}-fb-status")

    @property
    def inputs(self):
        return [self.correct, self.true_class, self.note]


def mark_text(mark) -> str:
    if mark is None:
        return "not marked yet"
    said = "right" if mark.correct else f"wrong: it is **{mark.true_class}**"
    note = f" — “{html.escape(mark.note)}”" if mark.note else ""
    return (f"marked {said} by {html.escape(mark.operator)} at {mark.created_at:%Y-%m-%d %H:%M:%S} UTC"
            f" ({mark.source}){note}")


class FeedbackViews:
    def __init__(self, settings: Settings, source: LiveSource, checkpoint_sha256: str = ""):
        self.settings = settings
        self.source = source
        self.checkpoint_sha256 = checkpoint_sha256
        self._uploads: OrderedDict[str, str] = OrderedDict()  # upload path -> its verdict (FrameResult JSON)
        self._lock = threading.Lock()

    @property
    def store(self):
        return self.source.store

    @property
    def connection(self):
        return self.source.connection

    # marking ------------------------------------------------------------------------------------------------
    def _record(self, result: FrameResult, correct: str | None, true_class: str | None, note: str,
                request: gr.Request | None, **kwargs) -> str:
        if correct not in (RIGHT, WRONG):
            return "<span class='upload-error'>choose right or wrong first</span>"
        try:
            with metrics.FEEDBACK_SECONDS.time():
                mark = feedback.record(self.store, self.connection, self.settings, result, correct=correct == RIGHT,
                                       true_class=true_class or None, note=note or "", operator=operator(request),
                                       **kwargs)
        except feedback.FeedbackError as exc:
            metrics.FEEDBACK.labels(outcome="refused").inc()
            return f"<span class='upload-error'>not recorded: {html.escape(str(exc))}</span>"
        metrics.FEEDBACK.labels(outcome="right" if mark.correct else "wrong").inc()
        return "recorded — " + mark_text(mark)

    def _undo(self, job_id: str | None, request: gr.Request | None) -> str:
        if not job_id:
            return "select a frame first"
        try:
            mark = feedback.undo(self.store, self.connection, self.settings, job_id, operator(request))
        except feedback.FeedbackError as exc:
            return f"<span class='upload-error'>{html.escape(str(exc))}</span>"
        metrics.FEEDBACK.labels(outcome="undone").inc()
        return f"undone — the mark by {html.escape(mark.operator)} is withdrawn (kept for audit)"

    def live_mark(self, selected: str):
        """The selected frame's existing mark, shown when it is selected; the controls start from it."""
        if not selected:
            return "", gr.update(value=None), gr.update(value=None), gr.update(value="")
        mark = feedback.get(self.connection, self.settings, FrameResult.model_validate_json(selected).job_id)
        if mark is None:
            return mark_text(None), gr.update(value=None), gr.update(value=None), gr.update(value="")
        return (mark_text(mark), gr.update(value=RIGHT if mark.correct else WRONG),
                gr.update(value=mark.true_class), gr.update(value=mark.note))

    def submit_live(self, selected: str, correct, true_class, note, request: gr.Request):
        if not selected:
            return "select a frame in the gallery first"
        return self._record(FrameResult.model_validate_json(selected), correct, true_class, note, request)

    def undo_live(self, selected: str, request: gr.Request):
        return self._undo(FrameResult.model_validate_json(selected).job_id if selected else None, request)

    # uploads --------------------------------------------------------------------------------------------------
    def remember_upload(self, path: str, result: FrameResult) -> None:
        with self._lock:
            self._uploads[path] = result.model_dump_json()
            self._uploads.move_to_end(path)
            while len(self._uploads) > UPLOAD_VERDICTS_KEPT:
                self._uploads.popitem(last=False)

    def upload_choices(self, files):
        """The uploads that got a verdict, to pick the one to mark (a refused or rejected file has none)."""
        with self._lock:
            known = {Path(p).name: p for p in (files or []) if p in self._uploads}
        names = sorted(known)
        return (gr.update(choices=names, value=names[0] if names else None), known,
                f"model `{short_sha(self.checkpoint_sha256)}`")

    def _upload(self, name: str | None, known: dict[str, str]) -> tuple[str, FrameResult] | None:
        path = (known or {}).get(name or "")
        with self._lock:
            verdict = self._uploads.get(path or "")
        return (path, FrameResult.model_validate_json(verdict)) if verdict else None

    def submit_upload(self, name, known, correct, true_class, note, request: gr.Request):
        found = self._upload(name, known)
        if found is None:
            return "choose an uploaded file that got a verdict"
        path, result = found
        try:
            data = Path(path).read_bytes()
        except OSError:
            return "<span class='upload-error'>the upload has left the dashboard's cache: upload it again</span>"
        return self._record(result, correct, true_class, note, request, source="upload", frame_bytes=data,
                            file_name=name)

    def undo_upload(self, name, known, request: gr.Request):
        found = self._upload(name, known)
        return self._undo(found[1].job_id if found else None, request)

    # review tab -----------------------------------------------------------------------------------------------
    def refresh_review(self, line: str, true_class: str, source: str, marked: str):
        items = feedback.list_review(self.connection, self.settings, limit=QUEUE_LIMIT)
        queue = pd.DataFrame([[f"{i.queued_at:%Y-%m-%d %H:%M:%S}", i.result.line_id, i.result.camera_id,
                               i.result.frame_id, i.result.verdict, _pct(i.result.confidence), i.reason,
                               short_sha(i.result.checkpoint_sha256), i.result.job_id] for i in items],
                             columns=QUEUE_COLUMNS)
        marks = feedback.list_feedback(self.connection, self.settings)
        shown = [m for m in marks
                 if (line == ALL or m.line_id == line) and (true_class == ALL or m.true_class == true_class)
                 and (source == ALL or m.source == source)
                 and (marked == ALL or m.correct == (marked == RIGHT))][:LIST_LIMIT]
        table = pd.DataFrame([[f"{m.created_at:%Y-%m-%d %H:%M:%S}", m.line_id, m.camera_id, m.frame_id, m.verdict,
                               m.true_class, RIGHT if m.correct else WRONG, m.operator, m.source, m.note,
                               short_sha(m.checkpoint_sha256), m.job_id] for m in shown], columns=MARK_COLUMNS)
        rates = feedback.correction_rates(marks)
        lines = sorted({m.line_id for m in marks})
        summary = (f"**waiting for a label** {len(items)}{'+' if len(items) >= QUEUE_LIMIT else ''} · "
                   f"**marks** {len(marks)} · **shown** {len(shown)}")
        return (queue, table, _rates(rates["line"], "line"), _rates(rates["class"], "verdict"), summary,
                gr.update(choices=[ALL, *lines]))

    def select_queued(self, evt: gr.SelectData):
        """Load the clicked queue row's frame into the labelling panel."""
        job_id = (evt.row_value or [None])[-1] if evt is not None else None
        raw = self.connection.get(self.settings.review_item_key(job_id)) if job_id else None
        if not raw or raw in (feedback.LABELLED.encode(), feedback.DISMISSED.encode()):
            return "", None, None, "that frame is no longer waiting; refresh"
        item = ReviewItem.model_validate_json(raw)
        r = item.result
        shown = self.source.overlay(r) if r.overlay_key else None
        detail = (f"**{html.escape(r.verdict)}** {_pct(r.confidence)} · {r.line_id}/{r.camera_id}/{r.frame_id} · "
                  f"captured {r.captured_at:%Y-%m-%d %H:%M:%S} UTC · queued as **{item.reason}** · "
                  f"model `{short_sha(r.checkpoint_sha256)}`")
        return item.model_dump_json(), self.source.original(r), shown, detail

    def submit_review(self, item_json: str, correct, true_class, note, request: gr.Request):
        if not item_json:
            return "click a frame in the queue first"
        item = ReviewItem.model_validate_json(item_json)
        return self._record(item.result, correct, true_class, note, request, source="review",
                            review_reason=item.reason)

    def undo_review(self, item_json: str, request: gr.Request):
        return self._undo(ReviewItem.model_validate_json(item_json).result.job_id if item_json else None, request)

    def dismiss(self, item_json: str):
        if not item_json:
            return "click a frame in the queue first"
        job_id = ReviewItem.model_validate_json(item_json).result.job_id
        done = feedback.dismiss_review(self.connection, self.settings, job_id)
        return "dismissed: it will not be queued again" if done else "it was no longer waiting"

    def select_mark(self, evt: gr.SelectData):
        job_id = (evt.row_value or [None])[-1] if evt is not None else None
        return job_id or "", f"selected `{job_id}`" if job_id else ""

    def undo_mark(self, job_id: str, request: gr.Request):
        return self._undo(job_id, request)

    # layout -----------------------------------------------------------------------------------------------------
    def review_tab(self):
        gr.Markdown("Frames the workers sent for a label (unknown, low-margin and a random sample, at most "
                    f"{self.settings.review_max_per_line_hour} per line and hour), and every operator mark. "
                    "`steelsight dataset export` turns the marks into a training set.")
        summary = gr.Markdown(elem_id="review-summary")
        refresh = gr.Button("Refresh", size="sm", elem_id="review-refresh")
        gr.Markdown("### Waiting for a label — click a row to label it")
        queue = gr.Dataframe(headers=QUEUE_COLUMNS, interactive=False, elem_id="review-queue", max_height=320)
        item = gr.State("")
        with gr.Row():
            original = gr.Image(label="frame", interactive=False, height=260)
            overlay = gr.Image(label="Grad-CAM", interactive=False, height=260)
            detail = gr.Markdown(elem_id="review-detail")
        controls = FeedbackControls("review")
        dismiss = gr.Button("Dismiss unlabelled", size="sm", elem_id="review-dismiss")
        gr.Markdown("### Marks")
        with gr.Row():
            line = gr.Dropdown([ALL], value=ALL, label="line", elem_id="marks-line")
            true_class = gr.Dropdown([ALL, *feedback_classes()], value=ALL, label="true class",
                                     elem_id="marks-class")
            source = gr.Dropdown([ALL, *SOURCES], value=ALL, label="source", elem_id="marks-source")
            marked = gr.Dropdown([ALL, RIGHT, WRONG], value=ALL, label="verdict was", elem_id="marks-correct")
        marks = gr.Dataframe(headers=MARK_COLUMNS, interactive=False, elem_id="review-marks", max_height=400)
        chosen = gr.State("")
        with gr.Row():
            chosen_text = gr.Markdown(elem_id="marks-selected")
            undo = gr.Button("Undo selected mark", size="sm", elem_id="marks-undo")
        undo_status = gr.Markdown(elem_id="marks-undo-status")
        gr.Markdown("### Correction rate: share of the marked frames whose verdict was wrong")
        with gr.Row():
            by_line = gr.Dataframe(headers=["line", *RATE_COLUMNS], interactive=False, elem_id="rates-line")
            by_class = gr.Dataframe(headers=["verdict", *RATE_COLUMNS], interactive=False, elem_id="rates-class")

        filters = [line, true_class, source, marked]
        outputs = [queue, marks, by_line, by_class, summary, line]
        refresh.click(self.refresh_review, filters, outputs, show_progress="hidden")
        for control in filters:
            control.change(self.refresh_review, filters, outputs, show_progress="hidden")
        timer = gr.Timer(REVIEW_REFRESH_S)
        timer.tick(self.refresh_review, filters, outputs, trigger_mode="once", concurrency_limit=1,
                   show_progress="hidden")
        queue.select(self.select_queued, None, [item, original, overlay, detail])
        controls.submit.click(self.submit_review, [item, *controls.inputs], controls.status).then(
            self.refresh_review, filters, outputs, show_progress="hidden")
        controls.undo.click(self.undo_review, [item], controls.status).then(
            self.refresh_review, filters, outputs, show_progress="hidden")
        dismiss.click(self.dismiss, [item], controls.status).then(
            self.refresh_review, filters, outputs, show_progress="hidden")
        marks.select(self.select_mark, None, [chosen, chosen_text])
        undo.click(self.undo_mark, [chosen], undo_status).then(
            self.refresh_review, filters, outputs, show_progress="hidden")
        return filters, outputs


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _rates(rows, name: str) -> pd.DataFrame:
    return pd.DataFrame([[r.key, r.reviewed, r.wrong, f"{r.rate:.1%}"] for r in rows],
                        columns=[name, *RATE_COLUMNS])
