#!/usr/bin/env bash
# Builds .gpukit/: what bench/gpu_run.sh needs to run bench.gpu_sweep on the lent GPU machine, which has
# no network. That machine's python3 (3.12, with torch, torchvision, numpy, opencv, scipy, matplotlib,
# onnxruntime, prometheus-client, safetensors, ...) lacks the rest of steelsight's stack; the kit carries it:
#
#   site.tar.xz   the missing Python packages for CPython 3.12 on x86-64 Linux (pydantic, grad-cam, ...;
#                 with the pipeline also redis, hiredis, rq, minio and theirs), unpacked from their wheels,
#                 test suites and caches left out, shared objects stripped: the packed wheels alone do not fit
#   bin.tar.xz    pipeline only: redis-server with the libraries an Ubuntu image lacks, and py-spy
#   weed.xz       pipeline only: SeaweedFS's weed, the pinned version (deploy/seaweedfs-requirements.txt)
#   manifest.json what is in the kit: versions, the wheels' sha256, the tier; SHA256SUMS for the files
#
# Everything that travels to that machine counts against one limit (64 MiB): the working tree (tracked and
# untracked-not-ignored files; the shipped checkpoint alone is 55 MiB) plus the kit. So the kit comes in two
# tiers, and --tier auto (the default) takes the larger that fits:
#   full    model-only steps, the pipeline (Redis, SeaweedFS, workers) and py-spy: the whole sweep
#   model   the model-only steps (bench.batch_sweep per backend, torch.profiler's loop); the pipeline steps
#           then fail at once (no Redis, no SeaweedFS), and the summary says so
# It prints each part's size and the total against the limit, and fails when even the model tier does not fit.
#
#   bash bench/gpu_kit.sh                       # build (idempotent: unchanged inputs give identical files)
#   bash bench/gpu_kit.sh --tier full           # the whole sweep, or fail saying what does not fit
#   bash bench/gpu_kit.sh --tier full --allow-oversize   # build it anyway, to try gpu_run.sh here
#
# Then, with the device tool: run(command="bash bench/gpu_run.sh -- --device cuda", carry=[".gpukit"],
# timeout_s=600); bench/gpu_run.sh says what it does and what comes back.
# Versions are the ones installed in .venv (what the tests run here), so rebuild after changing them.
# Downloads and the compressed weed are cached in .gpukit-cache/ (ignored by git, not carried).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="$ROOT/.gpukit"
CACHE="$ROOT/.gpukit-cache"
PY="${GPUKIT_PYTHON:-$ROOT/.venv/bin/python}"
LIMIT_BYTES=$((64 * 1024 * 1024))  # the device tool's limit on all that travels in one call

tier=auto
margin_mib=1  # room for what others add to the tree (result files, say) between this build and the run
allow_oversize=0

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "gpu_kit: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --tier) tier="${2:-}"; shift 2 || die "--tier needs a value: auto, model or full" ;;
    --tier=*) tier="${1#*=}"; shift ;;
    --margin-mib) margin_mib="${2:-}"; shift 2 || die "--margin-mib needs a number" ;;
    --allow-oversize) allow_oversize=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
case "$tier" in auto|model|full) ;; *) die "--tier must be auto, model or full, not '$tier'" ;; esac
[[ "$margin_mib" =~ ^[0-9]+$ ]] || die "--margin-mib must be a whole number of MiB, not '$margin_mib'"
[ -x "$PY" ] || die "no Python at $PY: run 'make' first (or set GPUKIT_PYTHON)"
for tool in xz tar git sha256sum readelf ldd; do
  command -v "$tool" >/dev/null || die "'$tool' is needed to build the kit and is not on PATH"
done

# What each tier carries. The device's image holds the rest of what these need (DEVICE_HAS, checked below).
MODEL_PKGS=(pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
            typing-extensions grad-cam ttach)
# typing-extensions: pydantic needs a recent one, and which one the image has is not known
PIPELINE_PKGS=(redis hiredis rq croniter minio argon2-cffi argon2-cffi-bindings cffi pycparser pycryptodome
               paho-mqtt)

mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
size_of() { stat -c %s "$1"; }

