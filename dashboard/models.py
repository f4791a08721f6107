"""The Models tab: what each worker serves, refusals, the shadow challenger's agreement, the audit log.

Everything comes from :meth:`steelsight.registry.ModelRegistry.status`, the same data
``steelsight model status`` prints; a disagreeing frame opens with both verdicts.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime

import gradio as gr
import pandas as pd

from steelsight.contract import FrameResult, Settings
from steelsight.registry import ModelRegistry

from .data import LiveSource

STALE_S = 30.0  # a worker that has not reported for this long is shown as gone


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "—"


class ModelsView:
    def __init__(self, settings: Settings, source: LiveSource | None):
        self.settings, self.source = settings, source

    @property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.settings, self.source.store, self.source.connection)

    def refresh(self):
        data = self.registry.status()
        now = datetime.now(UTC)
        rows = []
        for w in data["workers"]:
            age = (now - datetime.fromisoformat(w["at"])).total_seconds()
            refused = (f"<span class='model-refused'>refused {_short(w['refused_sha256'])}: "
                       f"{html.escape(w['refused_reason'] or '')}</span>" if w.get("refused_sha256") else "")
            state = "gone" if age > STALE_S else "serving"
            rows.append(f"<tr><td>{html.escape(w['worker'])}</td><td><code>{_short(w['sha256'])}</code></td>"
                        f"<td>{state} · {age:.0f} s ago</td><td><code>{_short(w.get('shadow_sha256'))}</code></td>"
                        f"<td>{refused}</td></tr>")
        live = data["live"]
        summary = (f"<p><b>live model</b> <code>{_short(live)}</code>"
                   + ("" if live else " (none promoted: workers serve their configured checkpoint)")
                   + (f" · <b>before it</b> {', '.join(f'<code>{_short(h)}</code>' for h in data['history'][:3])}"
                      if data["history"] else "") + "</p>"
                   + "<table id='model-workers'><tr><th>worker</th><th>serving</th><th>reported</th><th>shadow</th>"
                   + "<th>refusal</th></tr>" + "".join(rows) + "</table>")
        shadow = data["shadow"]
        agreement = pd.DataFrame(columns=["verdict", "agreement", "frames"])
        disagreements = pd.DataFrame(columns=["job_id", "line", "champion", "challenger"])
        if shadow:
            stats = shadow["agreement"]
            frames = sum(v["frames"] for v in stats.values())
            agree = sum(v["agree"] for v in stats.values())
            summary += (f"<p id='shadow-summary'><b>shadow</b> <code>{_short(shadow['sha256'])}</code> on "
                        f"{shadow['share']:.0%} of frames: agrees with the live model on "
                        f"{agree}/{frames} frames" + (f" ({agree / frames:.1%})" if frames else "") + "</p>")
            agreement = pd.DataFrame([{"verdict": k, "agreement": v["agree"] / v["frames"] if v["frames"] else 0.0,
                                       "frames": v["frames"]} for k, v in sorted(stats.items())],
                                     columns=["verdict", "agreement", "frames"])
            disagreements = pd.DataFrame(shadow["disagreements"], columns=["job_id", "line", "champion",
                                                                           "challenger"])
        else:
            summary += "<p><b>shadow</b> none (<code>steelsight model shadow SHA --share 0.1</code>)</p>"
        audit = pd.DataFrame([{"when": e["at"][:19].replace("T", " "), "who": e["by"], "action": e["action"],
                               "model": _short(e.get("sha256")), "before": _short(e.get("previous"))}
                              for e in data["audit"][:20]], columns=["when", "who", "action", "model", "before"])
        return summary, agreement, disagreements, audit

    def open_disagreement(self, table: pd.DataFrame, evt: gr.SelectData):
        """The selected disagreeing frame, with the two verdicts."""
        row = evt.index[0] if evt is not None and evt.index is not None else None
        if row is None or row >= len(table):
            return None, "select a frame"
        job_id = str(table.iloc[row]["job_id"])
        raw = self.source.connection.get(self.settings.result_key(job_id))
        if raw is None:
            return None, f"`{job_id}`: its result has expired"
        result = FrameResult.model_validate_json(raw)
        champion, challenger = table.iloc[row]["champion"], table.iloc[row]["challenger"]
        return (self.source.original(result),
                f"`{job_id}` — live model: **{champion}**, challenger: **{challenger}** "
                f"(line {result.line_id}, camera {result.camera_id})")

    def tab(self) -> None:
        summary = gr.HTML(elem_id="models-summary")
        with gr.Row():
            agreement = gr.BarPlot(x="verdict", y="agreement", title="shadow agreement by live verdict",
                                   y_lim=[0, 1], elem_id="shadow-agreement")
            audit = gr.Dataframe(label="audit log (newest first)", interactive=False, elem_id="model-audit")
        disagreements = gr.Dataframe(label="frames the challenger read differently (select one)",
                                     interactive=False, elem_id="shadow-disagreements")
        with gr.Row():
            image = gr.Image(label="disagreeing frame", interactive=False)
            detail = gr.Markdown()
        timer = gr.Timer(max(self.settings.dashboard_refresh_s, 2.0))
        outputs = [summary, agreement, disagreements, audit]
        timer.tick(self.refresh, None, outputs, trigger_mode="once", concurrency_limit=1, show_progress="hidden")
        disagreements.select(self.open_disagreement, [disagreements], [image, detail], show_progress="hidden")
