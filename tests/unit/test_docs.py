"""The docs stay true to the code: the settings table, links, and the tests and code the docs cite."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from steelsight import settings_doc
from steelsight.contract import Settings

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "MODEL_CARD.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_every_setting_has_a_description_and_none_is_left_over():
    undocumented = [name for name in Settings.model_fields if not settings_doc.description(name)]
    assert not undocumented, f"describe these in steelsight/settings_doc.py DESCRIPTIONS: {undocumented}"
    leftover = set(settings_doc.DESCRIPTIONS) - set(Settings.model_fields)
    assert not leftover, f"DESCRIPTIONS names settings that no longer exist: {sorted(leftover)}"


def test_readme_settings_table_is_current():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert settings_doc.replace_block(readme, settings_doc.render()) == readme, (
        "README.md's settings table is stale: python -m steelsight.settings_doc --write README.md")


def test_check_flags_a_stale_table_and_write_fixes_it(tmp_path, capsys):
    doc = tmp_path / "README.md"
    stale = settings_doc.render().replace("`STEELSIGHT_BATCH_SIZE` | `8`", "`STEELSIGHT_BATCH_SIZE` | `4`")
    doc.write_text(f"intro\n{settings_doc.START}\n{stale}\n{settings_doc.END}\nrest\n", encoding="utf-8")
    assert settings_doc.main(["--check", str(doc)]) == 1
    assert settings_doc.main(["--write", str(doc)]) == 0
    assert settings_doc.main(["--check", str(doc)]) == 0
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith("\nrest\n") and "`STEELSIGHT_BATCH_SIZE` | `8`" in text
    with pytest.raises(ValueError, match="markers"):
        settings_doc.replace_block("no markers here", "table")


def test_table_rows_name_the_variables_settings_really_reads(monkeypatch):
    rows = [line for line in settings_doc.render().splitlines() if line.startswith("| `")]
    assert len(rows) == len(Settings.model_fields)
    for name in ("queue_name", "cam_method", "s3_region"):
        monkeypatch.setenv(settings_doc.env_name(name), "from-env")
        assert getattr(Settings(_env_file=None), name) == "from-env"
    monkeypatch.setenv(settings_doc.env_name("batch_size"), "3")
    assert Settings(_env_file=None).batch_size == 3


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    missing = [target for target in LINK.findall(doc.read_text(encoding="utf-8"))
               if "://" not in target and not (doc.parent / target).exists()]
    assert not missing, f"{doc.name} links to missing files: {missing}"


CITED_TEST = re.compile(r"(tests/(?:(?:unit|model|integration)/)?test_\w+\.py)(?:::(test_\w+\*?))?")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_cited_tests_exist(doc):
    """Every ``tests/<tier>/test_x.py[::test_y]`` a doc cites names a file, and a function in it (``*``: a prefix)."""
    missing = []
    for path, func in CITED_TEST.findall(doc.read_text(encoding="utf-8")):
        source = REPO / path
        if not source.is_file():
            missing.append(path)
        elif func and not re.search(rf"def {func.rstrip('*')}" + ("" if func.endswith("*") else r"\b"),
                                    source.read_text(encoding="utf-8")):
            missing.append(f"{path}::{func}")
    assert not missing, f"{doc.name} cites tests that do not exist: {missing}"


CITED_CODE = re.compile(r"\(`((?:[\w-]+/)+[\w-]+\.py)`, `(?![\w-]+\.py`)(\w+)(?:\.(\w+))?`")  # not a second file


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_cited_functions_exist(doc):
    """A ``(`path.py`, `Name`)`` or ``(`path.py`, `Class.method`)`` citation names a file that defines it."""
    missing = []
    for path, name, method in CITED_CODE.findall(doc.read_text(encoding="utf-8")):
        source = REPO / path
        text = source.read_text(encoding="utf-8") if source.is_file() else ""
        if not all(re.search(rf"^\s*(?:def|class) {n}\b", text, re.M) for n in (name, method) if n):
            missing.append(f"{path}: {name}{'.' + method if method else ''}")
    assert not missing, f"{doc.name} cites code that does not exist: {missing}"
