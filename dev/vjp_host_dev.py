"""Host time per call of the 16-bit GPU vjp (SAM-B windowed and global, bf16): the vjp's
forward, its pullback, both, and the `Attention` layer's eager training step. Each is
called back to back (100 times; 30 for the layer) with no sync in the loop ("host": what
the Python and the launches cost, the GPU running behind), then once synced ("with sync":
the time per call of the whole batch); the best of three batches. Where "host" is close to
"with sync" the call is bound by the host. --profile adds a cProfile of the windowed
vjp + pullback and of the windowed layer step.

    PYTHONPATH=. python3 dev/vjp_host_dev.py [label] [--profile]

Run two package trees alternately (PYTHONPATH=<tree>) to compare them; the label tags
the lines. Needs CuPy and ml_dtypes (no PyTorch).
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time

import cupy
import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu_dev import make, tables  # noqa: E402

import relattn  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def timed(fn, n):
    """(host ms per call, ms per call with one sync at the end): best of three batches."""
    for _ in range(10):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        cupy.cuda.get_current_stream().synchronize()
        t2 = time.perf_counter()
        r = (1e3 * (t1 - t0) / n, 1e3 * (t2 - t0) / n)
        best = r if best is None or r[1] < best[1] else best
    return best


def cases():
    out = []
    for name, B, H, g, d in (("windowed", 25, 12, 14, 64), ("global", 1, 12, 64, 64)):
        q, k, v, _, _ = make(B, H, (g, g), (g, g), d, "bfloat16")
        th, tw = tables(cupy.random.RandomState(0), (g, g), (g, g), d, "bfloat16")
        out0, pullback = relattn.rel_pos_attention_vjp(q, k, v, th, tw, (g, g))
        dout = out0.copy()

        def forward(q=q, k=k, v=v, th=th, tw=tw, g=g):
            return relattn.rel_pos_attention_vjp(q, k, v, th, tw, (g, g))

        def both(forward=forward, dout=dout):
            return forward()[1](dout)

        out += [(f"{name} vjp forward", forward), (f"{name} pullback", lambda p=pullback, d=dout: p(d)),
                (f"{name} vjp + pullback", both)]
    x = cupy.asarray(np.random.default_rng(2).standard_normal((1, 64, 64, 768), dtype=np.float32).astype(BF16))
    for name, grid, window in (("windowed", (14, 14), 14), ("global", (64, 64), 0)):
        layer = relattn.Attention(768, 12, use_rel_pos=True, rel_pos_zero_init=False, input_size=grid,
                                  window_size=window, dtype=BF16, rng=0)

        def step(layer=layer):
            return layer.vjp(x)[1](x)

        out.append((f"layer {name} eager step", step))
    return out


def main(argv):
    profile = "--profile" in argv
    args = [a for a in argv if a != "--profile"]
    label = args[0] if args else "run"
    all_cases = cases()
    for name, fn in all_cases:
        host, synced = timed(fn, 30 if name.startswith("layer") else 100)
        print(f"{label}  {name:26s} host {host:.4f} ms/call   with sync {synced:.4f}", flush=True)
    if profile:
        for name, fn in all_cases:
            if name not in ("windowed vjp + pullback", "layer windowed eager step"):
                continue
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(50):
                fn()
            cupy.cuda.get_current_stream().synchronize()
            pr.disable()
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(35)
            print(f"== {name} (50 calls)\n" + "\n".join(line[:170] for line in buf.getvalue().splitlines()[4:]
                                                       if line.strip()))


if __name__ == "__main__":
    main(sys.argv[1:])
