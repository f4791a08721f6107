#!/usr/bin/env bash
# The one command the lent GPU machine runs: bench.gpu_sweep, with what .gpukit/ (bench/gpu_kit.sh) carries
# there, since that machine has no network. Through the device tool, from the repository root:
#
#   run(command="bash bench/gpu_run.sh -- --device cuda", carry=[".gpukit"], timeout_s=600)
#   run(command="bash bench/gpu_run.sh -- --device cuda --workers 4 8", carry=[".gpukit"], timeout_s=600)
#
# Arguments after -- go to bench.gpu_sweep (default: --device cuda). In order, it
#  1. checks the kit against its SHA256SUMS and unpacks it under $GPU_RUN_WORK: the Python packages into
#     site/; with the full tier weed, redis-server (behind a wrapper that adds the libraries it brought)
#     and py-spy into bin/, which goes first on PATH;
#  2. maps steelsight's packages onto the working tree's folders (pyproject's package-dir: steelsight.model
#     is model/, ...) as an editable install does, through a sitecustomize.py on PYTHONPATH, so that every
#     process the sweep starts (benches, workers, producer) imports the code that travelled;
#  3. prints the versions (nvidia-smi, python, torch and its CUDA, weed, redis-server, py-spy) and imports
#     what the sweep needs, and stops at once when something is missing;
#  4. runs the parity tests of the device path and the half-precision trunks on CUDA (parity-tests.txt), then
#     python -m bench.gpu_sweep with PYTHONUNBUFFERED=1 under a hard time limit, its results mirrored into $OUT
#     after every step;
#  5. leaves in $OUT: the sweep's results JSON, bench-results.tar.gz (every result file the run wrote; unpack
#     it into bench/results/ here), logs.tar.gz (each step's output), env.txt and run.log (all of the
#     above), parity-tests.txt: 6 files, within what the tool brings back (8 files of 16 MiB at most).
#
# Time: it stops itself within GPU_RUN_LIMIT_S (560 s; the tool allows 600). The sweep gets what is left after
# the set-up less 20 s for step 5, and unless --budget-s is given it gets a budget 30 s under that (at most
# gpu_sweep's own 480 s), so it finishes and writes its summary by itself; at the limit a SIGTERM makes it
# write the summary, and a SIGKILL follows 15 s later.
#
# The kit's model tier (all that fits beside the working tree at present) runs the model-only steps; the
# pipeline steps then fail at once, for want of Redis and SeaweedFS: run.log and the results say so.
#
# Without a GPU, to try the whole path here (GPU_RUN_DRY=1): no CUDA needed, the sweep's default arguments
# become --quick (on the CPU, tiny), and $OUT defaults to a new folder under /tmp.
#   GPU_RUN_DRY=1 bash bench/gpu_run.sh -- --quick --workers 1
#   GPU_RUN_DRY=1 GPU_RUN_PYTHON=/path/to/python3.12 bash bench/gpu_run.sh -- --quick --workers 1
# The kit's Python packages are built for CPython 3.12; under another version they are left out (it says
# so) and the interpreter's own packages serve instead.
#
# Environment: GPU_RUN_PYTHON (python3), GPU_RUN_KIT (.gpukit), GPU_RUN_WORK (/tmp/gpukit-run),
# GPU_RUN_LIMIT_S (560), GPU_RUN_DRY (0), GPU_RUN_SETUP_ONLY (0; 1: steps 1-3 only), OUT (set by the tool).
set -uo pipefail

START=$SECONDS
PYTHONPATH_BEFORE="${PYTHONPATH:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
COPY_RESERVE_S=20    # step 5, after the sweep
BUDGET_MARGIN_S=30   # between the sweep's own budget and the hard limit: its clean-up and summary
PARITY_LIMIT_S=120   # the CUDA parity tests before the sweep (step 3b)
MAX_BUDGET_S=480     # gpu_sweep's default --budget-s

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "gpu_run: $*" >&2; exit 2; }

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --) shift ;;
  "") ;;
  *) die "bench.gpu_sweep's arguments go after --: bash bench/gpu_run.sh -- $* (see --help)" ;;
