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
# float32), then engine tests with device="auto" (CUDA): float32 / float64 fits against
# each other and the dense reference, sparse = dense, missing data, data operators,
# rotations. Each step has its own time limit (seconds).
timeout 90 python3 benchmarks/gpu_ebnm_check.py --device "$DEV"
echo "ebnm check rc=$?"
timeout 150 python3 -m pytest -q -p no:cacheprovider \
    tests/test_engine.py -k "float32 or monotone or independent or sparse or missing"
echo "engine tests rc=$?"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_engine_data.py tests/test_rotation.py
echo "data / rotation tests rc=$?"
# speed: the peer cases (their .mtx made first, ~5 s) and the 2e5 sparse case on the
# GPU in float32, then the peer cases in float64
timeout 150 python3 benchmarks/bench_engine.py --cases peer,sparse --sizes 2e5 --no-pca \
    --device "$DEV" --dtype float32 --threads 16 --make-data .gpu/make_data.py
timeout 90 python3 benchmarks/bench_engine.py --cases peer --device "$DEV" --dtype float64 \
    --threads 16 --make-data .gpu/make_data.py
