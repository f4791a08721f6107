"""``steelsight dataset export``: a one-folder-per-class training set from operator feedback.

The marks come from their provenance JSONs in the object store (the durable copy, not the Redis
index); undone marks are left out. ``DIR/<class>/<file>`` is the layout ``steelsight train`` reads
(``model/training/data.py``, ``scan_folders``). ``clean`` and ``other`` (no defect, a defect not in
the six) are written only when asked, as training knows six classes. ``DIR/manifest.json`` lists
every file with its sha256 and where it came from. The same inputs give byte-identical output: the
files and the manifest are sorted, and the manifest holds no export time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from steelsight.clients import ObjectStore
from steelsight.contract import EXPORT_MANIFEST, FEEDBACK_EXTRA_CLASSES, IMAGE_EXTENSIONS, Feedback, Settings
from steelsight.feedback import read_library
from steelsight.model.inference.checkpoint import file_sha256
from steelsight.model.inference.labels import CLASSES

MANIFEST_FORMAT = 1
FEEDBACK_FILE_PREFIX = "feedback-"  # keeps a feedback frame's name apart from any base image's


class ExportError(ValueError):
    """The export cannot go ahead as asked; nothing was written."""


@dataclass(frozen=True)
class Entry:
    path: str  # relative to DIR: <class>/<file>
    source: str  # "feedback" or "base"
    origin: Path | None = None  # a base image
    mark: Feedback | None = None  # a feedback frame


def export(store: ObjectStore, settings: Settings, out: Path, *, base: Path | None = None,
           include_extra: bool = False, force: bool = False, progress: bool | None = None) -> dict:
    """Write the training set to ``out``; returns the manifest. ``progress``: a bar on stderr (None: on a terminal).

    It is built in a hidden folder beside ``out`` and moved into place once complete, so a failed
    export (a copy whose sha256 no longer matches, the store gone) leaves ``out`` as it was.
    """
    out = Path(out)
    classes = (*CLASSES, *FEEDBACK_EXTRA_CLASSES) if include_extra else CLASSES
    stale = _previous_export(out, force)  # checked before anything is read or written
    entries = _base_entries(base, classes) if base is not None else []
    marks = [m for m in read_library(store, settings) if m.true_class in classes]
    for mark in marks:
        entries.append(Entry(f"{mark.true_class}/{FEEDBACK_FILE_PREFIX}{mark.job_id}."
                             f"{mark.feedback_key.rsplit('.', 1)[1]}", "feedback", mark=mark))
    entries.sort(key=lambda e: e.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the training set private to this user
    try:
        files = _write(store, settings, staging, entries, base, progress)
        manifest = {"format": MANIFEST_FORMAT, "classes": list(classes), "counts": _counts(files, classes),
                    "files": files}
        (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for path in stale:
            path.unlink()
        _remove_empty_dirs(out)
        if out.exists():
            out.rmdir()  # empty now: an earlier export's files were its only content
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write(store: ObjectStore, settings: Settings, folder: Path, entries: list[Entry], base: Path | None,
           progress: bool | None) -> list[dict]:
    from tqdm import tqdm

    files = []
    for entry in tqdm(entries, desc="export", unit="file", disable=_quiet(progress), file=sys.stderr):
        target = folder / entry.path
        if not target.resolve().is_relative_to(folder.resolve()):  # belt and braces beside Feedback's id checks
            raise ExportError(f"{entry.path!r} would be written outside {folder}")
        target.parent.mkdir(parents=True, exist_ok=True)
        row = {"path": entry.path, "class": entry.path.split("/", 1)[0], "source": entry.source}
        if entry.mark is not None:
            mark = entry.mark
            data = store.get(settings.library_bucket, mark.feedback_key)
            digest = hashlib.sha256(data).hexdigest()
            if digest != mark.content_sha256:
                raise ExportError(f"{settings.library_bucket}/{mark.feedback_key} does not match the sha256 its "
                                  f"provenance recorded ({digest[:12]}… against {mark.content_sha256[:12]}…): the "
                                  "copy was changed; nothing was exported")
            target.write_bytes(data)
            row |= {"sha256": digest, "bytes": len(data), "provenance": _provenance(mark)}
        else:
            shutil.copyfile(entry.origin, target)
            row |= {"sha256": file_sha256(target), "bytes": target.stat().st_size,
                    "base_path": entry.origin.relative_to(base).as_posix()}
        files.append(row)
    return files


def _quiet(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # tqdm: None disables it off a terminal


def _provenance(mark: Feedback) -> dict:
    return mark.model_dump(mode="json", exclude={"undone_at", "undone_by"})


def _counts(files: list[dict], classes) -> dict:
    counts = {c: {"base": 0, "feedback": 0, "total": 0} for c in classes}
    for row in files:
        counts[row["class"]][row["source"]] += 1
        counts[row["class"]]["total"] += 1
    return counts


def _base_entries(base: Path, classes) -> list[Entry]:
    """Every image of the base data's class folders (``BASE/<class>/`` or ``BASE/images/<class>/``, NEU's)."""
    base = Path(base)
    root = next((c for c in (base, base / "images") if any((c / name).is_dir() for name in CLASSES)), None)
    if root is None:
        raise ExportError(f"--base {base} has no class folders named like {', '.join(CLASSES)}")
    entries = []
    for name in classes:
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
                if path.name.startswith(FEEDBACK_FILE_PREFIX):
                    raise ExportError(f"{path}: base images may not be named {FEEDBACK_FILE_PREFIX}* (the export's "
                                      "names for feedback frames)")
                entries.append(Entry(f"{name}/{path.name}", "base", origin=path))
    return entries


def _previous_export(out: Path, force: bool) -> list[Path]:
    """The files of an earlier export in ``out`` that ``--force`` replaces; refuses anything else in it."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    present = sorted(p for p in out.rglob("*") if not p.is_dir())
    if not present:
        return []
    if not force:
        raise ExportError(f"--out {out} is not empty ({len(present)} files): choose another folder, or pass --force "
                          "to replace an earlier export in it")
    manifest = out / EXPORT_MANIFEST
    listed = {manifest}
    if manifest.is_file():
        try:
            listed |= {out / row["path"] for row in json.loads(manifest.read_text())["files"]}
        except (ValueError, KeyError, TypeError) as exc:
            raise ExportError(f"{manifest} is not an export's manifest ({exc}): --force replaces only an earlier "
                              "export") from exc
    strangers = [p for p in present if p not in listed]
    if strangers:
        raise ExportError(f"--out {out} holds {len(strangers)} files no earlier export wrote (e.g. "
                          f"{strangers[0].relative_to(out)}): training would read them too; remove them or choose "
                          "another folder")
    return present


def _remove_empty_dirs(out: Path) -> None:
    if out.is_dir():
        for folder in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(folder.iterdir()):
                folder.rmdir()


def summary(manifest: dict) -> str:
    """Counts per class, one line each, for the terminal."""
    rows = [f"{name:16} {c['total']:6} ({c['feedback']} feedback, {c['base']} base)"
            for name, c in manifest["counts"].items()]
    return "\n".join([*rows, f"{'total':16} {len(manifest['files']):6}"])
