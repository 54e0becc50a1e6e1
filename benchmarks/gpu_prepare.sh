#!/usr/bin/env bash
# Prepare the GPU check (run HERE, where PyPI is reachable, from the repository root).
#
# The device machine has Python 3.12 with torch, numpy, scipy, pandas, h5py, matplotlib,
# mpmath, pytest and tqdm, but not anndata (which `import cebmf` needs) and cannot reach
# PyPI; ../shared does not travel either. This fills the git-ignored folder .gpu/ with
# anndata and its missing dependencies as Python 3.12 wheels, and make_data.py.
# Then, on the device: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"]).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/whl
cp ../shared/bench/make_data.py .gpu/
for spec in anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 \
    scverse-misc session-info2 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .gpu/whl "$spec"
done
du -sh .gpu
