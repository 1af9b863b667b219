"""Where the wall time of one GPU call goes (Python dispatch vs GPU), on a CUDA GPU.

    PYTHONPATH=. python3 dev/dispatch_dev.py
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time

import numpy as np
import cupy

import relattn


def wall(fn, n=50):
    fn()
    cupy.cuda.get_current_stream().synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        cupy.cuda.get_current_stream().synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def host_only(fn, n=200):
    """Median host time per call without waiting for the GPU (launch-side cost)."""
    fn()
    cupy.cuda.get_current_stream().synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n
    cupy.cuda.get_current_stream().synchronize()
    return t * 1e3


def profile(fn, n=200, top=22, sorts=("tottime",)):
    fn()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    cupy.cuda.get_current_stream().synchronize()
    for key in sorts:
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(top)
        print(s.getvalue()[-7000:])


def main():
    bf16 = cupy.dtype("bfloat16")
    rng = np.random.default_rng(0)
    q, k, v = (cupy.asarray(rng.standard_normal((1, 12, 4096, 64), dtype=np.float32)).astype(cupy.float16)
               for _ in range(3))
    qb, kb, vb = (relattn._arrays.astype(a, bf16) for a in (q, k, v))
    th = cupy.asarray(rng.standard_normal((127, 64), dtype=np.float32))
    tw = cupy.asarray(rng.standard_normal((127, 64), dtype=np.float32))
    thb, twb = relattn._arrays.astype(th, bf16), relattn._arrays.astype(tw, bf16)

    def call():
        return relattn.rel_pos_attention(qb, kb, vb, thb, twb, (64, 64))

    print(f"rel_pos_attention SAM-B bf16: wall {wall(call):.3f} ms, host-side {host_only(call):.3f} ms")
    profile(call)
    layer = relattn.Attention(768, 12, use_rel_pos=True, rel_pos_zero_init=False, input_size=(64, 64),
                              dtype="bfloat16", rng=0)
    x = relattn._arrays.astype(cupy.asarray(rng.standard_normal((1, 64, 64, 768), dtype=np.float32)), bf16)
    layer_call = lambda: layer(x)
    print(f"Attention SAM-B global bf16: wall {wall(layer_call):.3f} ms, host-side {host_only(layer_call):.3f} ms")
    profile(layer_call)
    xw = relattn._arrays.astype(cupy.asarray(rng.standard_normal((1, 64, 64, 768), dtype=np.float32)), bf16)
    layer_w = relattn.Attention(768, 12, use_rel_pos=True, rel_pos_zero_init=False, input_size=(14, 14),
                                window_size=14, dtype="bfloat16", rng=0)
    lw = lambda: layer_w(xw)
    print(f"Attention SAM-B windowed bf16: wall {wall(lw):.3f} ms, host-side {host_only(lw):.3f} ms")
    profile(lw)


if __name__ == "__main__":
    main()
