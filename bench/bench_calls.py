"""Per-call cost on the GPU: relattn's plain call, its plan and its layer,
beside PyTorch timed in the same run.

    python bench/bench_calls.py [--calls 40] [--json out.json]

For each case (bf16, SAM-B windowed 25 x 14x14 and global 64x64, SAM-H
global): per call with ``--calls`` calls back to back then one sync; one
call plus a sync (median); the host time of issuing one call; the GPU time
of the same call replayed as a CUDA graph. Anchors: PyTorch SDPA *without*
bias (default dispatch: cuDNN's fused attention on Hopper) and, for the
layer, the PyTorch seed module (S x S mask + SDPA), same weights.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

try:
    import torch
except ImportError:   # the relattn rows still print
    torch = None
import cupy

import relattn
from relattn import _bench

CASES = {   # name: (B, grid, heads, head_dim)
    "sam-b-window": (25, (14, 14), 12, 64),
    "sam-b-global": (1, (64, 64), 12, 64),
    "sam-h-global": (1, (64, 64), 16, 80),
}


def sync():
    cupy.cuda.get_current_stream().synchronize()


def back_to_back(fn, calls, sync_fn, rounds=7):
    fn()
    sync_fn()
    best = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        sync_fn()
        best.append((time.perf_counter() - t) / calls)
    return statistics.median(best)


def one_plus_sync(fn, sync_fn, runs=41):
    times = []
    for _ in range(runs):
        sync_fn()
        t = time.perf_counter()
        fn()
        sync_fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def row(name, what, fn, calls, sync_fn, graph=None):
    r = dict(case=name, what=what, per_call_ms=back_to_back(fn, calls, sync_fn) * 1e3,
             one_sync_ms=one_plus_sync(fn, sync_fn) * 1e3,
             host_ms=_bench.host_time(fn, sync_fn, runs=41) * 1e3)
    r["graph_ms"] = None if graph is None else graph * 1e3
    g = "-" if r["graph_ms"] is None else f"{r['graph_ms']:.4f}"
    print(f"{name:14s} {what:34s} {r['per_call_ms']:9.4f} {r['one_sync_ms']:9.4f} {r['host_ms']:9.4f} {g:>9}",
          flush=True)
    return r


def torch_graph(fn):
    return _bench._torch_graph_time(torch, fn)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=40, help="calls back to back per timing (default 40)")
    ap.add_argument("--case", action="append", choices=list(CASES), help="case (repeatable; default all)")
    ap.add_argument("--no-layer", action="store_true", help="skip the Attention layer rows")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    print(f"{cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, relattn {relattn.__file__}, "
          f"torch {getattr(torch, '__version__', '-')}, cupy {cupy.__version__}")
    print(f"{'case':14s} {'what':34s} {'per call':>9} {'1+sync':>9} {'host':>9} {'graph':>9}   (ms)")
    rows = []
    for name in args.case or CASES:
        B, grid, heads, hd = CASES[name]
        S = grid[0] * grid[1]
        rng = np.random.default_rng(0)
        q, k, v = (cupy.asarray(rng.standard_normal((B, heads, S, hd), dtype=np.float32).astype(relattn_bf16()))
                   for _ in range(3))
        th, tw = (cupy.asarray((rng.standard_normal((2 * g - 1, hd), dtype=np.float32) * 0.1).astype(relattn_bf16()))
                  for g in grid)

        def plain():
            return relattn.rel_pos_attention(q, k, v, th, tw, grid, grid)

        rows.append(row(name, "rel_pos_attention", plain, args.calls, sync, _bench.graph_time(plain)))
        if hasattr(relattn, "plan"):
            p = relattn.plan(q, k, v, th, tw, grid, grid)

            def planned():
                return p(q, k, v, th, tw)

            rows.append(row(name, "plan call", planned, args.calls, sync, _bench.graph_time(planned)))
            print(f"{'':14s} kernel: {p.kernel}")
        if torch is not None:
            tq, tk, tv = (torch.from_dlpack(a) for a in (q, k, v))
            F = torch.nn.functional

            def sdpa():
                return F.scaled_dot_product_attention(tq, tk, tv)

            rows.append(row(name, "torch SDPA, no bias (default)", sdpa, args.calls, torch.cuda.synchronize,
                            torch_graph(sdpa)))
        if args.no_layer:
            continue
        dim = heads * hd
        window = grid[0] if name.endswith("window") else 0
        side = 64 if window else grid[0]
        layer = relattn.Attention(dim, heads, use_rel_pos=True, input_size=(grid[0], grid[1]), rng=0,
                                  window_size=window)
        x = cupy.asarray(rng.standard_normal((1, side, side, dim), dtype=np.float32).astype(relattn_bf16()))
        rows.append(row(name, "Attention layer", lambda: layer(x), args.calls, sync, _bench.graph_time(lambda: layer(x))))
        capture = getattr(layer, "capture", None)
        if capture is not None:
            g = capture(x)
            rows.append(row(name, "Attention layer, captured graph", lambda: g(x), args.calls, sync))
        if torch is not None:
            from bench_module import seed_module   # noqa: E402 - the seed card's module

            seed = seed_module(torch, dim, heads, grid).cuda().to(torch.bfloat16)
            tx = torch.from_dlpack(x)
            if window:
                pad = -side % window
                n = (side + pad) // window

                def seed_call():   # SAM's block: pad, partition, attend, unpartition, crop
                    xp = torch.nn.functional.pad(tx, (0, 0, 0, pad, 0, pad))
                    xw = xp.view(1, n, window, n, window, dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, dim)
                    y = seed(xw).view(1, n, n, window, window, dim).permute(0, 1, 3, 2, 4, 5)
                    return y.reshape(1, n * window, n * window, dim)[:, :side, :side].contiguous()
            else:
                def seed_call():
                    return seed(tx)
            with torch.no_grad():
                rows.append(row(name, "torch seed module", seed_call, args.calls, torch.cuda.synchronize,
                                torch_graph(seed_call)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


def relattn_bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


if __name__ == "__main__":
    main()
