#!/usr/bin/env bash
# One run on a CUDA machine for the numba kernels: install, compile ahead of time, GPU tests,
# benchmark. Each step's log lands in $OUT (the device tool's output folder; ./artifacts here).
set -uo pipefail
OUT=${OUT:-artifacts}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -m pip list 2>/dev/null | grep -iE '^(torch|numba|numba-cuda|numpy) '
    python3 -c "import yaie.kernels._numba as n; print('numba-cuda GPU usable:', n.gpu_available())"
} 2>&1 | tee "$OUT/env.log"
timeout 120 python3 -m yaie.kernels.build 2>&1 | tee "$OUT/build.log"
# Twice: the spread between two runs is the noise floor for comparing versions.
for run in 1 2; do
    timeout 120 python3 -m yaie.cli bench kernels 2>&1 | tee "$OUT/bench$run.log"
done
# --noconftest: the root conftest loads the default model's GGUF tooling, which these GPU tests
# don't use and the device image lacks.
timeout 240 python3 -m pytest -m gpu tests/kernels -q -p no:cacheprovider --noconftest \
    --continue-on-collection-errors 2>&1 | tee "$OUT/pytest_gpu.log"
