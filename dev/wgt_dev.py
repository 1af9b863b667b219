"""relattn_wgt (3xTF32 on wgmma) against relattn_tf32 on a Hopper GPU: errors
against float64 and graph-timed core calls (terms given), one line per case.

    python3 dev/wgt_dev.py [--cases B-window,B-global] [--kernels tf32,wgt,wgt:32]

Each entry of --kernels is a kernel family forced through ``kernel=``, with an
optional key tile (``wgt:32``: ``kernel_options={"bn": 32}``).
"""

from __future__ import annotations

import argparse
import os
import sys

import cupy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu_dev import graph_time_cupy  # noqa: E402

from relattn.backends import gpu  # noqa: E402

CASES = {"B-window": (25, 12, (14, 14), 64), "B-global": (1, 12, (64, 64), 64), "H-window": (25, 16, (14, 14), 80), "H-global": (1, 16, (64, 64), 80),
         "small": (2, 3, (9, 11), 64), "hd32": (4, 4, (14, 14), 32)}


def ref64(q, k, v, rh, rw, kg, scale):
    q, k, v, rh, rw = (x.astype(cupy.float64) for x in (q, k, v, rh, rw))
    s = scale * (q @ k.swapaxes(-1, -2))
    B, H, Sq, _ = q.shape
    s = s.reshape(B, H, Sq, kg[0], kg[1]) + rh[..., :, None] + rw[..., None, :]
    s = s.reshape(B, H, Sq, -1)
    p = cupy.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="B-window,B-global")
    ap.add_argument("--kernels", default="tf32,wgt")
    a = ap.parse_args()
    rs = cupy.random.RandomState(0)
    for name in a.cases.split(","):
        B, H, g, d = CASES[name]
        S = g[0] * g[1]
        q, k, v = (rs.standard_normal((B, H, S, d), dtype=cupy.float32) for _ in range(3))
        rh = rs.standard_normal((B, H, S, g[0]), dtype=cupy.float32)
        rw = rs.standard_normal((B, H, S, g[1]), dtype=cupy.float32)
        ref = ref64(q, k, v, rh, rw, g, d ** -0.5)
        line = []
        for spec in a.kernels.split(","):
            family, _, bn = spec.partition(":")
            run = gpu.core_plan(q, k, v, rh, rw, g, d ** -0.5, kernel=family,
                                kernel_options={"bn": int(bn)} if bn else None)
            out = run(q, k, v, rh, rw)
            err = float(cupy.linalg.norm(out - ref) / cupy.linalg.norm(ref))
            t = graph_time_cupy(lambda: run(q, k, v, rh, rw))
            line.append(f"{spec}: {t:.4f} ms err {err:.2e}")
        print(f"{name} {B}x{H}x{S}x{d}: " + " | ".join(line), flush=True)


if __name__ == "__main__":
    main()
