"""Development check and timing of the small-grid kernel relattn_win with the
relative terms fused (FUSE 1, RELATTN_WIN_FUSE), on the device.

    PYTHONPATH=. python3 bench/win_dev.py [--check] [--time] [--ncu]
"""

from __future__ import annotations

import argparse
import os
import sys

import cupy
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu_dev import graph_time_env, graph_time_torch  # noqa: E402
from sm90_dev import err, make, reference  # noqa: E402
from ws_dev import _tables, fused_calls  # noqa: E402

import relattn  # noqa: E402
from relattn import functional  # noqa: E402
from relattn.backends import cupy_gpu as gpu  # noqa: E402

CASES = [  # B, H, q grid, k grid, d, table rows (None: 2 * max - 1), RELATTN_WIN_SPB
    (25, 12, (14, 14), (14, 14), 64, None, None),   # SAM-B windows
    (3, 4, (14, 14), (14, 14), 80, None, None),     # SAM-H windows
    (2, 3, (14, 14), (14, 14), 72, None, None),
    (2, 3, (14, 14), (14, 14), 64, 20, None),       # resized tables
    (2, 3, (7, 9), (14, 14), 64, None, None),       # q grid != k grid
    (2, 3, (16, 16), (5, 11), 64, None, None),
    (1, 2, (1, 1), (1, 1), 64, None, None),
    (1, 2, (3, 5), (4, 2), 64, None, None),         # < 4 slices: unstaged
    (2, 3, (14, 14), (14, 14), 64, None, 4),        # 4 groups per window
    (2, 3, (14, 14), (14, 14), 64, None, 5),        # 5 slices per block: second round partial
    (2, 3, (16, 16), (16, 16), 56, None, None),
]


def check():
    bad = 0
    for dt in ("bfloat16", "float16"):
        for i, (B, H, qhw, khw, d, rows, spb) in enumerate(CASES):
            if spb:
                os.environ["RELATTN_WIN_SPB"] = str(spb)
            q, k, v, _, _ = make(B, H, qhw, khw, d, dt, seed=200 + i)
            th, tw = _tables(cupy.random.RandomState(i), qhw, khw, d, dt, rows)
            fused, first, ref, same = fused_calls(q, k, v, th, tw, qhw, khw, d)
            e = err(first, ref)
            # the unfused path (terms kernel + relattn_win FUSE 0) on the same inputs
            os.environ["RELATTN_WIN_FUSE"] = "0"
            functional._plans.clear()
            e0 = err(relattn.rel_pos_attention(q, k, v, th, tw, qhw, khw), ref)
            os.environ.pop("RELATTN_WIN_FUSE")
            os.environ.pop("RELATTN_WIN_SPB", None)
            tol = 8e-3 if dt == "bfloat16" else 2e-3
            ok = fused and same and e < tol and e0 < tol
            bad += not ok
            print(f"[win] {dt:8} B={B} H={H} q={qhw} k={khw} d={d} rows={rows} spb={spb}: fused={fused} "
                  f"same bits={same} err {e:.2e} (unfused {e0:.2e}) {'ok' if ok else 'FAIL'}", flush=True)
    # given rel_h / rel_w (FUSE 0) against the dense reference
    for dt in ("bfloat16", "float16"):
        q, k, v, rh, rw = make(25, 12, (14, 14), (14, 14), 64, dt, seed=3)
        e = err(gpu.attention(q, k, v, rh, rw, (14, 14), 0.125), reference(q, k, v, rh, rw, (14, 14), 0.125))
        ok = e < (8e-3 if dt == "bfloat16" else 2e-3)
        bad += not ok
        print(f"[win] given terms {dt}: err {e:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    print(f"[win] failures: {bad}", flush=True)
    return bad


def timing():
    for name, B, H, d in (("SAM-B windowed", 25, 12, 64), ("SAM-H windowed", 25, 16, 80)):
        g = (14, 14)
        q, k, v, _, _ = make(B, H, g, g, d, "bfloat16")
        th, tw = _tables(cupy.random.RandomState(0), g, g, d, "bfloat16")
        row = {}
        for label, env in (("fused", {}), ("terms+win", {"RELATTN_WIN_FUSE": "0"})):
            functional._plans.clear()
            row[label] = graph_time_env(lambda: relattn.rel_pos_attention(q, k, v, th, tw, g), env)
        tq, tk, tv = (torch.randn(B, H, 196, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        row["flash"] = graph_time_torch(lambda: F.scaled_dot_product_attention(tq, tk, tv))
        print(f"[time-win] {name}: " + ", ".join(f"{kk}={vv:.4f}" for kk, vv in row.items())
              + f"  fused/flash={row['fused'] / row['flash']:.2f}", flush=True)


def profile():
    """Ten fused SAM-B windowed calls (for ncu / nsys)."""
    g = (14, 14)
    q, k, v, _, _ = make(25, 12, g, g, 64, "bfloat16")
    th, tw = _tables(cupy.random.RandomState(0), g, g, 64, "bfloat16")
    for _ in range(10):
        relattn.rel_pos_attention(q, k, v, th, tw, g)
    cupy.cuda.runtime.deviceSynchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    bad = check() if a.check else 0
    if a.time:
        timing()
    if a.profile:
        profile()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
