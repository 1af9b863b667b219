"""On a CUDA GPU: one case run a few times (for ncu), or the 3xTF32
split variants timed and checked.

    ncu --launch-skip 4 --launch-count 2 python dev/gpu_probe.py window bfloat16
    python dev/gpu_probe.py splits     (float32: the terms kernel, then the core per split)
"""
import sys

import cupy
import numpy as np

import relattn
from relattn.backends import gpu

CASES = {"global": (1, 12, 64, 64), "window": (25, 12, 14, 64), "h": (1, 16, 64, 80), "1280": (1, 12, 80, 64)}


def make(case, dtype):
    B, H, g, D = CASES[case]
    rng = np.random.default_rng(0)
    q, k, v = (cupy.asarray(rng.standard_normal((B, H, g * g, D)).astype(np.float32)).astype(dtype) for _ in range(3))
    L = 2 * g - 1 if case != "1280" else 127
    rh = cupy.asarray((0.1 * rng.standard_normal((L, D))).astype(np.float32))
    rw = cupy.asarray((0.1 * rng.standard_normal((L, D))).astype(np.float32))
    return q, k, v, rh, rw, (g, g)


def gputime(fn, n=20):
    fn()
    s, e = cupy.cuda.Event(), cupy.cuda.Event()
    s.record()
    for _ in range(n):
        fn()
    e.record()
    e.synchronize()
    return cupy.cuda.get_elapsed_time(s, e) / n


if sys.argv[1] == "splits":
    for case in ("global", "h", "window"):
        q, k, v, rh, rw, gs = make(case, "float32")
        ref = relattn.rel_pos_attention(*(x.astype(cupy.float64) for x in (q, k, v, rh, rw)), gs).get()
        rel_h, rel_w = gpu.rel_terms_from_tables(q, rh, rw, gs, gs)
        terms = gpu.terms.terms_plan(q, rh, rw, gs, gs)
        print(f"{case:7s} terms kernel: {gputime(lambda: terms(q, rh, rw)):.4f} ms (events)")
        D = q.shape[-1]
        for split in (3, 1):
            run = gpu.core_plan(q, k, v, rel_h, rel_w, gs, D ** -0.5, kernel="tf32",
                                kernel_options={"split": split} if split == 3 else {"split": 1, "sh": 0})
            f = lambda: run(q, k, v, rel_h, rel_w)
            t = gputime(f)
            out = f()
            err = float(np.abs(out.get() - ref).max() / np.abs(ref).max())
            print(f"{case:7s} split {split}: {t:.3f} ms (core, events)  max-norm rel err {err:.2e}")
elif sys.argv[1] == "layergraph":   # why a layer call does / does not capture
    import traceback

    for ws in (0, 14):
        layer = relattn.Attention(768, 12, use_rel_pos=True, input_size=(64, 64) if not ws else (14, 14),
                                  rel_pos_zero_init=False, rng=0, dtype="bfloat16", window_size=ws)
        x = relattn._arrays.astype(cupy.asarray(np.random.default_rng(0).standard_normal((1, 64, 64, 768),
                                                                                        dtype=np.float32)),
                                   relattn._arrays.BFLOAT16)
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            layer(x)
            stream.synchronize()
            stream.begin_capture()
            try:
                layer(x)
                graph = stream.end_capture()
                print(f"window {ws}: captured", gputime(lambda: graph.launch(stream)), "ms per replay")
            except Exception:
                traceback.print_exc()
                try:
                    stream.end_capture()
                except Exception:
                    pass
else:
    q, k, v, rh, rw, gs = make(sys.argv[1], sys.argv[2])
    for _ in range(6):
        out = relattn.rel_pos_attention(q, k, v, rh, rw, gs)
    cupy.cuda.Device().synchronize()
    print(sys.argv[1:], float(abs(out.astype(cupy.float32)).max()))
