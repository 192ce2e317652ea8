#!/bin/bash
# On a lent NVIDIA machine (the device tool): install carried MLX CUDA wheels, then benchmarks/cuda_check.py.
# The mlx-cuda-13 wheel (90 MB) is over one call's 64 MiB, so it travels in two halves in two calls
# (.whl/p1, then .whl/p2 with mlx and mlx-lm); the first call only stages its half under /tmp/stage.
set -euo pipefail
STAGE=/tmp/stage
mkdir -p "$STAGE"
for d in .whl/p1 .whl/p2; do if [ -d "$d" ]; then cp "$d"/* "$STAGE"/; fi; done
if [ ! -f "$STAGE/part_aa" ] || [ ! -f "$STAGE/part_ab" ]; then ls -la "$STAGE"; exit 0; fi
cat "$STAGE/part_aa" "$STAGE/part_ab" > "$STAGE/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STAGE"/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
NV=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$(ls -d "$NV"/*/lib | paste -sd:):${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/cuda-out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import mlx.core as mx; print('cuda available:', mx.cuda.is_available(), mx.default_device())"
python3 -m benchmarks.cuda_check --fixtures .gpu --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
