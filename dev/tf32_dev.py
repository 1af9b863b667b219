"""Development check and timing of relattn_tf32's SH variant (K / V split once
per block in shared memory) against SH 0, on a CUDA GPU:

    PYTHONPATH=. python3 dev/tf32_dev.py [--check] [--time]
"""

from __future__ import annotations

import argparse
import os
import sys

import cupy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu_dev import graph_time_cupy  # noqa: E402

from relattn.backends import gpu  # noqa: E402


def make(B, H, qhw, khw, d, seed=0, rel=True):
    rs = cupy.random.RandomState(seed)
    Sq, Sk = qhw[0] * qhw[1], khw[0] * khw[1]
    q, k, v = (rs.standard_normal((B, H, S, d), dtype=cupy.float32) for S in (Sq, Sk, Sk))
    rh = 0.5 * rs.standard_normal((B, H, Sq, khw[0]), dtype=cupy.float32) if rel else None
    rw = 0.5 * rs.standard_normal((B, H, Sq, khw[1]), dtype=cupy.float32) if rel else None
    return q, k, v, rh, rw


def ref64(q, k, v, rh, rw, scale):
    qf, kf, vf = (x.astype(cupy.float64) for x in (q, k, v))
    lg = scale * cupy.matmul(qf, kf.transpose(0, 1, 3, 2))
    if rh is not None:
        B, H, Sq, _ = qf.shape
        lg += (rh[..., :, None].astype(cupy.float64) + rw[..., None, :]).reshape(B, H, Sq, -1)
    lg -= lg.max(-1, keepdims=True)
    p = cupy.exp(lg)
    p /= p.sum(-1, keepdims=True)
    return cupy.matmul(p, vf)


def plan(sh, q, k, v, rh, rw, khw, scale):
    """relattn_tf32 (3xTF32) forced, in the SH layout (where its head_dim allows:
    up to 96) or the per-warp one: run(q, k, v, rh, rw)."""
    hd = max(16, ((q.shape[-1] + 3) // 4 * 4 + 15) // 16 * 16)
    opts = {"sh": int(bool(sh) and hd <= 96)}
    return gpu.core_plan(q, k, v, rh, rw, khw, scale, kernel="tf32", kernel_options=opts)


def call(sh, q, k, v, rh, rw, khw, scale):
    return plan(sh, q, k, v, rh, rw, khw, scale)(q, k, v, rh, rw)


def check():
    cases = [  # B, H, q grid, k grid, d, rel
        (1, 2, (64, 64), (64, 64), 64, True), (1, 2, (64, 64), (64, 64), 80, True),
        (25, 3, (14, 14), (14, 14), 64, True), (2, 3, (9, 20), (5, 30), 64, True),
        (1, 2, (11, 13), (7, 9), 96, True), (1, 3, (3, 5), (6, 4), 40, False),
        (2, 2, (16, 16), (8, 64), 80, True), (1, 1, (1, 1), (1, 3), 16, True),
        (1, 2, (15, 20), (10, 30), 72, True), (1, 2, (33, 7), (33, 7), 128, True),
    ]
    bad = 0
    for i, (B, H, qhw, khw, d, rel) in enumerate(cases):
        q, k, v, rh, rw = make(B, H, qhw, khw, d, seed=i, rel=rel)
        scale = d ** -0.5
        for inf in (False, True):
            if inf:   # a non-finite key in one (batch, head): the SAFE pass
                k = k.copy()
                k[0, 0, min(3, k.shape[2] - 1), 1] = cupy.inf
            a = call(True, q, k, v, rh, rw, khw, scale)
            b = call(False, q, k, v, rh, rw, khw, scale)
            same = bool((a.view(cupy.uint32) == b.view(cupy.uint32)).all())
            r = ref64(q, k, v, rh, rw, scale)
            fin = cupy.isfinite(r)
            e = float(cupy.abs(cupy.where(fin, a - r, 0)).max() / max(float(cupy.abs(cupy.where(fin, r, 0)).max()), 1e-30))
            nanmatch = bool((cupy.isnan(a) == cupy.isnan(r)).all())
            ok = same and (e < 4e-6 or not bool(fin.any())) and nanmatch
            bad += not ok
            print(f"[check] B={B} H={H} q={qhw} k={khw} d={d} rel={rel} inf={inf}: same bits={same} "
                  f"err {e:.1e} nan match={nanmatch} {'ok' if ok else 'FAIL'}", flush=True)
    print(f"[check] failures: {bad}", flush=True)
    return bad


def timing(more=False):
    cases = [("SAM-B windowed", 25, 12, 14, 14, 64), ("SAM-B global", 1, 12, 64, 64, 64),
             ("SAM-H global", 1, 16, 64, 64, 80)]
    if more:   # other head dims: MViTv2-like (96, pooled keys), small heads
        cases += [("d96 56x56 -> 14x14", 2, 2, 56, 14, 96), ("d96 32x32", 1, 8, 32, 32, 96),
                  ("d48 64x64", 1, 16, 64, 64, 48), ("d32 64x64", 1, 16, 64, 64, 32)]
    for name, B, H, g, gk, d in cases:
        q, k, v, rh, rw = make(B, H, (g, g), (gk, gk), d)
        row = {}
        for rep in range(2):
            for sh in (0, 1):
                run = plan(sh, q, k, v, rh, rw, (gk, gk), d ** -0.5)
                row.setdefault(f"sh{sh}", []).append(graph_time_cupy(lambda: run(q, k, v, rh, rw)))
        print(f"[time] {name} core (3xTF32, graph ms): " + ", ".join(
            f"{kk}={'/'.join(f'{x:.4f}' for x in vv)}" for kk, vv in row.items()), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--more", action="store_true", help="also time other head dims")
    a = ap.parse_args()
    bad = check() if a.check else 0
    if a.time:
        timing(a.more)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
