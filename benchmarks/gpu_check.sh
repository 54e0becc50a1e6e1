#!/usr/bin/env bash
# The GPU check of the engine, for a session lent the device machine (at most ~9 minutes).
# First run benchmarks/gpu_prepare.sh here; then
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=590)
# Everything it prints also lands in $OUT/gpu_check.log.
set -uo pipefail
DEV=${GPU_CHECK_DEVICE:-cuda}  # GPU_CHECK_DEVICE=cpu: a dry run of this script on the CPU
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
if ! python3 -c "import anndata" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src:tests:${PYTHONPATH:-} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
python3 -c "import torch, cebmf; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
# correctness on the device: the EBNM layer against the CPU (every family, float64 and
# float32), then the tests parametrised over conftest.DEVICES, on CUDA alone (-k cuda):
# the ELBO against the independent dense computation (float64 on the GPU), the ELBO never
# decreasing over updates (every family, noise model, dense / sparse / missing), float32
# against float64 fits, sparse = dense, missing data, and the GPU's peak allocation on a
# 50,000 x 2,000 sparse fit. Each step has its own time limit (seconds); pytest-timeout
# (in the device image) stops a hung test, so the summary of failures is still printed.
timeout 90 python3 benchmarks/gpu_ebnm_check.py --device "$DEV"
echo "ebnm check rc=$?"
PER_TEST=$(python3 -c "import pytest_timeout" 2>/dev/null && echo --timeout=120)
timeout 240 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short $PER_TEST \
    tests/test_engine.py tests/test_engine_data.py -k "$DEV"
echo "engine tests rc=$?"
# speed: the peer cases (their .mtx made first, ~5 s) and the 2e5 sparse case on the
# GPU in float32, then the peer cases in float64
timeout 150 python3 benchmarks/bench_engine.py --cases peer,sparse --sizes 2e5 --no-pca \
    --device "$DEV" --dtype float32 --threads 16 --make-data .gpu/make_data.py
timeout 90 python3 benchmarks/bench_engine.py --cases peer --device "$DEV" --dtype float64 \
    --threads 16 --make-data .gpu/make_data.py
