"""Development check and timing of the Hopper (sm_90a) wgmma kernel, on the device.

    PYTHONPATH=. python3 bench/sm90_dev.py [--check] [--time]

--check  correctness matrix (head dims, sizes, q/k grids, dtypes, rel modes)
--time   CUDA-graph timings: sm90 configurations, the mma.sync kernel, torch
         SDPA without bias and the torch seed form, in the same run
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import cupy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu_dev import as_f32, get_rel_pos_t, graph_time_cupy, graph_time_torch, to_cupy  # noqa: E402

from relattn.backends import _sm90, cupy_gpu as gpu  # noqa: E402

LOG2E = 1.4426950408889634


def make(B, H, qhw, khw, d, dt, seed=0):
    rs = cupy.random.RandomState(seed)
    Sq, Sk = qhw[0] * qhw[1], khw[0] * khw[1]
    q = rs.standard_normal((B, H, Sq, d), dtype=cupy.float32)
    k = rs.standard_normal((B, H, Sk, d), dtype=cupy.float32)
    v = rs.standard_normal((B, H, Sk, d), dtype=cupy.float32)
    rh = 0.5 * rs.standard_normal((B, H, Sq, khw[0]), dtype=cupy.float32)
    rw = 0.5 * rs.standard_normal((B, H, Sq, khw[1]), dtype=cupy.float32)
    if dt == "bfloat16":
        cv = lambda a: ((a.view(cupy.uint32) + 0x8000) >> 16).astype(cupy.uint16).view(cupy.dtype("bfloat16"))
    else:
        cv = lambda a: a.astype(cupy.float16)
    return cv(q), cv(k), cv(v), rh, rw


def reference(q, k, v, rh, rw, khw, scale):
    qf, kf, vf = as_f32(q), as_f32(k), as_f32(v)
    B, H, Sq, d = qf.shape
    Sk = kf.shape[2]
    logits = scale * cupy.matmul(qf, kf.transpose(0, 1, 3, 2))
    if rh is not None:
        bias = (rh[..., :, None] + rw[..., None, :]).reshape(B, H, Sq, Sk)
        logits = logits + bias
    logits -= logits.max(-1, keepdims=True)
    p = cupy.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return cupy.matmul(p, vf)


def err(out, ref):
    o = as_f32(out)
    if not bool(cupy.isfinite(o).all()):
        return float("inf")
    return float(cupy.linalg.norm(o - ref) / cupy.linalg.norm(ref))


def check():
    cases = [
        # B, H, q grid, k grid, d, rel
        (1, 2, (64, 64), (64, 64), 64, True),
        (1, 2, (64, 64), (64, 64), 80, True),
        (3, 4, (14, 14), (14, 14), 64, True),
        (2, 3, (10, 10), (10, 10), 64, False),
        (1, 2, (15, 20), (10, 30), 64, True),
        (1, 2, (9, 64), (5, 64), 64, True),
        (1, 2, (8, 8), (8, 8), 32, True),
        (1, 1, (7, 9), (7, 9), 16, True),
        (1, 2, (16, 16), (16, 16), 128, True),
        (1, 2, (12, 12), (12, 12), 72, True),
        (1, 2, (12, 12), (12, 12), 8, True),
        (2, 2, (80, 80), (80, 80), 64, True),
        (1, 1, (1, 1), (1, 3), 64, True),
    ]
    bad = 0
    for dt in ("bfloat16", "float16"):
        for i, (B, H, qhw, khw, d, rel) in enumerate(cases):
            q, k, v, rh, rw = make(B, H, qhw, khw, d, dt, seed=i)
            if not rel:
                rh = rw = None
            scale = d ** -0.5
            ref = reference(q, k, v, rh, rw, khw, scale)
            hd = max(16, ((d + 7) // 8 * 8 + 15) // 16 * 16)
            cfg = gpu._sm90_config(hd, q.shape[2], k.shape[2], khw[0], khw[1], rel)
            out = gpu.attention(q, k, v, rh, rw, khw, scale)
            e = err(out, ref)
            ok = e < (8e-3 if dt == "bfloat16" else 2e-3)
            bad += not ok
            print(f"[check] {dt:8} B={B} H={H} q={qhw} k={khw} d={d} rel={rel} cfg={cfg}: err {e:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    # strided (non-contiguous) q/k/v views from a packed qkv buffer
    B, H, S, d = 1, 3, 196, 64
    rs = cupy.random.RandomState(7)
    qkv = rs.standard_normal((3, B, S, H, d), dtype=cupy.float32).astype(cupy.float16)
    q, k, v = (qkv[i].transpose(0, 2, 1, 3) for i in range(3))
    ref = reference(q, k, v, None, None, (14, 14), 0.125)
    e = err(gpu.attention(q, k, v, None, None, (14, 14), 0.125), ref)
    bad += not e < 2e-3
    print(f"[check] strided views: err {e:.2e}")
    print(f"[check] failures: {bad}")
    return bad


CFGS = ["1,64,2", "1,64,3", "2,64,2", "2,64,3", "3,64,2", "3,64,3", "2,128,2", "1,128,2"]


def timing():
    cases = [
        ("SAM-B global", 1, 12, 64, 64, 64),
        ("SAM-B windowed", 25, 12, 14, 14, 64),
        ("SAM-H global", 1, 16, 64, 64, 80),
        ("SAM-B 1280px", 1, 12, 80, 80, 64),
    ]
    rows = []
    for name, B, H, qh, qw, d in cases:
        S = qh * qw
        scale = d ** -0.5
        tq = torch.randn(B, H, S, d, device="cuda", dtype=torch.bfloat16)
        tk = torch.randn(B, H, S, d, device="cuda", dtype=torch.bfloat16)
        tv = torch.randn(B, H, S, d, device="cuda", dtype=torch.bfloat16)
        rph = 0.5 * torch.randn(2 * qh - 1, d, device="cuda", dtype=torch.bfloat16)
        rpw = 0.5 * torch.randn(2 * qw - 1, d, device="cuda", dtype=torch.bfloat16)
        Rh_t, Rw_t = get_rel_pos_t(qh, qh, rph), get_rel_pos_t(qw, qw, rpw)

        def seed():
            r_q = tq.reshape(B * H, qh, qw, d)
            rh_ = torch.einsum("bhwc,hkc->bhwk", r_q, Rh_t)
            rw_ = torch.einsum("bhwc,wkc->bhwk", r_q, Rw_t)
            mask = (rh_[:, :, :, :, None] + rw_[:, :, :, None, :]).reshape(B, H, S, S)
            return F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)

        def flash():
            return F.scaled_dot_product_attention(tq, tk, tv)

        q, k, v = to_cupy(tq), to_cupy(tk), to_cupy(tv)
        Rh = cupy.ascontiguousarray(as_f32(to_cupy(Rh_t.contiguous())))
        Rw = cupy.ascontiguousarray(as_f32(to_cupy(Rw_t.contiguous())))
        rh, rw = gpu.rel_terms(q, Rh, Rw)
        ref = reference(q, k, v, rh, rw, (qh, qw), scale)
        row = {"case": name, "flash": graph_time_torch(flash), "seed": graph_time_torch(seed)}
        row["terms"] = graph_time_cupy(lambda: gpu.rel_terms(q, Rh, Rw))
        os.environ["RELATTN_SM90"] = "0"
        if gpu._win_config(d, S, qh, qw) is not None:   # the small-grid kernel
            row["win"] = graph_time_cupy(lambda: gpu.attention(q, k, v, rh, rw, (qh, qw), scale))
        os.environ["RELATTN_WIN"] = "0"
        row["mma.sync"] = graph_time_cupy(lambda: gpu.attention(q, k, v, rh, rw, (qh, qw), scale))
        os.environ.pop("RELATTN_SM90")
        os.environ.pop("RELATTN_WIN")
        for c in CFGS:
            os.environ["RELATTN_SM90_CFG"] = c
            try:
                out = gpu.attention(q, k, v, rh, rw, (qh, qw), scale)
                e = err(out, ref)
                t = graph_time_cupy(lambda: gpu.attention(q, k, v, rh, rw, (qh, qw), scale))
                row[f"wg{c}"] = t
                row[f"err{c}"] = e
            except Exception as exc:
                print(f"[time] {name} {c}: {exc!r}"[:300])
        os.environ.pop("RELATTN_SM90_CFG")
        out = gpu.attention(q, k, v, rh, rw, (qh, qw), scale)
        row["default_err"] = err(out, ref)
        row["default"] = graph_time_cupy(lambda: gpu.attention(q, k, v, rh, rw, (qh, qw), scale))
        row["default+terms"] = graph_time_cupy(
            lambda: gpu.attention(q, k, v, *gpu.rel_terms(q, Rh, Rw), (qh, qw), scale))
        rows.append(row)
        print("[time] " + ", ".join(f"{kk}={vv:.4f}" if isinstance(vv, float) else f"{kk}={vv}" for kk, vv in row.items()), flush=True)
        del ref
        cupy.get_default_memory_pool().free_all_blocks()
    print(f"\n{torch.cuda.get_device_name()} (CUDA graph, ms)")
    keys = ["flash", "seed", "terms", "mma.sync", "win"] + [f"wg{c}" for c in CFGS] + ["default", "default+terms"]
    print(f"{'case':15} " + " ".join(f"{kk:>9}" for kk in keys) + "  ratio(default+terms/flash)")
    for r in rows:
        print(f"{r['case']:15} " + " ".join(f"{r.get(kk, float('nan')):9.4f}" for kk in keys)
              + f"  {r['default+terms'] / r['flash']:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--time", action="store_true")
    a = ap.parse_args()
    print(f"[sm90] {torch.cuda.get_device_name()}, cupy {cupy.__version__}, sm90: {_sm90.unavailable_reason()}")
    bad = check() if a.check else 0
    if a.time:
        timing()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
