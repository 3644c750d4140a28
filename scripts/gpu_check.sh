#!/usr/bin/env bash
# `make gpu-check`: install the wheels scripts/gpu_wheels.sh carried (.whl/) into a target directory, then run
# the GPU check's stages (python -m scripts.gpu_check; arguments are passed on). On the device machine:
#   bash scripts/gpu_check.sh            (results in $OUT)
# On a CPU machine it runs the reduced rehearsal with the venv's Python: PYTHON=.venv/bin/python make gpu-check
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/lorakit-wheels}
# the wheels are for the device machine's Python (3.12); elsewhere they are left alone
if compgen -G ".whl/*.whl" >/dev/null && "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  started=$(date +%s)
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" .whl/*.whl
  echo "gpu-check: installed $(ls .whl/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - started )) s"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" LORAKIT_WHEELS_SITE="$SITE"
fi
exec "$PYTHON" -m scripts.gpu_check "$@"
