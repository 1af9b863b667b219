#!/usr/bin/env bash
# Every GPU test on the device machine, in four parallel pytest processes
# (kernel compiles are CPU-bound). Run from the repository root with .whl carried:
#   bash bench/device_tests.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
L=${LIMIT:-560}
P="python3 -m pytest -q -p no:cacheprovider -rs"
timeout $L $P tests/test_gpu.py -k "sm90_kernel_configs" > /tmp/t1.log 2>&1 &
timeout $L $P tests/test_gpu_ws.py tests/test_gpu_win.py tests/test_gpu_wgt.py > /tmp/t4.log 2>&1 &
timeout $L $P tests/test_gpu.py tests/test_gpu_module.py -k "not sm90_kernel_configs" > /tmp/t2.log 2>&1 &
timeout $L $P tests -k "cupy or plans" --ignore=tests/test_gpu.py --ignore=tests/test_gpu_module.py --ignore=tests/test_gpu_ws.py --ignore=tests/test_gpu_win.py --ignore=tests/test_gpu_wgt.py > /tmp/t3.log 2>&1 &
wait
for f in /tmp/t1.log /tmp/t2.log /tmp/t3.log /tmp/t4.log; do echo "== $f"; grep -E "passed|failed|error|FAILED|SKIPPED" $f | tail -8; done
