#!/usr/bin/env bash
# Every GPU test, in five parallel pytest processes (kernel compiles are CPU-bound), with
# a summary per group (the CPU-only tests of the files named here run too). From the repository root:
#   bash dev/gpu_tests.sh
#   LIMIT=300 bash dev/gpu_tests.sh       # seconds per group (default 560)
#   WHEELS=wheels bash dev/gpu_tests.sh   # offline machine: install the wheels in wheels/ first
set -u
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/relattn-site "$WHEELS"/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/relattn-site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name --format=csv,noheader
L=${LIMIT:-560}
P="python3 -m pytest -q -p no:cacheprovider -rfEs"   # failures, errors and skips in the summary
LOG=${LOG:-$(mktemp -d)}   # LOG=dir keeps the five logs there
timeout $L $P tests/test_gpu.py -k "sm90_kernel_configs" > $LOG/t1.log 2>&1 &
G2="tests/test_gpu.py tests/test_gpu_module.py tests/test_gpu_graphs.py tests/test_docs.py tests/test_cli.py"
timeout $L $P $G2 -k "not sm90_kernel_configs" > $LOG/t2.log 2>&1 &
BWD="tests/test_vjp_gpu.py tests/test_torch_bridge.py tests/test_layer_vjp.py tests/test_jax_bridge.py"
timeout $L $P tests -k "cupy or plans or gpu_families" $(for f in $G2; do printf -- "--ignore=%s " $f; done) --ignore=tests/test_gpu_ws.py --ignore=tests/test_gpu_win.py --ignore=tests/test_gpu_wgt.py $(for f in $BWD; do printf -- "--ignore=%s " $f; done) > $LOG/t3.log 2>&1 &
timeout $L $P tests/test_gpu_ws.py tests/test_gpu_win.py tests/test_gpu_wgt.py > $LOG/t4.log 2>&1 &
timeout $L $P $BWD > $LOG/t5.log 2>&1 &   # the backward and the autodiff bridges
wait
for f in $LOG/t1.log $LOG/t2.log $LOG/t3.log $LOG/t4.log $LOG/t5.log; do echo "== $f"; grep -E "passed|failed|error|FAILED|ERROR|SKIPPED" $f | tail -12; done
