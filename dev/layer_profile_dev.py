"""GPU time of each stage of the Attention layer's planned half-precision
forward (SAM-B windowed and global, bf16), graph-timed, beside variants of the
projections: cuBLAS writing bf16 directly (no float32 product, no rounding
kernel) and the qkv product on the unpadded tokens.

    PYTHONPATH=. python3 dev/layer_profile_dev.py
"""

from __future__ import annotations

import os
import sys

import cupy
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu_dev import graph_time_cupy  # noqa: E402

import relattn  # noqa: E402
from relattn import functional  # noqa: E402
from relattn.backends.gpu import cublas, windows  # noqa: E402
from relattn.window import padded_size  # noqa: E402


def gemm_half_out(x2d, weight, out, code):
    """out (bf16/f16) = x2d @ weight.T, float32 accumulation, one rounding by cuBLAS."""
    n, k = x2d.shape
    m = weight.shape[0]
    lib, entry = cublas._cublas_handle()
    cublas._set_stream(lib, entry, cupy.cuda.get_current_stream().ptr)
    cublas._check(lib.cublasGemmEx(entry[0], cublas._CUBLAS_OP_T, cublas._CUBLAS_OP_N, m, n, k,
                                   cublas._ONE_PTR, weight.data.ptr, code, k, x2d.data.ptr, code, k,
                                   cublas._ZERO_PTR, out.data.ptr, code, m,
                                   cublas._CUBLAS_COMPUTE_32F, cublas._CUBLAS_GEMM_DEFAULT), "gemm")


def stages(window):
    bf16 = cupy.dtype("bfloat16")
    layer = relattn.Attention(768, 12, qkv_bias=True, use_rel_pos=True, rel_pos_zero_init=False,
                              input_size=(14, 14) if window else (64, 64), rng=0)
    rs = cupy.random.RandomState(0)
    x = rs.standard_normal((1, 64, 64, 768), dtype=cupy.float32)
    x = cublas.from_float32(x, bf16)
    ws = 14 if window else 0
    layer(x, window_size=ws or None)
    B, H, W, C = x.shape
    if ws:
        hp, wp = padded_size(x.shape, x.dtype.itemsize, ws)
        part = windows.partition_plan(x, ws, hp, wp)
        part_tail = windows.partition_plan(x, ws, hp, wp, tail=True)
        batch, gh, gw = (hp // ws) * (wp // ws), ws, ws
        unpart = windows.unpartition_plan(cupy.empty((batch, ws, ws, C), dtype=bf16), ws, hp, wp, H, W)
    else:
        part, unpart, batch, gh, gw = (lambda a: a), None, 1, 64, 64
        part_tail = windows.tail_plan(x.reshape(-1, 768))
    n = batch * gh * gw
    w = {k: cublas.from_float32(cupy.asarray(v.astype(np.float32)), bf16) if k.endswith("weight") and "rel" not in k
         else cupy.asarray(v.astype(np.float32)) for k, v in layer.state_dict().items()}
    tables = tuple(cublas.from_float32(w[k], bf16) for k in ("rel_pos_h", "rel_pos_w"))
    qkv_lin = cublas.linear_half_plan(n, w["qkv.weight"], w["qkv.bias"], bf16)
    proj_lin = cublas.linear_half_plan(n, w["proj.weight"], w["proj.bias"], bf16)
    xw = part(x)
    qkv = qkv_lin(xw.reshape(n, C))
    q, k, v = layer._split_heads(qkv, batch, gh * gw)
    planned = functional.plan(q, k, v, *tables, (gh, gw), (gh, gw))
    out = planned(q, k, v, *tables)
    o2 = cublas.contiguous(out.transpose(0, 2, 1, 3)).reshape(n, C)
    merge = windows.merge_heads_plan(out, tail=True)
    xt = part_tail(x if ws else x.reshape(-1, C)).reshape(n, -1)
    ot = merge(out).reshape(n, -1)
    y = proj_lin(o2)
    acc = cupy.empty((n, 3 * C), dtype=cupy.float32)
    code = cublas._type_code(bf16)
    h3 = cupy.empty((n, 3 * C), dtype=bf16)
    h1 = cupy.empty((n, C), dtype=bf16)
    xr = x.reshape(B * H * W, C)
    h3u = cupy.empty((B * H * W, 3 * C), dtype=bf16)
    rows = {
        "partition": lambda: part(x),
        "qkv gemm (float32 out)": lambda: cublas._gemm(xw.reshape(n, C), w["qkv.weight"], acc, code, n, 3 * C, C,
                                                       cublas._ZERO_PTR),
        "partition with the bias tail": lambda: part_tail(x if ws else x.reshape(-1, C)),
        "qkv projection (plan, tailed rows)": lambda: qkv_lin.tailed(xt),
        "qkv gemm, bf16 out": lambda: gemm_half_out(xw.reshape(n, C), w["qkv.weight"], h3, code),
        "qkv gemm, bf16 out, unpadded rows": lambda: gemm_half_out(xr, w["qkv.weight"], h3u, code),
        "attention (plan)": lambda: planned(q, k, v, *tables),
        "out transpose copy": lambda: cublas.contiguous(out.transpose(0, 2, 1, 3)),
        "heads merge with the bias tail": lambda: merge(out),
        "proj projection (plan, tailed rows)": lambda: proj_lin.tailed(ot),
        "proj gemm, bf16 out": lambda: gemm_half_out(o2, w["proj.weight"], h1, code),
        "unpartition": (lambda: unpart(y.reshape(batch, gh, gw, C))) if unpart else None,
        "layer forward (planned)": lambda: layer(x, window_size=ws or None),
    }
    print(f"== SAM-B {'windowed' if ws else 'global'} bf16, graph time per call (ms)")
    for name, fn in rows.items():
        if fn is not None:
            print(f"  {name:38s} {graph_time_cupy(fn):.4f}")


if __name__ == "__main__":
    print(cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
    stages(True)
    stages(False)
