"""GPU time of each stage of the vjp (SAM-B global and windows, bf16 and
float32; SAM-H global bf16): the forward, the terms, the row log-sum-exp,
the rows, dq and dkv kernels, the tables' pullback; median of
CUDA-event-timed loops, and a host profile of vjp + pullback.

    PYTHONPATH=. python3 dev/bwd_profile_dev.py
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import os

import cupy
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu_dev import make, tables, time_cupy  # noqa: E402

import relattn  # noqa: E402
from relattn import autodiff  # noqa: E402
from relattn.backends.gpu import backward as bw, terms  # noqa: E402


def gtime(fn):
    return time_cupy(fn, reps=7, inner=10, warm=2)


def kernels_apart(q, k, v, rel_h, rel_w, k_size, scale, out, dout, lse):
    """fused_core_backward's launches, each alone: (bias, rows, dq, dkv);
    float32: no rows kernel (None), the forward's lse."""
    B, H, q_len, d = q.shape
    k_len = k.shape[2]
    pairs = B * H
    f = bw._Fused.of(q, rel_h, k_size, k_len)
    rh, rw = bw._terms32(rel_h, rel_w)
    f32 = np.float32
    dq = cupy.empty((pairs, q_len, d), dtype=f32)
    dk = cupy.empty((pairs, k_len, d), dtype=f32 if f.float32 else cupy.uint16)
    dv = cupy.empty((pairs, k_len, d), dtype=f32 if f.float32 else cupy.uint16)
    delta = cupy.zeros((pairs, q_len), dtype=f32)
    d_rel_h = cupy.empty((pairs, q_len, f.kh), dtype=f32)
    d_rel_w = cupy.empty((pairs, q_len, f.kw), dtype=f32)
    qx, kx, vx, ox, dox = (f.operand(x) for x in (q, k, v, out, dout))
    tail = tuple(np.int32(n) for n in (q_len, k_len, d, f.kh, f.kw)) + (
        f32(scale * bw._LOG2E), f32(1.0 / f.kw), f32(scale))
    lse = lse.reshape(pairs, q_len)
    qb, kb = pairs * -(-q_len // 64), pairs * -(-k_len // 64)
    if f.float32:
        run_rows = None

        def run_dq():
            f.launch("dq", qb, (qx, kx, vx, ox, dox, rh, rw, lse, delta, dq, d_rel_h, d_rel_w) + tail)

        def run_dkv():
            f.launch("dkv", kb, (qx, kx, vx, dox, rh, rw, lse, delta, dk, dv) + tail)
    else:
        def run_rows():
            f.launch("rows", qb, (qx, kx, vx, dox, rh, rw, lse, delta) + tail[:-1])

        def run_dq():
            f.launch("dq", qb, (qx, kx, vx, dox, rh, rw, lse, delta, dq, d_rel_h, d_rel_w) + tail)

        def run_dkv():
            f.launch("dkv", kb, (qx, kx, vx, dox, rh, rw, lse, delta, dk, dv) + tail + (np.int32(f.nh),))
    return f.bias, run_rows, run_dq, run_dkv


def main():
    for name, B, H, g, d, dt in (("B-global", 1, 12, 64, 64, "bfloat16"), ("B-window", 25, 12, 14, 64, "bfloat16"),
                                 ("H-global", 1, 16, 64, 80, "bfloat16"), ("B-global", 1, 12, 64, 64, "float32"),
                                 ("B-window", 25, 12, 14, 64, "float32")):
        if dt == "float32":
            q, k, v = (cupy.random.standard_normal((B, H, g * g, d), dtype=cupy.float32) for _ in range(3))
            th, tw = (0.3 * cupy.random.standard_normal((2 * g - 1, d), dtype=cupy.float32) for _ in range(2))
        else:
            q, k, v, _, _ = make(B, H, (g, g), (g, g), d, dt)
            th, tw = tables(cupy.random.RandomState(0), (g, g), (g, g), d, dt)
        scale = d ** -0.5
        res = {}
        res["forward"] = gtime(lambda: relattn.rel_pos_attention(q, k, v, th, tw, (g, g)))
        res["vjp fwd"] = gtime(lambda: relattn.rel_pos_attention_vjp(q, k, v, th, tw, (g, g)))
        out, pullback = relattn.rel_pos_attention_vjp(q, k, v, th, tw, (g, g))
        dout = out.copy()
        res["pullback"] = gtime(lambda: pullback(dout))
        rel_h, rel_w = (autodiff.astype(t, np.float32)
                        for t in autodiff.relpos_terms(q, th, tw, (g, g), (g, g)))
        res["terms"] = gtime(lambda: terms.plan(q, th, tw, (g, g), (g, g))[0](q, th, tw))
        res["row_lse"] = gtime(lambda: bw.row_lse(q, k, rel_h, rel_w, (g, g), scale))
        lse = bw.row_lse(q, k, rel_h, rel_w, (g, g), scale)
        given = lse if dt == "float32" else None
        res["fused_core_backward"] = gtime(
            lambda: bw.fused_core_backward(q, k, v, rel_h, rel_w, (g, g), scale, out, dout, given))
        if dt != "float32":   # with the forward's log-sum-exp: delta from out, no row pass
            res["  with the forward's lse"] = gtime(
                lambda: bw.fused_core_backward(q, k, v, rel_h, rel_w, (g, g), scale, out, dout, lse))
        bias, run_rows, run_dq, run_dkv = kernels_apart(q, k, v, rel_h, rel_w, (g, g), scale, out, dout, lse)
        if run_rows is not None:
            res["rows kernel"] = gtime(run_rows)
        res[f"dq kernel ({bias.name})"] = gtime(run_dq)
        res["dkv kernel"] = gtime(run_dkv)
        core = bw.fused_core_backward(q, k, v, rel_h, rel_w, (g, g), scale, out, dout, given)
        Rh, Rw = autodiff._gathered_tables(th, tw, (g, g), (g, g), np.float32)
        res["terms pullback"] = gtime(lambda: (bw.terms_dq(q, core[0], core[3], core[4], Rh, Rw, (g, g), (g, g)),
                                                bw.tables_pullback(q, core[3], core[4], (g, g), (g, g))))
        res["  terms_dq (side kernels)"] = gtime(lambda: bw.terms_dq(q, core[0], core[3], core[4], Rh, Rw, (g, g), (g, g)))
        dh3 = cupy.ascontiguousarray(core[3]).reshape(B * H, g * g, -1)
        q3 = cupy.ascontiguousarray(q.view(cupy.uint16) if dt != "float32" else q).reshape(B * H, g * g, d)
        tdt = bw._TERMS_DT[dt]
        res["  one side's gather adjoint"] = gtime(lambda: bw._gather_adjoint(dh3, q3, "h", (g, g), (g, g), tdt))
        plain = kernels_apart(q, k, v, None, None, (g, g), scale, out, dout, lse)
        res["dq kernel, no terms"] = gtime(plain[2])
        res["dkv kernel, no terms"] = gtime(plain[3])
        if dt == "float32":
            stats = bw.row_stats(q, k, rel_h, rel_w, (g, g), scale)
            res["chunked core"] = gtime(
                lambda: bw.core_backward(q, k, v, rel_h, rel_w, (g, g), scale, out, dout, stats))
        if dt == "bfloat16" and d == 64:   # where the host time goes in vjp + pullback
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(10):
                o, pb = relattn.rel_pos_attention_vjp(q, k, v, th, tw, (g, g))
                pb(dout)
            cupy.cuda.get_current_stream().synchronize()
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
            print("\n".join(line[:150] for line in buf.getvalue().splitlines()[6:26]))
        print(name, dt, "  ".join(f"{key} {val:.3f}" for key, val in res.items()), flush=True)


if __name__ == "__main__":
    main()
