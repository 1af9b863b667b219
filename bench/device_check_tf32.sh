#!/usr/bin/env bash
# One device call that validates float32 on tensor cores (dev aid).
# Run from the repository root on the GPU machine, with the .whl folder carried:
#   bash bench/device_check_tf32.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py -k "float32 or 3xtf32 or rel_terms" 2>&1 | tail -3
for mode in fma 3xtf32 tf32; do
  timeout 120 python3 -m relattn bench --backend cupy --dtype float32 --gpu-float32 $mode \
    --case sam-b-global --case sam-b-window --case sam-h-global ${OUT:+--json $OUT/fp32_$mode.json} 2>&1 | grep -E "cupy|seed" 
done
if [ "${PROFILE:-1}" = 1 ]; then
  ncu --kernel-name regex:relattn_tf32 --launch-skip 2 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
    --section Occupancy --section ComputeWorkloadAnalysis --section InstructionStats python3 bench/tf32_probe.py 3xtf32 2>&1 | grep -v "^==PROF==" | tail -80
fi
