"""How SAM's windows fill the GPU: graph-timed fused rel_pos_attention (bf16,
14 x 14 windows, 12 heads) for several window counts, persistent grid sizes
(relattn_ws's ``persist`` option) and relattn_ws configurations (forced with
``relattn.plan(..., kernel="ws", kernel_options=...)``), beside no-bias SDPA on
the same shape. On a Hopper GPU:

    PYTHONPATH=$PWD python3 dev/win_tail_dev.py [nc,bn,st,pp,rg,mb ...]
    ... win_tail_dev.py --heat    (windows after seconds of global calls, with clocks)
    ... win_tail_dev.py --rows    (the cost of each window's fourth, 4-row tile)

A window has four 64-row tiles (the fourth holds 4 of its 196 rows), so 25
windows x 12 heads make 1,200 tiles for 132 SMs x 3 blocks = 396 persistent
blocks: 12 of them run a fourth tile. Times that grow by more than the window
count between 24 and 26 windows show that tail.
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


def row(nw, heads=12, d=64, runs=(("default", None),), qg=(14, 14)):
    """One line: the fused call on nw windows (q grid qg, 14 x 14 keys) under
    each (label, relattn_ws options or None: the planner's choice) of runs,
    beside no-bias SDPA on the same shapes."""
    q, k, v, _, _ = make(nw, heads, qg, (14, 14), d, "bfloat16")
    th, tw = tables(cupy.random.RandomState(0), qg, (14, 14), d, "bfloat16")
    tq = torch.randn(nw, heads, qg[0] * qg[1], d, device="cuda", dtype=torch.bfloat16)
    tk, tv = (torch.randn(nw, heads, 196, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    f = graph_time_torch(lambda: F.scaled_dot_product_attention(tq, tk, tv))
    out = []
    for label, options in runs:
        p = relattn.plan(q, k, v, th, tw, qg, (14, 14), backend="cupy", kernel="ws" if options else None,
                         kernel_options=options)
        p(q, k, v, th, tw)
        t = graph_time_cupy(lambda: p(q, k, v, th, tw))
        out.append(f"{label} {t:.4f} ({t / f:.3f}x)")
    print(f"[tail] {nw} windows x {heads} heads, q {qg[0]}x{qg[1]}, d={d}: sdpa {f:.4f}; " + ", ".join(out),
          flush=True)


def _clocks():
    import subprocess

    q = "clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active"
    return subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()


def heat(seconds=8.0):
    """SAM-B windowed before and after `seconds` of back-to-back SAM-B global
    calls, with the SM clock, temperature, power and throttle reasons."""
    import time

    import cupy

    print(f"[heat] idle: {_clocks()}", flush=True)
    row(25)
    q, k, v, _, _ = make(1, 12, (64, 64), (64, 64), 64, "bfloat16")
    th, tw = tables(cupy.random.RandomState(0), (64, 64), (64, 64), 64, "bfloat16")
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(200):
            relattn.rel_pos_attention(q, k, v, th, tw, (64, 64))
        cupy.cuda.Device().synchronize()
        n += 200
    print(f"[heat] after {n} global calls: {_clocks()}", flush=True)
    row(25)
    print(f"[heat] then: {_clocks()}", flush=True)
    time.sleep(5)
    print(f"[heat] 5 s idle: {_clocks()}", flush=True)
    row(25)


def rows_cost(nw=25, heads=12, d=64):
    """What the fourth, 4-row tile of each 196-row window costs: q grids of 192
    rows (three tiles), 196 (four, the last with 4 rows) and 256 (four full
    tiles) against the same 14 x 14 key grid. A 192-row time near 3/4 of the
    196-row one says a cheaper form of the remainder rows would pay that much."""
    for qg in ((12, 16), (14, 14), (16, 16)):
        row(nw, heads, d, qg=qg)


def main(cfgs):
    if cfgs[:1] == ["--heat"]:
        heat()
        return
    if cfgs[:1] == ["--rows"]:
        rows_cost()
        rows_cost(heads=16, d=80)
        return
    for nw in (24, 25, 26, 33):
        row(nw)
    grids = [("default", None)] + [(f"grid {g}", {"persist": g}) for g in (264, 300, 400, 1200)]
    row(25, runs=grids)
    if cfgs:
        runs = [("default", None)] + [(c, _options(c)) for c in cfgs]
        row(25, runs=runs)
        row(25, heads=16, d=80, runs=runs)


def _options(cfg: str) -> dict:
    """"nc,bn,st,pp,rg[,mb]" -> relattn_ws's kernel_options."""
    names = ("nc", "bn", "stages", "pp", "rg", "mb")
    return dict(zip(names, (int(x) for x in cfg.split(","))))


if __name__ == "__main__":
    main(sys.argv[1:])
