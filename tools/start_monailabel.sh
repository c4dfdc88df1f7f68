#!/usr/bin/env bash
# Start the MONAI Label server of this bundle on 127.0.0.1 (docs/monailabel.md).
#
#   tools/start_monailabel.sh STUDIES_DIR [PORT] [extra start_server options, e.g. --conf skip_trainers true]
#
# STUDIES_DIR holds the tomograms (.mrc .rec .tif .tiff, also .nii/.nii.gz); MONAI Label keeps labels
# in STUDIES_DIR/labels/. PORT defaults to 8000. The venv is made (or reused) by
# tools/monailabel_env.sh. Environment: MONAILABEL_HOST (default 127.0.0.1; the server has no
# authentication, so think twice before 0.0.0.0), MONAILABEL_CORS_ORIGINS (web pages allowed to call
# the server from a browser, comma-separated origins; default http://127.0.0.1:PORT and
# http://localhost:PORT; 3D Slicer is not a browser and needs none), CRYOSXT_MONAILABEL_VENV,
# CRYOSXT_MONAILABEL_APP (default: <repo>/monailabel), PYTHON (the project's interpreter).
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

# MONAI Label allows every origin, with credentials, when MONAI_LABEL_CORS_ORIGINS is empty: any web
# page open in the user's browser could then drive the server. Always give it a list (JSON).
CORS="["
IFS=', ' read -r -a ORIGINS <<<"${MONAILABEL_CORS_ORIGINS:-http://127.0.0.1:$PORT,http://localhost:$PORT}"
for origin in "${ORIGINS[@]}"; do
    [[ -z "$origin" ]] && continue
    if [[ ! "$origin" =~ ^https?://[A-Za-z0-9.:-]+$ && ! "$origin" =~ ^https?://\[[0-9A-Fa-f:]+\](:[0-9]+)?$ ]]; then
        echo "MONAILABEL_CORS_ORIGINS: '$origin' is not an origin such as http://host:8000" >&2
        exit 2
    fi
    CORS+="\"$origin\","
done
export MONAI_LABEL_CORS_ORIGINS="${CORS%,}]"
[[ "$MONAI_LABEL_CORS_ORIGINS" == "[]" ]] && { echo "MONAILABEL_CORS_ORIGINS: no origin given" >&2; exit 2; }

VENV="$("$ROOT/tools/monailabel_env.sh" | tail -n 1)"
# Run from the app folder: a .env file in the caller's folder would otherwise feed MONAI Label's settings.
cd "$APP"
echo "MONAI Label: http://$HOST:$PORT  (app $APP, studies $STUDIES, CORS origins $MONAI_LABEL_CORS_ORIGINS)" >&2
# lib.launch: MONAI Label's start_server with the CORS origins above (see there why not directly).
exec "$VENV/bin/python" -m lib.launch start_server \
    --app "$APP" --studies "$STUDIES" --host "$HOST" --port "$PORT" \
    --conf bundle "$ROOT/bundle" "$@"