# -- the check: every dependency of the GPU path is in the kit or on the device ----------------------------
# A new dependency in pyproject.toml, or a new requirement of a kit package, fails here rather than on the
# device, where a missing module costs a lease.
"$PY" - "$ROOT/pyproject.toml" "${MODEL_PKGS[*]}" "${PIPELINE_PKGS[*]}" <<'EOF'
import sys, tomllib
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

# in the GPU machine's image ('cuda'; its package list is in the device docs): only the names this check meets
DEVICE_HAS = {canon(n) for n in """torch torchvision numpy pillow opencv-python-headless scipy matplotlib
    scikit-learn tqdm safetensors prometheus-client psutil requests urllib3 certifi click python-dateutil onnx
    onnxruntime packaging pyyaml""".split()}
# pyproject dependencies that bench.gpu_sweep's path never imports
NOT_ON_GPU_PATH = {"albumentations": "training only", "gradio": "the dashboard only",
                   "openvino": "a CPU runtime; the sweep's backends are torch ones"}
model, pipeline = ({canon(n) for n in arg.split()} for arg in sys.argv[2:4])
kit = model | pipeline
target = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
problems = []
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
for dep in map(Requirement, deps):
    name = canon(dep.name)
    if name not in kit | DEVICE_HAS and name not in NOT_ON_GPU_PATH:
        problems.append(f"pyproject.toml needs {dep.name}: add it to the kit (MODEL_PKGS or PIPELINE_PKGS in "
                        "bench/gpu_kit.sh), or to DEVICE_HAS / NOT_ON_GPU_PATH there if the image has it or the "
                        "GPU path never imports it")
    for extra in dep.extras:  # redis[hiredis]
        for req in map(Requirement, distribution(dep.name).requires or []):
            if req.marker and req.marker.evaluate(target | {"extra": extra}) and canon(req.name) not in kit:
                problems.append(f"{dep.name}[{extra}] needs {req.name}: add it to the kit")
for name in sorted(kit):
    try:
        requires = distribution(name).requires or []
    except PackageNotFoundError:
        problems.append(f"{name} is not installed in {sys.executable}'s environment: the kit takes its versions "
                        "from there (run make)")
        continue
    tier = model if name in model else kit  # the model tier travels alone
    for req in map(Requirement, requires):
        if (req.marker is None or req.marker.evaluate(target)) and canon(req.name) not in tier | DEVICE_HAS:
            problems.append(f"{name} needs {req.name}, which is neither in its tier of the kit nor in the image")
if problems:
    sys.exit("gpu_kit: the kit would be incomplete:\n  " + "\n  ".join(problems))
EOF

# -- the wheels, at the versions installed here ------------------------------------------------------------
mkdir -p "$CACHE/wheels"
PLATFORMS=()
for n in 39 35 34 31 28 27 26 24 17 12 5; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
TARGET=(--python-version 3.12 --implementation cp "${PLATFORMS[@]}")
# pip's notes about this machine's extra local indexes are noise here
quiet_pip() {
  local rc=0
  "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) || rc=$?
  return $rc
}

