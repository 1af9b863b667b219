"""Development check and timing of the warp-specialised Hopper kernel relattn_ws
(RELATTN_SM90_WS), on the device.

    PYTHONPATH=. python3 bench/ws_dev.py [--check] [--time] [--cfgs 2,64,4,1 ...]
"""

from __future__ import annotations

import argparse
import os
import sys

import cupy
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu_dev import as_f32, get_rel_pos_t, graph_time_cupy, graph_time_env, graph_time_torch, to_cupy  # noqa: E402
from sm90_dev import err, make, reference  # noqa: E402

from relattn.backends import _sm90, cupy_gpu as gpu  # noqa: E402

CFGS = ["2,64,4,1,240", "2,64,4,0,240", "3,64,4,1,160", "3,64,3,1,160", "2,128,3,1,240", "2,64,2,1,240", "3,64,2,1,160"]


def check(cfgs):
    cases = [
        # B, H, q grid, k grid, d, rel
        (1, 1, (1, 1), (1, 3), 64, False),
        (1, 2, (64, 64), (64, 64), 64, True),
        (2, 3, (32, 64), (32, 64), 64, True),
        (1, 2, (15, 20), (10, 30), 64, False),
        (1, 2, (9, 64), (5, 64), 64, True),
        (1, 2, (33, 64), (33, 64), 56, True),
        (1, 2, (1, 64), (1, 64), 64, True),
        (1, 2, (1, 1), (7, 64), 64, True),
        (1, 2, (64, 64), (64, 64), 80, True),
        (2, 3, (9, 64), (5, 64), 80, True),
        (1, 2, (7, 64), (3, 64), 72, True),
        (1, 2, (15, 20), (10, 30), 80, False),
    ]
    bad = 0
    for c in cfgs:
        os.environ["RELATTN_SM90_WS"] = c
        for dt in ("bfloat16", "float16"):
            for i, (B, H, qhw, khw, d, rel) in enumerate(cases):
                q, k, v, rh, rw = make(B, H, qhw, khw, d, dt, seed=i)
                if not rel:
                    rh = rw = None
                scale = d ** -0.5
                ref = reference(q, k, v, rh, rw, khw, scale)
                hd = max(16, ((d + 7) // 8 * 8 + 15) // 16 * 16)
                cfg = gpu._sm90_config(hd, q.shape[2], k.shape[2], khw[0], khw[1], rel, ws=True)
                out = gpu.attention(q, k, v, rh, rw, khw, scale)
                e = err(out, ref)
                ok = e < (8e-3 if dt == "bfloat16" else 2e-3) and cfg is not None
                bad += not ok
                print(f"[check {c}] {dt:8} B={B} H={H} q={qhw} k={khw} d={d} rel={rel} cfg={cfg}: err {e:.2e} "
                      f"{'ok' if ok else 'FAIL'}", flush=True)
        # strided views of a packed qkv buffer (B, S, 3, H, d)
        B, H, S, d = 2, 3, 4096, 64
        rs = cupy.random.RandomState(7)
        qkv = rs.standard_normal((B, S, 3, H, d), dtype=cupy.float32).astype(cupy.float16)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        rh = 0.5 * rs.standard_normal((B, H, S, 64), dtype=cupy.float32)
        rw = 0.5 * rs.standard_normal((B, H, S, 64), dtype=cupy.float32)
        ref = reference(q, k, v, rh, rw, (64, 64), 0.125)
        e = err(gpu.attention(q, k, v, rh, rw, (64, 64), 0.125), ref)
        bad += not e < 2e-3
        print(f"[check {c}] strided qkv views: err {e:.2e}", flush=True)
    os.environ.pop("RELATTN_SM90_WS", None)
    print(f"[check] failures: {bad}", flush=True)
    return bad


def timing(cfgs):
    cases = [("SAM-B global", 1, 12, 64, 64, 64, True), ("SAM-H global", 1, 16, 64, 64, 80, True),
             ("SAM-H global, no bias", 1, 16, 64, 64, 80, False)]
    for name, B, H, qh, qw, d, rel in cases:
        S = qh * qw
        scale = d ** -0.5
        tq, tk, tv = (torch.randn(B, H, S, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        rph = 0.5 * torch.randn(2 * qh - 1, d, device="cuda", dtype=torch.bfloat16)
        rpw = 0.5 * torch.randn(2 * qw - 1, d, device="cuda", dtype=torch.bfloat16)
        Rh_t, Rw_t = get_rel_pos_t(qh, qh, rph), get_rel_pos_t(qw, qw, rpw)
        q, k, v = to_cupy(tq), to_cupy(tk), to_cupy(tv)
        Rh = cupy.ascontiguousarray(as_f32(to_cupy(Rh_t.contiguous())))
        Rw = cupy.ascontiguousarray(as_f32(to_cupy(Rw_t.contiguous())))
        rh, rw = gpu.rel_terms(q, Rh, Rw) if rel else (None, None)
        ref = reference(q, k, v, rh, rw, (qh, qw), scale)
        row = {"flash": graph_time_torch(lambda: F.scaled_dot_product_attention(tq, tk, tv))}
        if rel:
            row["terms"] = graph_time_cupy(lambda: gpu.rel_terms(q, Rh, Rw))
        os.environ["RELATTN_SM90_WS"] = "0"
        row["wg"] = graph_time_cupy(lambda: gpu.attention(q, k, v, rh, rw, (qh, qw), scale))
        for c in cfgs:
            os.environ["RELATTN_SM90_WS"] = c
            try:
                e = err(gpu.attention(q, k, v, rh, rw, (qh, qw), scale), ref)
                row[f"ws{c}"] = graph_time_cupy(lambda: gpu.attention(q, k, v, rh, rw, (qh, qw), scale))
                row[f"err{c}"] = e
            except Exception as exc:
                print(f"[time] {name} {c}: {exc!r}"[:300], flush=True)
        os.environ.pop("RELATTN_SM90_WS")
        print(f"[time] {name}: " + ", ".join(f"{kk}={vv:.4f}" if vv > 1e-3 else f"{kk}={vv:.1e}"
                                             for kk, vv in row.items()), flush=True)
        del ref
        cupy.get_default_memory_pool().free_all_blocks()


def check_win(bf16_only=False):
    """relattn_ws in 16-slot key rows (small key grids, rel 5 / 6) against
    float32 references, and a non-finite key in one window that must not reach
    the others (the slots past k_w and the key rows past k_h of a stage)."""
    import relattn
    from relattn import functional

    cases = [  # B, H, q grid, k grid, d
        (25, 3, (14, 14), (14, 14), 64), (25, 2, (14, 14), (14, 14), 80), (2, 2, (10, 10), (10, 10), 64),
        (3, 2, (16, 16), (16, 16), 64), (2, 2, (7, 9), (7, 9), 64), (1, 2, (14, 14), (5, 16), 64),
        (2, 2, (3, 3), (1, 1), 64), (2, 3, (12, 12), (13, 11), 72), (1, 1, (1, 1), (1, 1), 64),
    ]
    bad = 0
    for dt in ("bfloat16",) if bf16_only else ("bfloat16", "float16"):
        for i, (B, H, qhw, khw, d) in enumerate(cases):
            q, k, v, rh, rw = make(B, H, qhw, khw, d, dt, seed=200 + i)
            scale = d ** -0.5
            cfg = gpu._sm90_config(max(16, ((d + 15) // 16) * 16), q.shape[2], k.shape[2], khw[0], khw[1], True, ws=True)
            ref = reference(q, k, v, rh, rw, khw, scale)
            e1 = err(gpu.attention(q, k, v, rh, rw, khw, scale), ref)
            th, tw = _tables(cupy.random.RandomState(i), qhw, khw, d, dt)
            functional._plans.clear()
            fused = functional._fused_first("cupy", q, k, v, th, tw, qhw, khw, d ** -0.5)
            first = relattn.rel_pos_attention(q, k, v, th, tw, qhw, khw)
            again = relattn.rel_pos_attention(q, k, v, th, tw, qhw, khw)
            f32 = relattn.rel_pos_attention(*(as_f32(x) for x in (q, k, v, th, tw)), qhw, khw)
            e2 = err(first, f32)
            same = bool((first.view(cupy.uint16) == again.view(cupy.uint16)).all())
            tol = 8e-3 if dt == "bfloat16" else 2e-3
            ok = cfg is not None and cfg[2] == 5 and e1 < tol and e2 < tol and same and fused is not None
            bad += not ok
            print(f"[win] {dt:8} B={B} H={H} q={qhw} k={khw} d={d} cfg={cfg}: terms given err {e1:.2e}, "
                  f"fused={fused is not None} err {e2:.2e} same bits={same} {'ok' if ok else 'FAIL'}", flush=True)
    # an infinite key in window 0: the other windows stay finite and equal relattn_win's
    q, k, v, rh, rw = make(25, 2, (14, 14), (14, 14), 64, "bfloat16", seed=7)
    k = k.copy()
    k.view(cupy.uint16)[0, 0, 5, 3] = 0x7F80   # bfloat16 +inf
    a = gpu.attention(q, k, v, rh, rw, (14, 14), 0.125)
    os.environ["RELATTN_SM90_WSWIN"] = "0"
    b = gpu.attention(q, k, v, rh, rw, (14, 14), 0.125)
    os.environ.pop("RELATTN_SM90_WSWIN")
    rest = err(a[1:], as_f32(b[1:]))
    nan_same = bool((cupy.isnan(as_f32(a)) == cupy.isnan(as_f32(b))).all())
    ok = rest < 8e-3 and nan_same
    bad += not ok
    print(f"[win] infinite key in window 0: other windows err vs relattn_win {rest:.2e}, NaN pattern same={nan_same} "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    print(f"[win] failures: {bad}", flush=True)
    return bad


def time_win(wincfgs=()):
    """SAM's windows: relattn_ws in 16-slot key rows (its default and each of
    ``wincfgs``, "nc,bn,st,pp,rg,mb"), relattn_win and no-bias SDPA."""
    import relattn

    runs = [("ws fused", {}), ("win fused", {"RELATTN_SM90_WSWIN": "0"}),
            ("ws core", {}), ("win core", {"RELATTN_SM90_WSWIN": "0"})]
    for c in wincfgs:
        runs += [(f"ws fused {c}", {"RELATTN_SM90_WS": c}), (f"ws core {c}", {"RELATTN_SM90_WS": c})]
    for name, B, H, d in (("SAM-B windowed", 25, 12, 64), ("SAM-H windowed", 25, 16, 80)):
        q, k, v, rh, rw = make(B, H, (14, 14), (14, 14), d, "bfloat16")
        th, tw = _tables(cupy.random.RandomState(0), (14, 14), (14, 14), d, "bfloat16")
        row = {}
        for label, env in runs:
            if "fused" in label:
                call = lambda: relattn.rel_pos_attention(q, k, v, th, tw, (14, 14))  # noqa: E731
            else:
                call = lambda: gpu.attention(q, k, v, rh, rw, (14, 14), d ** -0.5)  # noqa: E731
            row[label] = graph_time_env(call, env)
        tq, tk, tv = (torch.randn(B, H, 196, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        row["flash"] = graph_time_torch(lambda: F.scaled_dot_product_attention(tq, tk, tv))
        print(f"[time-win] {name}: " + ", ".join(f"{kk}={vv:.4f}" for kk, vv in row.items())
              + f"  ws fused/flash={row['ws fused'] / row['flash']:.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--fused", action="store_true", help="check and time the fused terms (rel 4)")
    ap.add_argument("--win", action="store_true", help="check and time 16-slot key rows (small key grids)")
    ap.add_argument("--cfgs", nargs="*", default=CFGS)
    ap.add_argument("--wincfgs", nargs="*", default=[], help="--win: configurations nc,bn,st,pp,rg,mb to check and time")
    a = ap.parse_args()
    print(f"[ws] {torch.cuda.get_device_name()}, cupy {cupy.__version__}, sm90: {_sm90.unavailable_reason()}", flush=True)
    bad = check(a.cfgs) if a.check else 0
    if a.fused:
        bad += check_fused()
        time_fused()
    if a.win:
        for c in [None] + a.wincfgs:
            if c:
                os.environ["RELATTN_SM90_WS"] = c
            bad += check_win(bf16_only=c is not None)
            os.environ.pop("RELATTN_SM90_WS", None)
        time_win(a.wincfgs)
    if a.time:
        timing(a.cfgs)
    return 1 if bad else 0



def _tables(rs, qhw, khw, d, dt, rows=None):
    Lh = rows or 2 * max(qhw[0], khw[0]) - 1
    Lw = rows or 2 * max(qhw[1], khw[1]) - 1
    th = 0.3 * rs.standard_normal((Lh, d), dtype=cupy.float32)
    tw = 0.3 * rs.standard_normal((Lw, d), dtype=cupy.float32)
    cv = (lambda a: ((a.view(cupy.uint32) + 0x8000) >> 16).astype(cupy.uint16).view(cupy.dtype("bfloat16"))) \
        if dt == "bfloat16" else (lambda a: a.astype(cupy.float16))
    return cv(th), cv(tw)


def fused_calls(q, k, v, th, tw, qhw, khw, d):
    """rel_pos_attention with 16-bit tables on a cleared plan cache: (whether
    its first call takes a fused plan, that call's output, the float32 call on
    the same rounded inputs, whether the planned repeat gives the same bits)."""
    import relattn
    from relattn import functional

    functional._plans.clear()
    fused = functional._fused_first("cupy", q, k, v, th, tw, qhw, khw, d ** -0.5) is not None
    first = relattn.rel_pos_attention(q, k, v, th, tw, qhw, khw)
    again = relattn.rel_pos_attention(q, k, v, th, tw, qhw, khw)
    ref = relattn.rel_pos_attention(*(as_f32(x) for x in (q, k, v, th, tw)), qhw, khw)
    return fused, first, ref, bool((first.view(cupy.uint16) == again.view(cupy.uint16)).all())


def check_fused():
    """rel_pos_attention with 16-bit tables: the terms inside relattn_ws (rel 4)
    against a float32 (3xTF32) call on the same rounded inputs, and the same
    bits for the first (unplanned) and later (planned) calls."""
    cases = [  # B, H, q grid, k grid, d, table rows (None: 2 * max - 1)
        (1, 2, (64, 64), (64, 64), 64, None),
        (2, 3, (32, 64), (32, 64), 64, None),
        (1, 2, (9, 64), (5, 64), 64, None),
        (1, 2, (64, 64), (64, 64), 64, 100),
        (1, 2, (33, 64), (33, 64), 56, None),
        (1, 1, (1, 64), (1, 64), 64, None),
        (1, 2, (5, 64), (9, 64), 64, None),
        (1, 2, (64, 64), (64, 64), 80, None),
        (2, 3, (9, 64), (5, 64), 80, None),
        (1, 2, (12, 64), (12, 64), 72, 40),
    ]
    bad = 0
    for dt in ("bfloat16", "float16"):
        for i, (B, H, qhw, khw, d, rows) in enumerate(cases):
            q, k, v, _, _ = make(B, H, qhw, khw, d, dt, seed=100 + i)
            th, tw = _tables(cupy.random.RandomState(i), qhw, khw, d, dt, rows)
            fused, first, ref, same = fused_calls(q, k, v, th, tw, qhw, khw, d)
            e = err(first, ref)
            ok = fused and same and e < (8e-3 if dt == "bfloat16" else 2e-3)
            bad += not ok
            print(f"[fused] {dt:8} B={B} H={H} q={qhw} k={khw} d={d} rows={rows}: fused={fused} "
                  f"same bits={same} err {e:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    print(f"[fused] failures: {bad}", flush=True)
    return bad


def time_fused():
    import relattn

    for name, B, H, g, d in (("SAM-B global", 1, 12, 64, 64), ("SAM-H global", 1, 16, 64, 80)):
        q, k, v, _, _ = make(B, H, (g, g), (g, g), d, "bfloat16")
        th, tw = _tables(cupy.random.RandomState(0), (g, g), (g, g), d, "bfloat16")
        row = {}
        for label, env in (("fused", {}), ("ws+terms", {"RELATTN_SM90_FUSE": "0"}),
                           ("wg+terms", {"RELATTN_SM90_WS": "0"})):
            row[label] = graph_time_env(lambda: relattn.rel_pos_attention(q, k, v, th, tw, (g, g)), env)
        tq, tk, tv = (torch.randn(B, H, g * g, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        row["flash"] = graph_time_torch(lambda: F.scaled_dot_product_attention(tq, tk, tv))
        print(f"[time-fused] {name}: " + ", ".join(f"{kk}={vv:.4f}" for kk, vv in row.items())
              + f"  fused/flash={row['fused'] / row['flash']:.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
