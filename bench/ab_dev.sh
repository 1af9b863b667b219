#!/usr/bin/env bash
# A/B on the device: the committed package against the working tree, alternating runs on
# one machine (CUDA-graph times are comparable only within one machine). Prepare here:
#   rm -rf bench/_oldtree && mkdir -p bench/_oldtree/bench && git archive HEAD relattn | tar -x -C bench/_oldtree
#   cp bench/bench_module.py bench/_oldtree/bench/      # LAYER=1 only
# then run `bash bench/ab_dev.sh` on the device with .whl carried (FP32=1: float32 cases too).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
B="python3 -m relattn bench --backend cupy --no-torch"
for rep in 1 2; do
  for side in old new; do
    if [ $side = old ]; then P=/tmp/site:$PWD/bench/_oldtree; R=bench/_oldtree/bench; else P=/tmp/site:$PWD; R=bench; fi
    PYTHONPATH=$P $B --dtype bfloat16 --case ${BF16CASES:-sam-b-global --case sam-b-window --case sam-h-global} 2>&1 | grep -E "^sam" | sed "s/^/$side: /"
    [ -n "${FP32:-}" ] && PYTHONPATH=$P $B --dtype float32 --case ${FP32CASES:-sam-b-global --case sam-h-global} 2>&1 | grep -E "^sam" | sed "s/^/$side: /"
    [ -n "${LAYER:-}" ] && PYTHONPATH=/tmp/site python3 $R/bench_module.py --device cuda --dtype bfloat16 --runs 5 2>&1 | grep -E "global|window" | tail -2 | sed "s/^/$side: /"
  done
done
