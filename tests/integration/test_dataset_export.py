"""``steelsight dataset export`` from marks in a real SeaweedFS (steelsight/dataset.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from steelsight import feedback
from steelsight.dataset import ExportError, export

from ..helpers import SAMPLES
from .test_feedback import env, live_result  # noqa: F401 - the fixture, shared


def tree(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def marked(env):  # noqa: F811
    settings, store, conn = env
    marks = [(0, "crazing", False, "scratches"), (1, "patches", True, None), (2, "crazing", False, "clean"),
             (3, "crazing", False, "inclusion")]
    results = [live_result(settings, store, n, "line-1", label) for n, label, _, _ in marks]
    for result, (_, _, correct, true) in zip(results, marks, strict=True):
        feedback.record(store, conn, settings, result, correct=correct, true_class=true, operator="anna")
    feedback.undo(store, conn, settings, results[3].job_id)  # undone: never exported
    return settings, store, conn, results


def test_export_is_deterministic_and_leaves_out_undone_and_extra(marked, tmp_path):
    settings, store, _, results = marked
    base = tmp_path / "base"
    for name in ("crazing", "scratches"):
        (base / "images" / name).mkdir(parents=True)
        for src in sorted((SAMPLES / name).glob("*.bmp"))[:2]:
            (base / "images" / name / src.name).write_bytes(src.read_bytes())
    first = export(store, settings, tmp_path / "a", base=base, progress=False)
    second = export(store, settings, tmp_path / "b", base=base, progress=False)
    assert tree(tmp_path / "a") == tree(tmp_path / "b")  # byte-identical, manifest included
    assert first == second

    files = {row["path"]: row for row in first["files"]}
    assert f"scratches/feedback-{results[0].job_id}.bmp" in files
    assert f"patches/feedback-{results[1].job_id}.bmp" in files
    assert not any(results[3].job_id in p for p in files)  # undone
    assert not (tmp_path / "a" / "clean").exists()  # clean and other only when asked
    row = files[f"scratches/feedback-{results[0].job_id}.bmp"]
    assert row["provenance"]["verdict"] == "crazing" and row["provenance"]["operator"] == "anna"
    assert row["provenance"]["checkpoint_sha256"] == "ab" * 32 and row["source"] == "feedback"
    assert files["crazing/Cr_1.bmp"]["base_path"] == "images/crazing/Cr_1.bmp"
    assert first["counts"]["scratches"] == {"base": 2, "feedback": 1, "total": 3}
    import hashlib

    for path, row in files.items():
        assert hashlib.sha256((tmp_path / "a" / path).read_bytes()).hexdigest() == row["sha256"]

    # the layout training reads
    from steelsight.model.training.data import scan_folders

    assert len(scan_folders(tmp_path / "a")) == 6

    extra = export(store, settings, tmp_path / "c", include_extra=True, progress=False)
    assert extra["counts"]["clean"]["feedback"] == 1 and (tmp_path / "c" / "clean").is_dir()


def test_export_refuses_a_used_folder_and_force_replaces_only_an_export(marked, tmp_path):
    settings, store, conn, results = marked
    out = tmp_path / "set"
    export(store, settings, out, progress=False)
    with pytest.raises(ExportError, match="not empty"):
        export(store, settings, out, progress=False)
    feedback.undo(store, conn, settings, results[0].job_id)  # undo removes the frame from the next export
    export(store, settings, out, force=True, progress=False)
    assert not (out / "scratches").exists()
    assert [p.name for p in out.rglob("*.bmp")] == [f"feedback-{results[1].job_id}.bmp"]

    (out / "patches" / "mine.bmp").write_bytes(b"not from an export")
    with pytest.raises(ExportError, match="no earlier export wrote"):
        export(store, settings, out, force=True, progress=False)
    assert (out / "patches" / "mine.bmp").exists()

    # a changed copy is refused, and the earlier export stays as it was
    (out / "patches" / "mine.bmp").unlink()
    before = tree(out)
    mark = feedback.get(conn, settings, results[1].job_id)
    store.put(settings.library_bucket, mark.feedback_key, b"tampered", "image/bmp")
    with pytest.raises(ExportError, match="does not match the sha256"):
        export(store, settings, out, force=True, progress=False)
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no half-written folder left beside it


def test_cli_export(marked, tmp_path):
    settings, *_ = marked
    variables = dict(os.environ) | settings.to_env()

    def run(*args):
        return subprocess.run([sys.executable, "-m", "steelsight.cli", "dataset", "export", *args], env=variables,
                              capture_output=True, text=True, timeout=60)

    done = run("--out", str(tmp_path / "set"))
    assert done.returncode == 0, done.stderr
    assert "scratches" in done.stdout and (tmp_path / "set" / "manifest.json").is_file()
    again = run("--out", str(tmp_path / "set"))
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr
    assert json.loads((tmp_path / "set" / "manifest.json").read_text())["counts"]["patches"]["feedback"] == 1