esac
SWEEP_ARGS=("$@")

DRY="${GPU_RUN_DRY:-0}"
SETUP_ONLY="${GPU_RUN_SETUP_ONLY:-0}"
LIMIT_S="${GPU_RUN_LIMIT_S:-560}"
KIT="${GPU_RUN_KIT:-$ROOT/.gpukit}"
WORK="${GPU_RUN_WORK:-/tmp/gpukit-run}"
[[ "$LIMIT_S" =~ ^[0-9]+$ ]] || die "GPU_RUN_LIMIT_S must be whole seconds, not '$LIMIT_S'"
PYBIN="$(command -v "${GPU_RUN_PYTHON:-python3}")" || die "no Python '${GPU_RUN_PYTHON:-python3}' on PATH"
case "$WORK" in
  /tmp/?*|/var/tmp/?*) ;;
  *) die "GPU_RUN_WORK must be a folder under /tmp (it is emptied first)" ;;
esac

if [ -z "${OUT:-}" ]; then
  [ "$DRY" = 1 ] || die "OUT is not set: the device tool sets it on the GPU machine; here use GPU_RUN_DRY=1" \
    "(or set OUT)"
  OUT="$(mktemp -d /tmp/gpu-run-out.XXXXXX)"
fi
mkdir -p "$OUT" || die "cannot create OUT=$OUT"
# everything printed also lands in run.log, which comes back even when the output is cut short
exec 3>&1 4>&2
exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!
COLLECT=0
on_exit() {
  local rc=$?
  [ "$COLLECT" = 1 ] && collect
  exec 1>&3 2>&4  # run.log is complete once tee has seen the end
  wait "$TEE_PID" 2>/dev/null
  exit $rc
}
trap on_exit EXIT
echo "gpu_run: $(date -u +%FT%TZ), output in $OUT, limit ${LIMIT_S} s"

# -- 1. the kit ------------------------------------------------------------------------------------------
[ -f "$KIT/manifest.json" ] || die "no kit at $KIT: build it with 'bash bench/gpu_kit.sh' on the development \
machine and carry it: run(command=\"bash bench/gpu_run.sh -- ...\", carry=[\".gpukit\"])"
(cd "$KIT" && sha256sum --check --quiet SHA256SUMS) || die "the kit's files do not match its SHA256SUMS: rebuild it"
TIER="$("$PYBIN" -c 'import json, sys; print(json.load(open(sys.argv[1]))["tier"])' "$KIT/manifest.json")" \
  || die "cannot read $KIT/manifest.json"
PYVER="$("$PYBIN" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
echo "gpu_run: kit tier $TIER; python $PYVER at $PYBIN"

rm -rf "$WORK" && mkdir -p "$WORK/site" "$WORK/bin" "$WORK/py" "$WORK/logs" || die "cannot prepare $WORK"
untar() {  # untar ARCHIVE.tar.xz DIR, with Python's lzma where xz is missing
  if command -v xz >/dev/null; then
    tar -xJf "$1" -C "$2"
  else
    "$PYBIN" - "$1" "$2" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    archive.extractall(sys.argv[2], **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))
EOF
  fi
}
unxz_to() {  # unxz_to FILE.xz OUTPUT
  if command -v xz >/dev/null; then
    xz -dc "$1" > "$2"
  else
    "$PYBIN" -c 'import lzma, shutil, sys
shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"), 1 << 20)' "$1" "$2"
  fi
}
USE_SITE=0
if [ "$PYVER" = 3.12 ]; then
  untar "$KIT/site.tar.xz" "$WORK/site" || die "cannot unpack $KIT/site.tar.xz"
  USE_SITE=1
else
  echo "gpu_run: WARNING: the kit's Python packages are for CPython 3.12 and this is $PYVER: left out;" \
       "$PYBIN's own packages serve instead"
