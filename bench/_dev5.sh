set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py -k "whole_key_row or sm90_is_chosen or float32_tensor_core_modes" 2>&1 | tail -3
python3 bench/gpu_probe.py splits 2>&1 | tail -12
python3 -m relattn bench --backend cupy --dtype bfloat16 --case sam-b-global-1280px --case sam-b-window 2>&1 | grep -E "cupy|sdpa|seed"
ncu --kernel-name regex:relattn --launch-skip 6 --launch-count 2 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats python3 bench/gpu_probe.py window bfloat16 2>&1 | grep -v "^==PROF==" | grep -E "relattn|Duration|Throughput|Registers|Shared Memory Config|Dynamic Shared|Block Limit|Achieved Occupancy|Grid Size|Waves|Warp Cycles|Stall|stalled|^    [A-Z]" | head -90