cached_wheel() {  # cached_wheel ERE: the newest cached wheel whose file name matches it (any case)
  find "$CACHE/wheels" -maxdepth 1 -name '*.whl' -printf '%f\n' 2>/dev/null | grep -iE -- "$1" | sort -V | tail -1 || true
}
version_of() { "$PY" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$1"; }
wheel_for() {  # the cached wheel of name==version, downloaded or (pure Python without a wheel) built here
  local name="$1" version="$2" norm found
  norm="$(echo "$name" | tr '[:upper:]' '[:lower:]' | tr -- '-.' '__')"
  found="$(cached_wheel "^${norm}-${version}-")"
  if [ -z "$found" ]; then
    # a package without a wheel (sdist only) fails here, quietly: the fallback below builds it
    quiet_pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$CACHE/wheels" "$name==$version" \
      >/dev/null 2>&1 || true
    found="$(cached_wheel "^${norm}-${version}-")"
  fi
  if [ -z "$found" ]; then  # no wheel on the index for 3.12 x86-64: only a pure-Python one can be built here
    local sdist; sdist="$(mktemp -d)"
    quiet_pip download -q --no-deps --no-binary=:all: -d "$sdist" "$name==$version" >&2
    ls "$sdist"/* >/dev/null 2>&1 || die "no wheel and no source of $name==$version on the index"
    quiet_pip wheel -q --no-deps -w "$sdist/built" "$sdist"/* >&2
    found="$(find "$sdist/built" -maxdepth 1 -printf '%f\n' 2>/dev/null | grep -E -- '-(py3|py2\.py3)-none-any\.whl$' \
      | head -1)"
    [ -n "$found" ] || die "$name==$version has no wheel for CPython 3.12 x86-64 and does not build to a pure one"
    mv "$sdist/built/$found" "$CACHE/wheels/"
    rm -rf "$sdist"
  fi
  echo "$CACHE/wheels/$found"
}

declare -A WHEEL VERSION
for name in "${MODEL_PKGS[@]}" "${PIPELINE_PKGS[@]}" py-spy; do
  if [ "$name" = py-spy ]; then  # a binary, not a dependency of the project: the newest
    existing="$(cached_wheel '^py_spy-')"
    if [ -z "$existing" ]; then
      quiet_pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$CACHE/wheels" py-spy >&2
      existing="$(cached_wheel '^py_spy-')"
    fi
    [ -n "$existing" ] || die "py-spy: no wheel for x86-64 Linux on the index"
    WHEEL[$name]="$CACHE/wheels/$existing"; VERSION[$name]="$(echo "$existing" | cut -d- -f2)"
    continue
  fi
  VERSION[$name]="$(version_of "$name")" || die "$name is not installed in $PY's environment (run make)"
  WHEEL[$name]="$(wheel_for "$name" "${VERSION[$name]}")"
done

# -- packing ----------------------------------------------------------------------------------------------
pack() {  # pack DIR OUT.tar.xz: byte-identical for identical inputs, so a rebuild changes nothing
  chmod 755 "$1"  # the unpacked folder gets this mode
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$1" -cf - . | xz -9e -T1 > "$2.tmp"
  mv "$2.tmp" "$2"
}

site_tarball() {  # site_tarball OUT PKG...: the packages installed for CPython 3.12, then trimmed
  local out="$1"; shift
  local stage; stage="$(mktemp -d)"
  local wheels=(); for name in "$@"; do wheels+=("${WHEEL[$name]}"); done
  quiet_pip install -q --no-index --no-deps --no-compile --only-binary=:all: "${TARGET[@]}" \
    --target "$stage/site" "${wheels[@]}" >&2
  [ -d "$stage/site/pydantic_core" ] || die "installing the wheels into a staging folder failed"
  # console scripts name this machine's interpreter; the sweep runs modules, not scripts
  rm -rf "$stage/site/bin" "$stage/site/Crypto/SelfTest"
  find "$stage/site" \( -name __pycache__ -o -name '*.pyi' \) -prune -exec rm -rf {} +
  if command -v strip >/dev/null; then
    find "$stage/site" -name '*.so' -exec strip --strip-unneeded {} +
  fi
  pack "$stage/site" "$out"
  rm -rf "$stage"
}

redis_and_spy_tarball() {  # bin.tar.xz: redis-server, the libraries it needs beyond an Ubuntu base, py-spy
  local out="$1" stage binary
  stage="$(mktemp -d)"; mkdir -p "$stage/redis/lib"
  binary="$(command -v redis-server || true)"
  [ -n "$binary" ] || die "redis-server is not installed here: run ./deploy/install-system-deps.sh"
  cp -L "$binary" "$stage/redis/redis-server"
  # Libraries the machine's image is sure to have (glibc; OpenSSL, libstdc++ and libsystemd come with its
  # Python and apt) stay out; the others go along, found the way the loader finds them here.
  local base='^(libc|libm|libdl|librt|libpthread|ld-linux-x86-64|libssl|libcrypto|libsystemd|libstdc\+\+|libgcc_s'
  base+='|libz)\.so'
  local todo=("$stage/redis/redis-server") lib path
  while [ ${#todo[@]} -gt 0 ]; do
    local elf="${todo[0]}"; todo=("${todo[@]:1}")
    for lib in $(readelf -d "$elf" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      [[ "$lib" =~ $base ]] && continue
      [ -e "$stage/redis/lib/$lib" ] && continue
      path="$(ldd "$binary" | awk -v l="$lib" '$1 == l { print $3 }')"
      [ -n "$path" ] && [ -e "$path" ] || die "redis-server needs $lib, which is not installed here"
      cp -L "$path" "$stage/redis/lib/$lib"
      todo+=("$stage/redis/lib/$lib")
    done
  done
  mkdir -p "$stage/spy"
  (cd "$stage/spy" && "$PY" -m zipfile -e "${WHEEL[py-spy]}" .)
  local spy; spy="$(find "$stage/spy" -type f -name py-spy | head -1)"
  [ -n "$spy" ] || die "no py-spy binary in ${WHEEL[py-spy]}"
  install -m 755 "$spy" "$stage/py-spy"
  rm -rf "$stage/spy"
  pack "$stage" "$out"
  rm -rf "$stage"
}

weed_xz() {  # the pinned weed, compressed once per binary (4 minutes of one core) and cached by its sha256
  local out="$1" binary sha
  binary="$("$PY" -c 'from steelsight.devstack import weed_binary; print(weed_binary())')" \
    || die "no pinned weed here (see the message above)"
  sha="$(sha256sum "$binary" | cut -d' ' -f1)"
  if [ ! -s "$CACHE/weed-$sha.xz" ]; then
    echo "gpu_kit: compressing $binary ($(mib "$(size_of "$binary")")); a few minutes, once" >&2
    xz -9 -T1 -c "$binary" > "$CACHE/weed-$sha.xz.tmp"
    mv "$CACHE/weed-$sha.xz.tmp" "$CACHE/weed-$sha.xz"
  fi
  cp "$CACHE/weed-$sha.xz" "$out"
  echo "$binary"
}

# -- what fits --------------------------------------------------------------------------------------------
tree_bytes="$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | du -cb --files0-from=- | tail -1 | cut -f1)"
if [ -d "$ROOT/shared" ] && git -C "$ROOT" check-ignore -q shared; then  # shared/ travels, ignored or not
  tree_bytes=$((tree_bytes + $(du -sb "$ROOT/shared" | cut -f1)))
fi
budget=$((LIMIT_BYTES - tree_bytes - margin_mib * 1024 * 1024))

NEXT="$CACHE/next"
rm -rf "$NEXT"; mkdir -p "$NEXT"
site_tarball "$NEXT/site.tar.xz" "${MODEL_PKGS[@]}"
model_bytes="$(size_of "$NEXT/site.tar.xz")"
chosen=model
why_not_full=""
if [ "$tier" != model ]; then
  weed_src="$("$PY" -c 'from steelsight.devstack import weed_binary; print(weed_binary())')" \
    || die "no pinned weed here (see the message above)"
  weed_raw="$(size_of "$weed_src")"
  cached="$CACHE/weed-$(sha256sum "$weed_src" | cut -d' ' -f1).xz"
  left=$((budget - model_bytes))
  # xz makes a Go binary no smaller than an eighth: below that (or below the cached weed.xz), building the
  # full tier (minutes) cannot help
  if [ -s "$cached" ]; then
    weed_least="$(size_of "$cached")"; compressed="$(mib "$weed_least")"
  else
    weed_least=$((weed_raw / 8)); compressed="about a quarter of that"
  fi
  if [ "$tier" = auto ] && [ "$left" -lt "$weed_least" ]; then
    why_not_full="weed alone ($(mib "$weed_raw"), $compressed compressed) is more than the"
    why_not_full+=" $(mib "$((left > 0 ? left : 0))") left"
    why_not_full+=" beside the working tree ($(mib "$tree_bytes")) and the model tier"
  else
    full="$CACHE/full"; rm -rf "$full"; mkdir -p "$full"
    site_tarball "$full/site.tar.xz" "${MODEL_PKGS[@]}" "${PIPELINE_PKGS[@]}"
    redis_and_spy_tarball "$full/bin.tar.xz"
    weed_xz "$full/weed.xz" >/dev/null
    full_bytes="$(du -cb "$full"/* | tail -1 | cut -f1)"
    if [ "$full_bytes" -le "$budget" ] || [ "$tier" = full ]; then
      chosen=full
      rm -f "$NEXT/site.tar.xz"
      mv "$full"/* "$NEXT/"
    else
      why_not_full="the full kit is $(mib "$full_bytes") (weed.xz $(mib "$(size_of "$full/weed.xz")")), and the"
      why_not_full+=" working tree ($(mib "$tree_bytes")) leaves $(mib "$((budget > 0 ? budget : 0))")"
    fi
    rm -rf "$full"
  fi
fi

# -- the manifest ---------------------------------------------------------------------------------------------
pkgs=("${MODEL_PKGS[@]}"); [ "$chosen" = full ] && pkgs+=("${PIPELINE_PKGS[@]}" py-spy)
pkg_lines=""
for name in "${pkgs[@]}"; do
  wheel="${WHEEL[$name]}"
  pkg_lines+="$name ${VERSION[$name]} $(basename "$wheel") $(sha256sum "$wheel" | cut -d' ' -f1)"$'\n'
done
weed_version="" redis_version=""
if [ "$chosen" = full ]; then
  weed_version="$("$PY" -c 'from steelsight.devstack import pinned_weed_version; print(pinned_weed_version())')"
  redis_version="$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')"
fi
"$PY" - "$NEXT" "$chosen" "$tree_bytes" "$LIMIT_BYTES" "$weed_version" "$redis_version" "$why_not_full" \
  "$pkg_lines" <<'EOF'
import json, sys
from pathlib import Path
kit, tier, tree, limit, weed, redis, why, pkg_lines = sys.argv[1:9]
kit = Path(kit)
packages = {}
for line in pkg_lines.strip().splitlines():
    name, version, wheel, sha = line.split()
    packages[name] = {"version": version, "wheel": wheel, "wheel_sha256": sha}
files = {p.name: p.stat().st_size for p in sorted(kit.iterdir()) if p.name != "manifest.json"}
manifest = {"tier": tier, "python": "cp312", "platform": "manylinux x86_64",
            "runs": "the model-only steps and the pipeline" if tier == "full" else
                    "the model-only steps only: no Redis, SeaweedFS or their clients",
            "full_tier_left_out_because": why or None, "packages": packages,
            "weed_version": weed or None, "redis_server_version": redis or None,
            "files_bytes": files, "tree_bytes_at_build": int(tree), "travel_limit_bytes": int(limit)}
(kit / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
EOF
(cd "$NEXT" && sha256sum -- * > SHA256SUMS)

# -- the report, and the swap into place unless it is too big ---------------------------------------------
kit_bytes="$(du -cb "$NEXT"/* | tail -1 | cut -f1)"
total=$((kit_bytes + tree_bytes))
echo "gpu_kit: tier $chosen"
for f in "$NEXT"/*; do printf '  %-14s %s\n' "$(basename "$f")" "$(mib "$(size_of "$f")")"; done
echo "  kit            $(mib "$kit_bytes") ($(mib "$model_bytes") of it the model tier's packages)"
echo "  working tree   $(mib "$tree_bytes") (travels with it)"
echo "  together       $(mib "$total") of the $(mib "$LIMIT_BYTES") one call may carry ($margin_mib MiB kept spare)"
if [ "$total" -gt $((LIMIT_BYTES - margin_mib * 1024 * 1024)) ]; then
  msg="kit and working tree together are $(mib "$total"): over the $(mib "$LIMIT_BYTES") a call may carry,"
  msg+=" less the $margin_mib MiB margin"
  [ "$allow_oversize" = 1 ] || die "$msg; $KIT is left as it was"
  echo "gpu_kit: WARNING: $msg (--allow-oversize: for trying gpu_run.sh here only)" >&2
fi
rm -rf "$KIT.old"
if [ -d "$KIT" ]; then mv "$KIT" "$KIT.old"; fi
mv "$NEXT" "$KIT"
rm -rf "$KIT.old"
echo "gpu_kit: built $KIT; for the GPU machine:" \
  "run(command=\"bash bench/gpu_run.sh -- --device cuda\", carry=[\".gpukit\"], timeout_s=600)"
if [ "$chosen" = model ] && [ "$tier" = auto ]; then
  echo "gpu_kit: WARNING: model tier only: $why_not_full. On the GPU machine the model-only steps run;" \
       "the pipeline steps fail at once (no Redis, SeaweedFS, rq or minio there)." >&2
fi
