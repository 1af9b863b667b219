"""One SAM-B global float32 call per mode, for a profiler (dev aid).

    ncu --kernel-name regex:relattn_tf32 --launch-skip 2 --launch-count 1 python bench/tf32_probe.py 3xtf32
"""
import sys

import cupy
import numpy as np

import relattn

mode = sys.argv[1] if len(sys.argv) > 1 else "3xtf32"
rng = np.random.default_rng(0)
B, H, S, D = 1, 12, 4096, 64
q, k, v = (cupy.asarray(rng.standard_normal((B, H, S, D), dtype=np.float32)) for _ in range(3))
rh = cupy.asarray(rng.standard_normal((127, D), dtype=np.float32) * 0.1)
rw = cupy.asarray(rng.standard_normal((127, D), dtype=np.float32) * 0.1)
with relattn.gpu_float32_mode(mode):
    for _ in range(4):
        out = relattn.rel_pos_attention(q, k, v, rh, rw, (64, 64), (64, 64))
cupy.cuda.Device().synchronize()
print(mode, float(abs(out).max()))
