#!/usr/bin/env bash
# Audit the installed Python dependencies for known vulnerabilities (pip-audit, PyPI advisory service).
# Fails when a vulnerability is found; reports, without failing, packages the service could not check
# (offline, or behind a mirror without PyPI's JSON API). The full report is artifacts/pip-audit.json.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
mkdir -p artifacts
"$BIN/pip-audit" --progress-spinner off --format json --output artifacts/pip-audit.json "$@" 2>artifacts/pip-audit.log
status=$?
"$BIN/python" - "$status" <<'PY'
import json, sys
from pathlib import Path

report = Path("artifacts/pip-audit.json")
if not report.exists():
    print(f"dependency audit: pip-audit could not run (exit {sys.argv[1]}); see artifacts/pip-audit.log")
    sys.exit(0)
deps = json.loads(report.read_text())["dependencies"]
skipped = [d for d in deps if d.get("skip_reason")]
vulnerable = [d for d in deps if d.get("vulns")]
checked = len(deps) - len(skipped)
print(f"dependency audit: {len(deps)} packages, {checked} checked, {len(skipped)} not checkable, "
      f"{len(vulnerable)} with known vulnerabilities")
if skipped and not checked:
    print(f"  the advisory service answered for no package, e.g. {skipped[0]['skip_reason']!r}")
for d in vulnerable:
    ids = ", ".join(v["id"] + (f" (fixed in {', '.join(v['fix_versions'])})" if v.get("fix_versions") else "")
                    for v in d["vulns"])
    print(f"  {d['name']} {d['version']}: {ids}")
sys.exit(1 if vulnerable else 0)
PY
