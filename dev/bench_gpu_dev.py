"""GPU benchmark of relattn's CuPy kernel against PyTorch anchors (same run).

On a CUDA GPU:  PYTHONPATH=. python3 dev/bench_gpu_dev.py [--quick]

Cases: SAM-B global (1, 12, 4096, 64), SAM-B windowed (25, 12, 196, 64),
SAM-H global (1, 16, 4096, 80); bf16 and fp32.
  ours   : rel_h / rel_w from q and the gathered tables (the terms kernel)
           + the attention kernel
  kernel : the attention kernel alone (rel terms ready)
  seed   : torch einsum terms + materialized (B, heads, S, S) mask + SDPA
  flash  : torch SDPA with no bias (PyTorch's default dispatch)
Times are medians over repeats of CUDA-event-timed loops. Memory: peak extra
bytes over the inputs, excluding the output. Error: relative L2 vs a float32
(PyTorch, materialized) reference on the same rounded inputs.

The helpers below (inputs, timers, torch / CuPy conversions) serve the other
scripts of dev/ too; they import no relattn module, so they also run against
another package tree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

import cupy


# ------------------------------------------------------------------ tools
def get_rel_pos_t(q_size, k_size, rel_pos):
    """Same-size case of SAM's get_rel_pos (no resize)."""
    qc = torch.arange(q_size, device=rel_pos.device)[:, None]
    kc = torch.arange(k_size, device=rel_pos.device)[None, :]
    return rel_pos[(qc - kc) + (k_size - 1)]


def to_cupy(t):
    if t.dtype == torch.bfloat16:
        u = cupy.from_dlpack(t.view(torch.int16)).view(cupy.uint16)
        return u.view(cupy.dtype("bfloat16"))
    return cupy.from_dlpack(t)


def to_torch(a):
    if a.dtype.name == "bfloat16":
        return torch.from_dlpack(a.view(cupy.int16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


def as_f32(a):
    """cupy float32 copy of a (bf16 via its bits: no bf16 arithmetic in CuPy)."""
    if a.dtype.name == "bfloat16":
        return (a.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32)
    return a.astype(cupy.float32)


def rel_terms_cupy(q, Rh, Rw, qh, qw):
    """rel_h (BH, S, kh), rel_w (BH, S, kw) in float32 from q (B, H, S, d)."""
    B, H, S, d = q.shape
    r = as_f32(q).reshape(B * H, qh, qw, d)
    kh, kw = Rh.shape[1], Rw.shape[1]
    rel_h = cupy.matmul(r, Rh.transpose(0, 2, 1)[None])                    # (BH, qh, qw, kh)
    rel_w = cupy.matmul(r.transpose(0, 2, 1, 3), Rw.transpose(0, 2, 1)[None])  # (BH, qw, qh, kw)
    rel_w = cupy.ascontiguousarray(rel_w.transpose(0, 2, 1, 3))
    return rel_h.reshape(B, H, S, kh), rel_w.reshape(B, H, S, kw)


def time_torch(fn, reps=15, inner=20, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / inner)
    return statistics.median(ts)


def time_cupy(fn, reps=15, inner=20, warm=5):
    for _ in range(warm):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    ts = []
    for _ in range(reps):
        s, e = cupy.cuda.Event(), cupy.cuda.Event()
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        e.synchronize()
        ts.append(cupy.cuda.get_elapsed_time(s, e) / inner)
    return statistics.median(ts)


def make(B, H, qhw, khw, d, dt, seed=0):
    """q, k, v (B, H, S, d) of dtype dt ("bfloat16" or "float16") and float32
    terms rel_h (B, H, Sq, k_h), rel_w (B, H, Sq, k_w), standard normal."""
    rs = cupy.random.RandomState(seed)
    Sq, Sk = qhw[0] * qhw[1], khw[0] * khw[1]
    q = rs.standard_normal((B, H, Sq, d), dtype=cupy.float32)
    k = rs.standard_normal((B, H, Sk, d), dtype=cupy.float32)
    v = rs.standard_normal((B, H, Sk, d), dtype=cupy.float32)
    rh = 0.5 * rs.standard_normal((B, H, Sq, khw[0]), dtype=cupy.float32)
    rw = 0.5 * rs.standard_normal((B, H, Sq, khw[1]), dtype=cupy.float32)
    return to_half(q, dt), to_half(k, dt), to_half(v, dt), rh, rw


def tables(rs, qhw, khw, d, dt, rows=None):
    """rel_pos_h, rel_pos_w of SAM's length for these grids (or ``rows``), dtype dt."""
    Lh = rows or 2 * max(qhw[0], khw[0]) - 1
    Lw = rows or 2 * max(qhw[1], khw[1]) - 1
    th = 0.3 * rs.standard_normal((Lh, d), dtype=cupy.float32)
    tw = 0.3 * rs.standard_normal((Lw, d), dtype=cupy.float32)
    return to_half(th, dt), to_half(tw, dt)


def to_half(a, dt):
    """float32 cupy array -> bfloat16 (through the bits, ties rounded up) or float16."""
    if dt == "bfloat16":
        return ((a.view(cupy.uint32) + 0x8000) >> 16).astype(cupy.uint16).view(cupy.dtype("bfloat16"))
    return a.astype(cupy.float16)


def graph_time_cupy(fn, reps=15, inner=20):
    """Median per-call GPU time of fn replayed from a captured CUDA graph (None if capture fails)."""
    try:
        st = cupy.cuda.Stream(non_blocking=True)
        with st:
            for _ in range(3):
                keep = fn()
            st.synchronize()
            st.begin_capture()
            keep = fn()
            graph = st.end_capture()
            graph.launch(st)
            st.synchronize()
            ts = []
            for _ in range(reps):
                s, e = cupy.cuda.Event(), cupy.cuda.Event()
                s.record(st)
                for _ in range(inner):
                    graph.launch(st)
                e.record(st)
                e.synchronize()
                ts.append(cupy.cuda.get_elapsed_time(s, e) / inner)
        del graph, keep
        return statistics.median(ts)
    except Exception as exc:
        print(f"[bench] cupy graph capture failed: {exc!r}")
        return float("nan")


def graph_time_torch(fn, reps=15, inner=20):
    try:
        s0 = torch.cuda.Stream()
        s0.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s0):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s0)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            keep = fn()
        g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(inner):
                g.replay()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) / inner)
        del g, keep
        return statistics.median(ts)
    except Exception as exc:
        print(f"[bench] torch graph capture failed: {exc!r}")
        return float("nan")


