"""Graph-timed fused rel_pos_attention (bf16) on SAM's four attention shapes, one
line per run, for A/B rounds on one GPU (two package trees alternate; make the old
one with `git archive <commit> relattn | tar -x -C <old-tree>`):

    for r in 1 2 3; do for side in old new; do
      PYTHONPATH=<tree of side> python3 dev/ab_fused.py $side; done; done

AB_CASES picks cases and their order (repeats allowed), e.g. "B-window,H-global,B-window"
to see whether the window kernel runs slower right after a global case (on an H200 it
has taken 0.0263-0.0303 ms in such mixed runs, 0.0265-0.0269 alone).
"""

from __future__ import annotations

import os
import sys

import cupy
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu_dev import graph_time_cupy, graph_time_torch, make, tables  # noqa: E402

import relattn  # noqa: E402

CASES = (("B-global", 1, 12, 64, 64), ("H-global", 1, 16, 64, 80), ("B-window", 25, 12, 14, 64), ("H-window", 25, 16, 14, 80))


def main(label):
    out = []
    pick = os.environ.get("AB_CASES")   # e.g. "B-window,H-global,B-window": these, in this order
    by_name = {c[0]: c for c in CASES}
    for name, B, H, g, d in ([by_name[n] for n in pick.split(",")] if pick else CASES):
        q, k, v, _, _ = make(B, H, (g, g), (g, g), d, "bfloat16")
        th, tw = tables(cupy.random.RandomState(0), (g, g), (g, g), d, "bfloat16")
        t = graph_time_cupy(lambda: relattn.rel_pos_attention(q, k, v, th, tw, (g, g)))
        tq, tk, tv = (torch.randn(B, H, g * g, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        f = graph_time_torch(lambda: F.scaled_dot_product_attention(tq, tk, tv))
        out.append(f"{name} {t:.4f} ({t / f:.3f}x)")
    print(f"{label}: " + ", ".join(out), f"[{relattn.__file__.split('/relattn/')[0][-12:]}]", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run")
