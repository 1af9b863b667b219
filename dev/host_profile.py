"""Where the host time of a GPU call goes, per case and dtype (on a CUDA GPU).

    python dev/host_profile.py [window|global|1280|layer-window|layer-global] [n] [bfloat16|float32]

Timing and profiling helpers are dispatch_dev.py's (which covers the SAM-B bf16 calls).
"""
import os
import sys
import time

import cupy
import numpy as np
import ml_dtypes

import relattn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dispatch_dev import host_only, profile, wall  # noqa: E402

case = sys.argv[1] if len(sys.argv) > 1 else "window"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 300
DT = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[sys.argv[3] if len(sys.argv) > 3 else "bfloat16"]
rng = np.random.default_rng(0)


def dev(x):
    return cupy.asarray(x.astype(np.float32)).astype(DT)


if case.startswith("layer"):
    ws = 14 if case == "layer-window" else 0
    attn = relattn.Attention(768, 12, use_rel_pos=True, input_size=(64, 64) if not ws else (14, 14),
                             rel_pos_zero_init=False, rng=0, dtype="bfloat16", window_size=ws)
    x = dev(rng.standard_normal((1, 64, 64, 768)))
    call = lambda: attn(x)  # noqa: E731
else:
    B, g = {"window": (25, 14), "global": (1, 64), "1280": (1, 80)}[case]
    q, k, v = (dev(rng.standard_normal((B, 12, g * g, 64))) for _ in range(3))
    L = 127 if case != "window" else 27
    th = cupy.asarray(rng.standard_normal((L, 64)).astype(np.float32))
    tw = cupy.asarray(rng.standard_normal((L, 64)).astype(np.float32))
    call = lambda: relattn.rel_pos_attention(q, k, v, th, tw, (g, g))  # noqa: E731

def back_to_back(fn, n):
    """ms per call when n calls are queued and synchronised once (the GPU-bound rate)."""
    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    cupy.cuda.Device().synchronize()
    return (time.perf_counter() - t0) / n * 1e3


print(f"{case}: host time per call {host_only(call, n):.3f} ms (queue only), {back_to_back(call, n):.3f} ms "
      f"back to back, {wall(call):.3f} ms per synchronised call")
profile(call, n, top=30, sorts=("tottime", "cumulative"))
