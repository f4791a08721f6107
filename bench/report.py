"""Rewrite bench/README.md's tables from the newest result of each bench in bench/results/.

    python -m bench.report            # rewrite the tables in place
    python -m bench.report --check    # exit 1 if any table is not the newest result's

A table's place in the README is marked ``<!-- table: NAME key=value ... -->`` …
``<!-- /table -->``; what lies between is replaced by the newest
``bench/results/NAME-*.json`` whose figures match every ``key=value`` (e.g.
``workers=1``), with its date, commit and command, and a note when it was a quick run.
Results saved before benches stored their table are rendered by the bench's own
``render(record)``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from datetime import datetime
from pathlib import Path

from bench.harness import RESULTS

README = Path(__file__).resolve().parent / "README.md"
FIRST_TABLE = "first-table"  # a marker flag: show only a result's first table
MARKER = re.compile(r"(<!-- table: *(?P<spec>[^>]*?) *-->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)


def newest(name: str, filters: dict[str, str], folder: Path = RESULTS) -> dict | None:
    """The newest result of bench ``name`` whose top-level figures match ``filters`` (compared as text)."""
    found = []
    for path in folder.glob(f"{name}-*.json"):
        record = json.loads(path.read_text())
        if record.get("bench") == name and all(str(record.get(k)) == v for k, v in filters.items()):
            found.append((datetime.fromisoformat(record["date"]), record))
    return max(found, key=lambda item: item[0])[1] if found else None


def table(record: dict) -> list[str]:
    if "table" in record:
        return record["table"]
    return importlib.import_module(f"bench.{record['bench']}").render(record)


def section(record: dict | None, spec: str) -> str:
    if record is None:
        return (f"No result for `{spec}` in bench/results/ yet; the runs of releases 0.1.x are in "
                "bench/results/history-0.1.md.\n\n")
    commit = record.get("commit")
    source = f"commit `{commit[:10]}`{' with uncommitted changes' if record.get('dirty') else ''}" if commit \
        else "commit not recorded"
    quick = ", a `--quick` run (rough)" if record.get("quick") else ""
    body = table(record)
    first_row = next((i for i, line in enumerate(body) if line.startswith("|")), len(body))
    notes = [line.removeprefix("# ").strip() for line in body[:first_row] if line.strip()]
    lines = [f"`{record['command']}` ({record['date'][:10]}, {source}{quick})", "", *(["; ".join(notes), ""]
                                                                                    if notes else [])]
    return "\n".join(lines + body[first_row:]) + "\n\n"


def rewrite(text: str) -> str:
    def replace(match: re.Match) -> str:
        name, *pairs = match["spec"].split()
        filters = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        text = section(newest(name, filters), match["spec"])
        if FIRST_TABLE in pairs:  # the headline table only; the rest stays in the result file
            lines = text.splitlines()
            start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
            end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
            text = "\n".join(lines[:end]) + "\n\n"
        return match.group(1) + text + match.group(4)

    return MARKER.sub(replace, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    args = parser.parse_args()
    text = README.read_text()
    updated = rewrite(text)
    if args.check:
        sys.exit(0 if updated == text else 1)
    README.write_text(updated)


if __name__ == "__main__":
    main()
