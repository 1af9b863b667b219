#!/usr/bin/env bash
# The GPU checks of the patches here, with all four applied to a copy of the tree
# (/tmp/relattn-patched), in device runs of under ten minutes each. From the repository root:
#   bash dev/patches/check.sh tests     # the GPU tests the patches name, on the patched tree
#   bash dev/patches/check.sh ab        # ws_fix_kernel: three A/B rounds of the forward, this tree against the patched one
#   bash dev/patches/check.sh profile   # the backward's stages (both trees) and the training step (patched)
# On a machine without the test dependencies: put their wheels in .whl/ first
# (pip download --no-deps -d .whl hypothesis sortedcontainers attrs).
set -u
ROOT=$PWD
P=/tmp/relattn-patched
rm -rf $P && mkdir -p $P
tar -C "$ROOT" --exclude=./.git --exclude=./.whl --exclude=./.stage -cf - . | tar -C $P -xf -
for name in ws_fix_kernel bf16_raw_casts dq_small_terms small_terms_pullback; do
  # -C1: applied in this order outside a git checkout (two of them touch neighbouring lines of a docs table)
  (cd $P && git apply -C1 "$ROOT/dev/patches/$name.patch") || { echo "$name.patch does not apply"; exit 1; }
done
SITE=""
if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/relattn-site "$ROOT"/.whl/*.whl >/dev/null 2>&1
  SITE=/tmp/relattn-site:
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
S=$SECONDS
case "${1:-tests}" in
tests)
  cd $P && PYTHONPATH=$SITE$P timeout 560 python3 -m pytest -q -p no:cacheprovider -rfEs -n 8 \
    tests/test_vjp_gpu.py tests/test_layer_vjp.py tests/test_gpu_graphs.py tests/test_masked.py \
    tests/test_gpu_ws.py tests/test_gpu_module.py "tests/test_gpu.py::test_sm90_head_dim_80_key_rows_of_48" \
    2>&1 | tail -25 ;;
ab)
  for round in 1 2 3; do
    for side in head patched; do
      T=$ROOT; [ $side = patched ] && T=$P
      AB_CASES=H-global,B-global,B-window PYTHONPATH=$SITE$T timeout 80 python3 "$ROOT/dev/ab_fused.py" "$side" 2>&1 | tail -1
    done
  done ;;
profile)
  for side in head patched; do
    T=$ROOT; [ $side = patched ] && T=$P
    echo "== dev/bwd_profile_dev.py, $side ($((SECONDS - S)) s)"
    PYTHONPATH=$SITE$T timeout 170 python3 "$ROOT/dev/bwd_profile_dev.py" 2>&1 | tail -30
  done
  echo "== bench/bench_backward.py --layer, patched ($((SECONDS - S)) s)"
  cd $P && PYTHONPATH=$SITE$P timeout 200 python3 bench/bench_backward.py --device cuda --dtype bfloat16 --layer \
    2>&1 | tail -20 ;;
*)
  echo "usage: bash dev/patches/check.sh tests|ab|profile"; exit 2 ;;
esac
echo "== done ($((SECONDS - S)) s)"
