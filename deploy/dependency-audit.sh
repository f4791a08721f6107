#!/usr/bin/env bash
# Audit the installed Python dependencies for known vulnerabilities (pip-audit, PyPI advisory service).
# Fails when a vulnerability is found. An audit that checked nothing (pip-audit could not run, or the
# advisory service answered for no package) fails when AUDIT_REQUIRED=1 (for CI that reaches the advisory
# service) and is reported as SKIPPED with its reason otherwise; the test suite then shows that reason among
# its skips (tests/test_supply_chain.py). The full report is $AUDIT_DIR/pip-audit.json (default artifacts/).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
OUT="${AUDIT_DIR:-artifacts}"
mkdir -p "$OUT"
rm -f "$OUT/pip-audit.json" "$OUT/pip-audit-skipped.txt"  # an earlier run's must not stand in for this one
"$BIN/pip-audit" --progress-spinner off --format json --output "$OUT/pip-audit.json" "$@" 2>"$OUT/pip-audit.log"
status=$?
"$BIN/python" - "$status" "$OUT" "${AUDIT_REQUIRED:-}" <<'PY'
import json, sys
from pathlib import Path

status, out, required = sys.argv[1], Path(sys.argv[2]), sys.argv[3].lower() in ("1", "true", "yes")


def checked_nothing(reason: str) -> None:
    (out / "pip-audit-skipped.txt").write_text(reason + "\n")
    if required:
        print(f"dependency audit FAILED: it checked nothing ({reason}); AUDIT_REQUIRED=1 needs a real audit")
        sys.exit(1)
    print(f"dependency audit SKIPPED: it checked nothing ({reason}); set AUDIT_REQUIRED=1 to make this an error")
    sys.exit(0)


report = out / "pip-audit.json"
if not report.exists():
    log = (out / "pip-audit.log").read_text(errors="replace").strip().splitlines()
    checked_nothing(f"pip-audit could not run, exit {status}: {log[-1] if log else 'no output'}")
try:
    deps = json.loads(report.read_text())["dependencies"]
except (ValueError, KeyError) as exc:
    checked_nothing(f"unreadable report {report}: {exc}")
skipped = [d for d in deps if d.get("skip_reason")]
vulnerable = [d for d in deps if d.get("vulns")]
checked = len(deps) - len(skipped)
print(f"dependency audit: {len(deps)} packages, {checked} checked, {len(skipped)} not checkable, "
      f"{len(vulnerable)} with known vulnerabilities")
for d in vulnerable:
    ids = ", ".join(v["id"] + (f" (fixed in {', '.join(v['fix_versions'])})" if v.get("fix_versions") else "")
                    for v in d["vulns"])
    print(f"  {d['name']} {d['version']}: {ids}")
if vulnerable:
    sys.exit(1)
if not checked:
    checked_nothing(f"the advisory service answered for no package, e.g. {skipped[0]['skip_reason']!r}"
                    if skipped else "no packages found")
PY