fi
if [ "$TIER" = full ]; then
  untar "$KIT/bin.tar.xz" "$WORK/bin" || die "cannot unpack $KIT/bin.tar.xz"
  unxz_to "$KIT/weed.xz" "$WORK/bin/weed" && chmod 755 "$WORK/bin/weed" || die "cannot unpack $KIT/weed.xz"
  # the libraries it brought, for redis-server alone: the interpreter and torch keep the image's own
  cat > "$WORK/bin/redis-server" <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$WORK/bin/redis/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$WORK/bin/redis/redis-server" "\$@"
EOF
  chmod 755 "$WORK/bin/redis-server"
fi

# -- 2. steelsight's packages on the import path ------------------------------------------------------------
"$PYBIN" - "$ROOT" "$WORK/py/sitecustomize.py" <<'EOF' || die "cannot map steelsight's packages (see above)"
import sys, tomllib
from pathlib import Path
root, out = Path(sys.argv[1]), Path(sys.argv[2])
dirs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
mapping = {name: str(root / folder) for name, folder in dirs.items()}
out.write_text(f'''"""Written by bench/gpu_run.sh: steelsight's packages mapped onto the working tree as pip's
editable install maps them (pyproject's package-dir), for every Python process of the run."""
import importlib.util
import os
import sys

MAPPING = {mapping!r}


class SteelsightFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        folder = MAPPING.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


sys.meta_path.append(SteelsightFinder)  # after the path finders, as setuptools' editable finder is

# the interpreter's own sitecustomize, if it has one, still runs
here = os.path.dirname(os.path.abspath(__file__))
for entry in sys.path:
    candidate = os.path.join(entry or os.getcwd(), "sitecustomize.py")
    if os.path.dirname(os.path.abspath(candidate)) != here and os.path.isfile(candidate):
        spec = importlib.util.spec_from_file_location("_sitecustomize_beneath", candidate)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        break
''')
EOF
PYTHONPATH="$WORK/py"
[ "$USE_SITE" = 1 ] && PYTHONPATH+=":$WORK/site"
PYTHONPATH+=":$ROOT${PYTHONPATH_BEFORE:+:$PYTHONPATH_BEFORE}"
export PYTHONPATH PATH="$WORK/bin:$PATH" PYTHONUNBUFFERED=1

# -- 3. versions and imports --------------------------------------------------------------------------------
{
  echo "== machine: $(uname -srm), $(nproc) cores"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  else
    echo "no nvidia-smi"
  fi
  "$PYBIN" - "$TIER" "$WORK" <<'EOF'
import importlib, importlib.metadata, os, platform, sys, time
tier, work = sys.argv[1], sys.argv[2]
print(f"== python {platform.python_version()} at {sys.executable}")
began = time.monotonic()
import torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {cuda}"
      + (f", {torch.cuda.get_device_name()}" if cuda else "") + f" (import {time.monotonic() - began:.1f} s)")
for dist in ("torchvision", "numpy", "opencv-python-headless", "scipy", "matplotlib", "scikit-learn", "pillow",
             "onnxruntime", "prometheus-client", "safetensors", "psutil", "urllib3", "click", "python-dateutil",
             "typing-extensions", "pydantic", "pydantic-settings", "grad-cam", "redis", "hiredis", "rq", "minio"):
    try:
        print(f"  {dist} {importlib.metadata.version(dist)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"  {dist}: not installed")

def where(module):
    path = getattr(module, "__file__", None) or "?"
    return "kit" if path.startswith(work) else path

model = ["steelsight.contract", "pydantic", "pydantic_settings", "pytorch_grad_cam",
         "steelsight.model.inference.predictor", "steelsight.model.inference.backends", "bench.batch_sweep",
         "bench.gpu_sweep"]
pipeline = ["redis", "hiredis", "rq", "minio", "Crypto", "steelsight.cli", "steelsight.worker.engine",
            "steelsight.producer.service", "bench.pipeline_throughput"]
missing = []
print("== imports")
for name in model + pipeline:
    try:
        print(f"  {name}: {where(importlib.import_module(name))}")
    except Exception as exc:
        needed = name in model or tier == "full"
        print(f"  {name}: FAILED ({type(exc).__name__}: {exc})" + ("" if needed else " (not in the model tier)"))
        if needed:
            missing.append(name)
if missing:
    sys.exit(f"gpu_run: cannot import {', '.join(missing)}: the sweep would fail")
EOF
  py_rc=$?
  if [ "$TIER" = full ]; then
    echo "== servers"
    weed version 2>&1 | sed -n 1p || py_rc=1
    redis-server --version || py_rc=1
    py-spy --version || py_rc=1
  fi
  exit $py_rc
} 2>&1 | tee "$OUT/env.txt"
[ "${PIPESTATUS[0]}" = 0 ] || die "the set-up check failed (above); nothing was run"
echo "gpu_run: set-up took $((SECONDS - START)) s"
[ "$SETUP_ONLY" = 1 ] && exit 0

