#!/usr/bin/env bash
# The GPU benchmark tables of docs/benchmarks.md, anchors in the same run.
# Run from the repository root with .whl carried: bash bench/device_bench.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
B="python3 -m relattn bench --backend cupy"
C="--case sam-b-global --case sam-b-window --case sam-h-global"
$B --dtype bfloat16 $C --case sam-b-global-1280px ${OUT:+--json $OUT/bf16.json} 2>&1 | grep -v "^\[#"
$B --dtype float32 $C ${OUT:+--json $OUT/fp32.json} 2>&1 | grep -v "^\[#"
for mode in fma tf32; do
  $B --dtype float32 --gpu-float32 $mode $C ${OUT:+--json $OUT/fp32_$mode.json} 2>&1 | grep -E "cupy"
done
python3 bench/bench_module.py --device cuda --dtype bfloat16 --runs 30 ${OUT:+--json $OUT/layer.json} 2>&1 | tail -12
python3 bench/sm90_dev.py --time 2>&1 | tail -14
