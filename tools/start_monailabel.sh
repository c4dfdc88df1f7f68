#!/usr/bin/env bash
# Start the MONAI Label server of this bundle on 127.0.0.1 (docs/monailabel.md).
#
#   tools/start_monailabel.sh STUDIES_DIR [PORT] [extra start_server options, e.g. --conf skip_trainers true]
#
# STUDIES_DIR holds the tomograms (.mrc .rec .tif .tiff, also .nii/.nii.gz); MONAI Label keeps labels
# in STUDIES_DIR/labels/. PORT defaults to 8000. The venv is made (or reused) by
# tools/monailabel_env.sh. Environment: MONAILABEL_HOST (default 127.0.0.1; the server has no
# authentication, so think twice before 0.0.0.0), CRYOSXT_MONAILABEL_VENV, CRYOSXT_MONAILABEL_APP
# (default: <repo>/monailabel), PYTHON (the project's interpreter).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
    exit 2
fi
STUDIES="$(mkdir -p "$1" && cd "$1" && pwd)"
shift
PORT=8000
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
    PORT="$1"
    shift
fi
HOST="${MONAILABEL_HOST:-127.0.0.1}"
APP="${CRYOSXT_MONAILABEL_APP:-$ROOT/monailabel}"

VENV="$("$ROOT/tools/monailabel_env.sh" | tail -n 1)"
# Run from the app folder: a .env file in the caller's folder would otherwise feed MONAI Label's settings.
cd "$APP"
echo "MONAI Label: http://$HOST:$PORT  (app $APP, studies $STUDIES)" >&2
exec "$VENV/bin/python" -m monailabel.main start_server \
    --app "$APP" --studies "$STUDIES" --host "$HOST" --port "$PORT" \
    --conf bundle "$ROOT/bundle" "$@"
