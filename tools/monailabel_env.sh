#!/usr/bin/env bash
# Create (or reuse) the virtual environment that runs the MONAI Label server for this bundle.
#
#   tools/monailabel_env.sh [VENV_DIR]
#
# VENV_DIR defaults to $CRYOSXT_MONAILABEL_VENV, else <repo>/.venv-monailabel. The base interpreter is
# $PYTHON (default: python3); it must already have the project installed
# (pip install torch==2.13.0 -e .). The venv sees that environment through a .pth file, so torch,
# monai and the bundle's packages are not installed twice; it adds only MONAI Label and its server
# packages (monailabel/requirements*.txt). A stamp file (requirement files + base interpreter and its
# torch/monai/numpy versions) makes a second call a no-op (about a second).
#
# Prints progress on stderr and the venv path as the last line of stdout. Exit status: 0 ready,
# 75 the environment cannot be built for a reason outside this project (no venv module, package
# index unreachable, disk full), anything else: a real failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${CRYOSXT_MONAILABEL_VENV:-$ROOT/.venv-monailabel}}"
PYTHON="${PYTHON:-python3}"
REQ="$ROOT/monailabel/requirements.txt"
REQ_NODEPS="$ROOT/monailabel/requirements-nodeps.txt"
RECIPE=2  # bump when the build steps below change
EX_ENV=75

log() { echo "[monailabel_env] $*" >&2; }

# find_spec, not import: importing torch and monai costs seconds, and this runs on every start.
if ! "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
        ("torch", "monai", "mrcfile", "tifffile", "nibabel", "ignite")))' 2>/dev/null; then
    log "$PYTHON lacks the project's packages; first run: pip install torch==2.13.0 -e ."
    exit 1
fi

# Everything that decides what the venv holds.
stamp_text() {
    "$PYTHON" - "$REQ" "$REQ_NODEPS" "$RECIPE" <<'PY'
import hashlib, os, sys, sysconfig
from importlib.metadata import version
h = hashlib.sha256()
for path in sys.argv[1:3]:
    h.update(open(path, "rb").read())
print(f"recipe={sys.argv[3]}")
print(f"requirements={h.hexdigest()}")
print(f"python={os.path.realpath(sys.executable)} {sys.version.split()[0]}")  # python == python3
print(f"site={sysconfig.get_paths()['purelib']}")
print(" ".join(f"{name}={version(name)}" for name in ("torch", "monai", "numpy")))
PY
}

mkdir -p "$(dirname "$VENV")"
# One builder at a time (two test runs, or the test and the start script).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$VENV.lock"
    flock -w 900 9 || { log "timed out waiting for another build of $VENV"; exit 1; }
fi

WANT="$(stamp_text)"
if [[ -f "$VENV/.stamp" && "$(cat "$VENV/.stamp")" == "$WANT" ]] \
    && "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("monailabel") is None)' \
        >/dev/null 2>&1; then
    log "reusing $VENV"
    echo "$VENV"
    exit 0
fi

BUILD_LOG="$(mktemp)"
trap 'rm -f "$BUILD_LOG"' EXIT
fail() {  # fail MESSAGE: classify the build log, print its tail, exit
    log "$1"
    tail -n 40 "$BUILD_LOG" >&2 || true
    if grep -qiE "NewConnectionError|Max retries exceeded|Temporary failure in name resolution|Name or service not known|Network is unreachable|Connection (refused|reset)|ReadTimeoutError|timed out|No space left on device|ensurepip is not available|No module named venv" "$BUILD_LOG"; then
        log "this looks like a machine/network problem, not a project bug (exit $EX_ENV)"
        exit $EX_ENV
    fi
    # "(from versions: none)" is a wrong pin if the index answers, and an unreachable index if it
    # does not even list pip itself.
    if grep -q "from versions: none" "$BUILD_LOG" && ! "$PYTHON" -m pip index versions pip >/dev/null 2>&1; then
        log "the package index is unreachable (exit $EX_ENV)"
        exit $EX_ENV
    fi
    exit 1
}

START=$SECONDS
log "building $VENV (base: $PYTHON)"
rm -rf "$VENV"
if ! "$PYTHON" -m venv --without-pip "$VENV" >>"$BUILD_LOG" 2>&1; then
    fail "python -m venv failed"
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# addsitedir rather than a bare path: the project env's own .pth files (editable installs) apply too.
"$PYTHON" - "$SITE/_cryosxt_project_env.pth" <<'PY'
import sys, sysconfig
paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
open(sys.argv[1], "w").write("".join(f"import site; site.addsitedir({p!r})\n" for p in paths))
PY

# The base pip installs into the venv (pip >= 22.3 has --python): no pip/setuptools copy in the venv,
# whose old setuptools would shadow the base one.
if "$PYTHON" -m pip --help 2>/dev/null | grep -q -- "--python"; then
    PIP=("$PYTHON" -m pip --python "$VENV/bin/python")
else
    "$VENV/bin/python" -m ensurepip --default-pip >>"$BUILD_LOG" 2>&1 || fail "ensurepip failed"
    PIP=("$VENV/bin/python" -m pip)
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
"${PIP[@]}" install --progress-bar off -r "$REQ" >>"$BUILD_LOG" 2>&1 || fail "pip install -r $REQ failed"
"${PIP[@]}" install --progress-bar off --no-deps -r "$REQ_NODEPS" >>"$BUILD_LOG" 2>&1 \
    || fail "pip install --no-deps -r $REQ_NODEPS failed"

# The venv must not shadow the project's torch/monai/numpy (a numpy < 2 here would break the bundle),
# and the modules the server imports must load; a failure here is a wrong pin, not the network.
if ! "$VENV/bin/python" - "$(echo "$WANT" | tail -n 1)" >>"$BUILD_LOG" 2>&1 <<'PY'
import sys
from importlib.metadata import version
for item in sys.argv[1].split():
    name, want = item.split("=", 1)
    if version(name) != want:
        sys.exit(f"{name} {version(name)} in the venv shadows the project's {want}")
import monailabel.app, monailabel.tasks.infer.basic_infer, monailabel.tasks.train.bundle  # noqa: E401
PY
then
    log "the new venv fails its check (shadowed packages or a module that does not import)"
    tail -n 40 "$BUILD_LOG" >&2
    exit 1
fi
echo "$WANT" >"$VENV/.stamp"
log "ready in $((SECONDS - START)) s: $VENV"
echo "$VENV"