class PeakHook(cupy.cuda.MemoryHook):
    name = "PeakHook"

    def __init__(self):
        self.cur = 0
        self.peak = 0

    def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
        self.cur += mem_size
        self.peak = max(self.peak, self.cur)

    def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
        self.cur -= mem_size


def cupy_extra_bytes(fn):
    cupy.cuda.get_current_stream().synchronize()
    hook = PeakHook()
    with hook:
        out = fn()
        out_bytes = out.nbytes
        del out
    return hook.peak - out_bytes


def torch_extra_bytes(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak - base - out.numel() * out.element_size()


def rel_err(a, ref):
    a = a.double()
    ref = ref.double()
    return float((a - ref).norm() / ref.norm())


# ------------------------------------------------------------------ main
def main():
    from relattn.backends import gpu   # here: the helpers above also serve A/B runs of other package trees

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    reps = 7 if args.quick else 15

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.cuda.get_device_name()
    print(f"[bench] device: {dev}; torch {torch.__version__}; cupy {cupy.__version__}")
    cases = [
        ("SAM-B global", 1, 12, 64, 64, 64),
        ("SAM-B windowed", 25, 12, 14, 14, 64),
        ("SAM-H global", 1, 16, 64, 64, 80),
    ]
    rows = []
    torch.manual_seed(0)
    for dtname, tdt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for name, B, H, qh, qw, d in cases:
            S = qh * qw
            scale = d ** -0.5
            q = torch.randn(B, H, S, d, device="cuda", dtype=tdt)
            k = torch.randn(B, H, S, d, device="cuda", dtype=tdt)
            v = torch.randn(B, H, S, d, device="cuda", dtype=tdt)
            rel_pos_h = 0.5 * torch.randn(2 * qh - 1, d, device="cuda", dtype=tdt)
            rel_pos_w = 0.5 * torch.randn(2 * qw - 1, d, device="cuda", dtype=tdt)
            Rh_t = get_rel_pos_t(qh, qh, rel_pos_h)
            Rw_t = get_rel_pos_t(qw, qw, rel_pos_w)

            def seed():
                r_q = q.reshape(B * H, qh, qw, d)
                rh = torch.einsum("bhwc,hkc->bhwk", r_q, Rh_t)
                rw = torch.einsum("bhwc,wkc->bhwk", r_q, Rw_t)
                mask = (rh[:, :, :, :, None] + rw[:, :, :, None, :]).reshape(B, H, S, S)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

            def flash():
                return F.scaled_dot_product_attention(q, k, v)

            qc, kc, vc = to_cupy(q), to_cupy(k), to_cupy(v)
            Rh_c = cupy.ascontiguousarray(as_f32(to_cupy(Rh_t.contiguous())))
            Rw_c = cupy.ascontiguousarray(as_f32(to_cupy(Rw_t.contiguous())))

            def ours():
                rh, rw = gpu.rel_terms(qc, Rh_c, Rw_c)
                return gpu.attention(qc, kc, vc, rh, rw, (qh, qw), scale)

            rh_ready, rw_ready = gpu.rel_terms(qc, Rh_c, Rw_c)
            rh_chk, rw_chk = rel_terms_cupy(qc, Rh_c, Rw_c, qh, qw)
            err_rel = max(float(cupy.abs(rh_ready - rh_chk).max() / cupy.abs(rh_chk).max()),
                          float(cupy.abs(rw_ready - rw_chk).max() / cupy.abs(rw_chk).max()))
            del rh_chk, rw_chk

            def kernel_only():
                return gpu.attention(qc, kc, vc, rh_ready, rw_ready, (qh, qw), scale)

            # correctness vs float32 materialized reference (same rounded inputs)
            o = to_torch(ours())
            torch.cuda.synchronize()
            qf, kf, vf = q.float(), k.float(), v.float()
            rhf = torch.from_dlpack(rh_ready).float()
            rwf = torch.from_dlpack(rw_ready).float()
            mask32 = (rhf[..., :, :, None] + rwf[..., :, None, :]).reshape(B, H, S, S)
            logits = torch.matmul(qf, kf.transpose(-1, -2)) * scale + mask32
            ref = torch.matmul(torch.softmax(logits, dim=-1), vf)
            err = rel_err(o, ref)
            err_seed = rel_err(seed(), ref)
            del logits, mask32
            torch.cuda.synchronize()

            t_ours = time_cupy(ours, reps=reps)
            t_kern = time_cupy(kernel_only, reps=reps)
            t_rel = time_cupy(lambda: gpu.rel_terms(qc, Rh_c, Rw_c), reps=reps)
            t_norel = time_cupy(lambda: gpu.attention(qc, kc, vc, None, None, (qh, qw), scale), reps=reps)
            g_ours = graph_time_cupy(ours, reps=reps)
            g_kern = graph_time_cupy(kernel_only, reps=reps)
            g_seed = graph_time_torch(seed, reps=reps)
            g_flash = graph_time_torch(flash, reps=reps)
            t_mw = {}
            if dtname == "bf16":   # the mma.sync kernel with 16 or 32 query rows per warp
                for mwv in (1, 2):
                    run_mw = gpu.core_plan(qc, kc, vc, rh_ready, rw_ready, (qh, qw), scale, kernel="mma",
                                           kernel_options={"mw": mwv})
                    t_mw[str(mwv)] = time_cupy(lambda: run_mw(qc, kc, vc, rh_ready, rw_ready), reps=reps)
                    t_mw["err" + str(mwv)] = rel_err(to_torch(run_mw(qc, kc, vc, rh_ready, rw_ready)), ref)
            t_seed = time_torch(seed, reps=reps)
            t_flash = time_torch(flash, reps=reps)
            mem_ours = cupy_extra_bytes(ours)
            mem_seed = torch_extra_bytes(seed)
            del ref
            flops = 4 * B * H * S * S * d
            row = dict(dtype=dtname, case=name, ours_ms=t_ours, kernel_ms=t_kern, seed_ms=t_seed,
                       flash_ms=t_flash, ours_over_flash=t_ours / t_flash, ours_over_seed=t_ours / t_seed,
                       kernel_tflops=flops / t_kern / 1e9, mem_ours_mib=mem_ours / 2**20,
                       mem_seed_mib=mem_seed / 2**20, err_ours=err, err_seed=err_seed,
                       rel_ms=t_rel, rel_terms_maxrel_vs_matmul=err_rel, mw=t_mw, kernel_norel_ms=t_norel,
                       graph_ours_ms=g_ours, graph_kernel_ms=g_kern, graph_seed_ms=g_seed, graph_flash_ms=g_flash)
            rows.append(row)
            print("[bench] " + json.dumps({kk: (round(vv, 5) if isinstance(vv, float) else vv) for kk, vv in row.items()}),
                  flush=True)
            del qc, kc, vc, q, k, v, rh_ready, rw_ready
            cupy.get_default_memory_pool().free_all_blocks()
            torch.cuda.empty_cache()

    print("\nCUDA-graph replays (launch overhead removed), ms:")
    print(f"{'dtype':5} {'case':15} {'ours':>8} {'kernel':>8} {'seed':>8} {'flash':>8} {'o/fl':>6} {'o/seed':>6} {'k(norel)':>8} {'rel':>7}")
    for r in rows:
        print(f"{r['dtype']:5} {r['case']:15} {r['graph_ours_ms']:8.4f} {r['graph_kernel_ms']:8.4f} {r['graph_seed_ms']:8.4f} "
              f"{r['graph_flash_ms']:8.4f} {r['graph_ours_ms'] / r['graph_flash_ms']:6.2f} {r['graph_ours_ms'] / r['graph_seed_ms']:6.3f} "
              f"{r['kernel_norel_ms']:8.4f} {r['rel_ms']:7.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=dev, rows=rows), fh, indent=1)
    print(f"\n{dev}")
    hdr = f"{'dtype':5} {'case':15} {'ours':>8} {'kernel':>8} {'seed':>8} {'flash':>8} {'o/fl':>6} {'o/seed':>6} {'TF/s':>6} {'MiB':>7} {'seedMiB':>8} {'err':>9} {'seed err':>9}"
    print(hdr)
    for r in rows:
        print(f"{r['dtype']:5} {r['case']:15} {r['ours_ms']:8.4f} {r['kernel_ms']:8.4f} {r['seed_ms']:8.4f} "
              f"{r['flash_ms']:8.4f} {r['ours_over_flash']:6.2f} {r['ours_over_seed']:6.3f} {r['kernel_tflops']:6.0f} "
              f"{r['mem_ours_mib']:7.1f} {r['mem_seed_mib']:8.1f} {r['err_ours']:9.2e} {r['err_seed']:9.2e}")


if __name__ == "__main__":
    sys.exit(main())
