"""The `Attention` layer's bf16 training step (vjp + pullback, SAM-B windowed and global)
by kernel: PyTorch's profiler records every kernel launched on the device, CuPy's and
cuBLAS's included, so the table shows where the step's GPU time goes (ms per step =
the table's total over the steps profiled). With --host: the step's time back to back
and where its Python goes instead (cProfile over the steps: calls, launches,
allocations), for an eager step the host bounds.

    python3 dev/step_kernels_dev.py [steps]          # default 5 eager steps per case
    python3 dev/step_kernels_dev.py --host [steps]   # default 30

Needs CuPy, ml_dtypes and PyTorch with CUDA (only for its profiler; not with --host).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import cupy
import ml_dtypes
import numpy as np

import relattn

BF16 = np.dtype(ml_dtypes.bfloat16)
CASES = (("SAM-B windowed", (14, 14), 14), ("SAM-B global", (64, 64), 0))   # a 64 x 64 token map


def main(steps: int, host: bool = False) -> None:
    rng = np.random.default_rng(2)
    x = cupy.asarray(rng.standard_normal((1, 64, 64, 768), dtype=np.float32).astype(BF16))
    dy = cupy.asarray(rng.standard_normal((1, 64, 64, 768), dtype=np.float32).astype(BF16))
    for name, grid, window in CASES:
        layer = relattn.Attention(768, 12, use_rel_pos=True, rel_pos_zero_init=False, input_size=grid,
                                  window_size=window, dtype=BF16, rng=0)

        def step():
            y, pullback = layer.vjp(x)
            pullback(dy)

        for _ in range(3):
            step()
        cupy.cuda.Device().synchronize()
        if host:
            _host_profile(name, step, steps)
            continue
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            cupy.cuda.Device().synchronize()
        print(f"==== {name}: {steps} eager steps, kernels by GPU time")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))


def _host_profile(name, step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    cupy.cuda.Device().synchronize()
    per_step = (time.perf_counter() - start) / steps * 1e3
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    cupy.cuda.Device().synchronize()
    print(f"==== {name}: {per_step:.3f} ms per eager step back to back; cProfile over {steps} steps")
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats(order).print_stats(35)
        print(text.getvalue())


if __name__ == "__main__":
    args = sys.argv[1:]
    host = "--host" in args
    args = [a for a in args if a != "--host"]
    main(int(args[0]) if args else (30 if host else 5), host)
