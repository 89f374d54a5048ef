#!/usr/bin/env bash
# Compile YAIE's numba kernels for the local GPU into numba's on-disk cache (see
# kernels/build.py). Uses the repo's virtual environment when there is one; PYTHON overrides.
set -euo pipefail
cd "$(dirname "$0")"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m yaie.kernels.build "$@"
