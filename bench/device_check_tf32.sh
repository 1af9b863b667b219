#!/usr/bin/env bash
# One device call that validates the wip/tf32 branch (float32 on tensor cores).
# Run from the repository root on the GPU machine, with the .whl folder carried:
#   bash bench/device_check_tf32.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py -k "float32_tensor_core" 2>&1 | tail -5
for mode in fma 3xtf32 tf32; do
  timeout 120 python3 -m relattn bench --backend cupy --dtype float32 --gpu-float32 $mode \
    --case sam-b-global --case sam-b-window --case sam-h-global ${OUT:+--json $OUT/fp32_$mode.json} 2>&1 | tail -10
done
