#!/usr/bin/env bash
# One run on a CUDA machine for the numba kernels: install, compile ahead of time (and print the
# build table), GPU tests, benchmark. Each step's log lands in $OUT (the device tool's output
# folder; ./artifacts here). Wheels of packages the machine lacks (gguf, which the model loader
# imports) may be carried in .whl/. BENCH_RUNS (default 2) benchmark runs: the spread between
# them is the noise floor for comparing versions.
set -uo pipefail
OUT=${OUT:-artifacts}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/gguf-*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl \
        && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -m pip list 2>/dev/null | grep -iE '^(torch|numba|numba-cuda|numpy) '
} 2>&1 | tee "$OUT/env.log"
timeout 150 ./build_kernels.sh --dtype bf16 2>&1 | tee "$OUT/build.log"
# --noconftest: the root conftest resolves the default model, which these GPU tests don't use.
timeout 240 python3 -m pytest -m gpu tests/kernels -q -p no:cacheprovider --noconftest \
    2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
# `yaie bench kernels`, called directly: the CLI also imports the server and UI packages.
for run in $(seq "${BENCH_RUNS:-2}"); do
    timeout 150 python3 -c "from yaie.bench.kernels import run; run()" 2>&1 | tee "$OUT/bench$run.log"
done
