#!/usr/bin/env bash
# The GPU tables of docs/benchmarks.md, the PyTorch anchors timed in the same run.
#
#   bash bench/bench_gpu.sh                   # from the repository root
#   OUT=results bash bench/bench_gpu.sh       # also write the JSON of every table to results/
#   WHEELS=wheels bash bench/bench_gpu.sh     # offline machine: install the wheels in wheels/ first
#
# Needs a CUDA GPU, CuPy (pip install -e ".[gpu]") and PyTorch with CUDA (the anchors).
set -u
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/relattn-site "$WHEELS"/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/relattn-site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
[ -n "${OUT:-}" ] && mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
B="python3 -m relattn bench --backend cupy"
C="--case sam-b-global --case sam-b-window --case sam-h-global"
# bfloat16: relattn, the seed form, SDPA without bias (default dispatch and flash backend)
$B --dtype bfloat16 $C --case sam-b-global-1280px ${OUT:+--json $OUT/bf16.json} 2>&1 | grep -v "^\[#"
# float32: the default 3xTF32 mode, then the "fma" and "tf32" modes (relattn rows only)
$B --dtype float32 $C ${OUT:+--json $OUT/fp32.json} 2>&1 | grep -v "^\[#"
for mode in fma tf32; do
  $B --dtype float32 --gpu-float32 $mode $C ${OUT:+--json $OUT/fp32_$mode.json} 2>&1 | grep -E "cupy"
done
# the whole Attention layer against the PyTorch seed module
python3 bench/bench_module.py --device cuda --dtype bfloat16 --runs 30 ${OUT:+--json $OUT/layer.json} 2>&1 | tail -12