# -- 3b. the device path's parity with the CPU path, and the half-precision trunks' (skipped in CI: no GPU) ----
if [ "$DRY" = 0 ]; then
  timeout --signal=TERM --kill-after=10 "$PARITY_LIMIT_S" "$PYBIN" -m pytest -q -p no:cacheprovider \
    tests/model/test_ondevice.py tests/model/test_backends.py -k "cuda or half" > "$OUT/parity-tests.txt" 2>&1
  echo "gpu_run: parity tests exited with $? ($OUT/parity-tests.txt): $(tail -1 "$OUT/parity-tests.txt")"
fi

# -- 4. the sweep -----------------------------------------------------------------------------------------------
if [ ${#SWEEP_ARGS[@]} -eq 0 ]; then
  if [ "$DRY" = 1 ]; then SWEEP_ARGS=(--quick); else SWEEP_ARGS=(--device cuda); fi
fi
left=$((LIMIT_S - (SECONDS - START) - COPY_RESERVE_S))
[ "$left" -ge 60 ] || die "only $left s left of GPU_RUN_LIMIT_S=$LIMIT_S for the sweep"
given_budget=0 quick=0
for a in "${SWEEP_ARGS[@]}"; do
  case "$a" in --budget-s|--budget-s=*) given_budget=1 ;; --quick) quick=1 ;; esac
done
if [ "$given_budget" = 0 ] && [ "$quick" = 0 ]; then  # --quick keeps its own, shorter budget
  budget=$((left - BUDGET_MARGIN_S)); [ "$budget" -gt "$MAX_BUDGET_S" ] && budget=$MAX_BUDGET_S
  SWEEP_ARGS+=(--budget-s "$budget")
fi

collect() {  # step 5; also when the sweep failed or was stopped
  local stamp="$WORK/started" newest
  newest="$(find bench/results -maxdepth 1 -name 'gpu_sweep-*.json' -newer "$stamp" 2>/dev/null | sort | tail -1)"
  [ -n "$newest" ] && cp "$newest" "$OUT/"
  local written=()
  mapfile -t written < <(find bench/results -maxdepth 1 -name '*.json' -newer "$stamp" -printf '%f\n' | sort)
  [ ${#written[@]} -gt 0 ] && tar -czf "$OUT/bench-results.tar.gz" -C bench/results "${written[@]}"
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
  if [ "$(stat -c %s "$OUT/logs.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then  # the tool returns 16 MiB a file
    for f in "$WORK"/logs/*; do tail -c 1048576 "$f" > "$f.tail" && mv "$f.tail" "$f"; done
    tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
  fi
  echo "gpu_run: in $OUT:"
  for f in "$OUT"/*; do echo "  $(basename "$f") $(stat -c %s "$f") bytes"; done
}

touch "$WORK/started"
COLLECT=1
echo "gpu_run: python -m bench.gpu_sweep ${SWEEP_ARGS[*]} (stopped after $left s at the latest)"
GPU_SWEEP_MIRROR="$OUT" timeout --signal=TERM --kill-after=15 "$left" \
  "$PYBIN" -m bench.gpu_sweep --logs "$WORK/logs" "${SWEEP_ARGS[@]}"
rc=$?
[ "$rc" = 124 ] && echo "gpu_run: the sweep reached the time limit and was stopped;" \
  "its results file holds what it measured"
echo "gpu_run: the sweep exited with $rc after $((SECONDS - START)) s in all"
exit "$rc"
