"""Where the host time of a GPU call goes (dev aid): cProfile over repeated calls.

    python bench/host_profile.py [window|global|1280|layer-window|layer-global] [n] [bfloat16|float32]
"""
import cProfile
import pstats
import sys
import time

import cupy
import numpy as np

import relattn

case = sys.argv[1] if len(sys.argv) > 1 else "window"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 300
rng = np.random.default_rng(0)
dt = cupy.dtype("bfloat16") if hasattr(cupy, "bfloat16") else None
try:
    import ml_dtypes
    bf16 = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
    bf16 = np.float16


DT = {"bfloat16": bf16, "float32": np.float32}[sys.argv[3] if len(sys.argv) > 3 else "bfloat16"]


def dev(x):
    return cupy.asarray(x.astype(np.float32)).astype(DT)


if case.startswith("layer"):
    ws = 14 if case == "layer-window" else 0
    attn = relattn.Attention(768, 12, use_rel_pos=True, input_size=(64, 64) if not ws else (14, 14),
                             rel_pos_zero_init=False, rng=0, dtype="bfloat16", window_size=ws)
    x = dev(rng.standard_normal((1, 64, 64, 768)))
    call = lambda: attn(x)
else:
    B, g = {"window": (25, 14), "global": (1, 64), "1280": (1, 80)}[case]
    q, k, v = (dev(rng.standard_normal((B, 12, g * g, 64))) for _ in range(3))
    L = 127 if case != "window" else 27
    th = cupy.asarray(rng.standard_normal((L, 64)).astype(np.float32))
    tw = cupy.asarray(rng.standard_normal((L, 64)).astype(np.float32))
    call = lambda: relattn.rel_pos_attention(q, k, v, th, tw, (g, g))
for _ in range(10):
    call()
cupy.cuda.Device().synchronize()
t0 = time.perf_counter()
for _ in range(n):
    call()
t1 = time.perf_counter()
cupy.cuda.Device().synchronize()
t2 = time.perf_counter()
print(f"{case}: host time per call {1e3 * (t1 - t0) / n:.3f} ms (queue only), {1e3 * (t2 - t0) / n:.3f} ms with the final sync")
pr = cProfile.Profile()
pr.enable()
for _ in range(n):
    call()
pr.disable()
cupy.cuda.Device().synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(22)
