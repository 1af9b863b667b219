"""The relative-position terms on the GPU: ``rel_h`` and ``rel_w`` from q and
the tables, for the kernels that take them computed (every kernel but the
fused modes of relattn_ws and relattn_win).

``relattn_relterms_mma`` (16-bit q, head_dim <= 112: tensor cores) and
``relattn_relterms`` (float32 q, FMA) gather the table rows themselves through
SAM's index tables; other inputs go through cupy's einsum on the gathered
tables. The results are float32 (float64 for float64 q).
"""

from __future__ import annotations

from . import _build
from ._operands import copy, dense_prep, dtype_of, elem_strides, i64, ints, pad16, same, u16, u16_copy

def rel_terms(q, Rh, Rw):
    """rel_h, rel_w from q and the gathered tables, on the GPU.

    q: (B, heads, Sq, d) cupy array (float16, bfloat16, float32 or float64),
    Sq == qh * qw; Rh: (qh, kh, d), Rw: (qw, kw, d) (``get_rel_pos`` output,
    any float dtype). Returns ``rel_h`` (B, heads, Sq, kh) and ``rel_w``
    (B, heads, Sq, kw), contiguous, float32 (float64 for float64 q), with

        rel_h[b, h, y*qw + x, ky] = sum_c q[b, h, y*qw + x, c] * Rh[y, ky, c]
        rel_w[b, h, y*qw + x, kx] = sum_c q[b, h, y*qw + x, c] * Rw[x, kx, c]

    accumulated in float32 (float64). Not part of the backend contract: a
    helper for callers that keep everything on the GPU.
    """
    import cupy

    B, H, Sq, D = (int(s) for s in q.shape)
    qh, kh = int(Rh.shape[0]), int(Rh.shape[1])
    qw, kw = int(Rw.shape[0]), int(Rw.shape[1])
    if qh * qw != Sq:
        raise ValueError(f"rel_terms: Sq={Sq} != qh*qw={qh}*{qw}")
    kind = dtype_of(q)
    if kind not in ("float16", "bfloat16", "float32"):
        T = cupy.float64 if kind == "float64" else cupy.float32
        r = q.astype(T).reshape(B, H, qh, qw, D)
        rel_h = cupy.einsum("bhyxc,ykc->bhyxk", r, cupy.asarray(Rh, dtype=T))
        rel_w = cupy.einsum("bhyxc,xkc->bhyxk", r, cupy.asarray(Rw, dtype=T))
        return (cupy.ascontiguousarray(rel_h).reshape(B, H, Sq, kh),
                cupy.ascontiguousarray(rel_w).reshape(B, H, Sq, kw))
    # the gathered tables are (qh * kh, d) row tables read through an identity index
    th, tw = Rh.reshape(qh * kh, D), Rw.reshape(qw * kw, D)
    run = _terms_run(q, th, tw, (qh, qw), (kh, kw), _identity_index(qh, kh), _identity_index(qw, kw))
    return run(q, th, tw)


_TABLE_TT = {"float16": 0, "bfloat16": 1, "float32": 2}


def _mma_terms_ok(dt, D):
    return dt < 2 and pad16(D) <= 112


def _identity_index(n, k):
    import numpy as np
    from relattn.relpos import _on_device
    import cupy

    return _on_device(cupy, ("identity32", n, k), np.arange(n * k, dtype=np.int32).reshape(n, k))


def _table_preps(th, tw, mma):
    """(prep_h, prep_w, tt, aligned): how the row tables reach the terms
    kernel, the table dtype code the kernel is built for, and whether both
    prepared tables start on 16 bytes."""
    if not mma:  # the SIMT kernel reads float32 tables
        return dense_prep(th, "float32"), dense_prep(tw, "float32"), 2, True
    names = (dtype_of(th), dtype_of(tw))
    if names[0] != names[1] or names[0] not in _TABLE_TT:  # one kernel reads both: one dtype
        return dense_prep(th, "float32"), dense_prep(tw, "float32"), 2, True
    ph, pw = dense_prep(th), dense_prep(tw)
    aligned = all(p is not same or t.data.ptr % 16 == 0 for p, t in ((ph, th), (pw, tw)))
    return ph, pw, _TABLE_TT[names[0]], aligned


def _relterms_tile(k: int):
    """(rows, columns) of relattn_relterms's output tile for key grids up to k
    (the kernel's BM for its BN)."""
    return (128, 16) if k <= 16 else (64, 32) if k <= 32 else (64, 64)


def _terms_run(q, th, tw, q_size, k_size, idx_h, idx_w, resize=(None, None)):
    """``run(q, th, tw) -> (rel_h, rel_w)``: the terms kernel reading the rows of
    the (L, d) tables th / tw through the int32 index tables idx_h (qh, kh) and
    idx_w (qw, kw); ``resize`` gives the row counts to resize each table to
    first (None: use as is). Valid for arrays of the signature of these."""
    import cupy
    import numpy as np

    B, H, Sq, D = (int(s) for s in q.shape)
    (qh, qw), (kh, kw) = q_size, k_size
    dt = {"float16": 0, "bfloat16": 1, "float32": 2}[dtype_of(q)]
    mma = _mma_terms_ok(dt, D)
    pq = same if dt == 2 else u16
    if q.strides[-1] != q.dtype.itemsize and D > 1:
        pq = copy if dt == 2 else u16_copy
        st = [H * Sq * D, Sq * D, D]
    else:
        st = elem_strides(q)[:3]
    # a resized table is a new contiguous array of the same dtype
    ex_h = th if resize[0] is None else cupy.empty((resize[0], D), dtype=th.dtype)
    ex_w = tw if resize[1] is None else cupy.empty((resize[1], D), dtype=tw.dtype)
    ph, pw, tt, aligned = _table_preps(ex_h, ex_w, mma)
    BH = B * H
    # output tile (rows, columns): the SIMT kernel narrows its columns for small grids
    bm, bn = (64, 64) if mma else _relterms_tile(max(kh, kw))
    nblk_h = qh * ((BH * qw + bm - 1) // bm) * ((kh + bn - 1) // bn)
    nblk_w = qw * ((BH * qh + bm - 1) // bm) * ((kw + bn - 1) // bn)
    head = ints(H, qh, qw, D, kh, kw) + tuple(i64(s) for s in st) + ints(BH, nblk_h)
    if mma:
        hd = pad16(D)
        names = {(a, b): f"relattn_relterms_mma<{a}, {hd}, {b}>" for a in (0, 1) for b in (0, 1, 2)}
        fn = _build.portable_kernel(("relterms_mma", hd), names, (dt, tt), 0, _build.family_source("terms"))
        # 16-byte loads when every row start is 16-byte aligned
        vec = D % 8 == 0 and all(s % 8 == 0 for s in st) and (pq is not u16 or q.data.ptr % 16 == 0) and aligned
        tail, block = head + (np.int32(vec),), (128,)
    else:
        names = {(a, b): f"relattn_relterms<{a}, {b}>" for a in (0, 1, 2) for b in (16, 32, 64)}
        fn = _build.portable_kernel(("relterms", 0), names, (dt, bn), 0, _build.family_source("terms"))
        tail, block = head, (256,)
    grid = (nblk_h + nblk_w,)
    f32 = cupy.float32
    Lh, Lw = resize
    if Lh is not None or Lw is not None:
        from relattn.relpos import resize_rel_pos
    # the argument block is built once; a call writes the five pointers (an
    # operand read in place needs no uint16 view: only its address travels)
    launch = None
    if grid[0]:
        launch = _build.RawLaunch(fn, grid, block, 0,
                                  ["ptr"] * 3 + [idx_h.data.ptr, idx_w.data.ptr] + ["ptr"] * 2 + list(tail))
        launch.keep = (idx_h, idx_w)   # the index tables live as long as the launch
    pq, ph, pw = (same if prep is u16 else prep for prep in (pq, ph, pw))
    get_stream, empty = cupy.cuda.get_current_stream, cupy.empty

    def run(q, th, tw):
        if Lh is not None:
            th = resize_rel_pos(th, Lh)
        if Lw is not None:
            tw = resize_rel_pos(tw, Lw)
        rel_h = empty((B, H, Sq, kh), dtype=f32)
        rel_w = empty((B, H, Sq, kw), dtype=f32)
        if launch is not None:
            a, h, w = pq(q), ph(th), pw(tw)
            launch((a.data.ptr, h.data.ptr, w.data.ptr, rel_h.data.ptr, rel_w.data.ptr), (), get_stream().ptr)
        return rel_h, rel_w

    return run


def rel_terms_from_tables(q, rel_pos_h, rel_pos_w, q_size, k_size):
    """rel_h, rel_w (float32) from q and the stored tables, on the GPU.

    Same result as ``rel_terms(q, get_rel_pos(...), get_rel_pos(...))`` but the
    kernel gathers the table rows itself (no per-call gather; no dtype
    conversion of the tables for half-precision q). q: float16 / bfloat16
    with head_dim <= 112 (tensor cores) or float32 (FMA); other inputs go
    through :func:`rel_terms`. Tables are resized first when
    their length differs from ``2 * max(q, k) - 1`` (SAM's rule).
    """
    return terms_plan(q, rel_pos_h, rel_pos_w, q_size, k_size)(q, rel_pos_h, rel_pos_w)


def terms_plan(q, rel_pos_h, rel_pos_w, q_size, k_size):
    """``run(q, rel_pos_h, rel_pos_w) -> (rel_h, rel_w)`` of
    :func:`rel_terms_from_tables`, valid for arrays of the signature of these."""
    import cupy

    from relattn.relpos import _device_index32, get_rel_pos

    D = int(q.shape[-1])
    (qh, qw), (kh, kw) = q_size, k_size
    dt = {"float16": 0, "bfloat16": 1, "float32": 2}.get(dtype_of(q))
    if dt is None or not (dt == 2 or _mma_terms_ok(dt, D)):
        return lambda q, th, tw: rel_terms(q, get_rel_pos(qh, kh, th), get_rel_pos(qw, kw, tw))
    Lh, Lw = 2 * max(qh, kh) - 1, 2 * max(qw, kw) - 1
    resize = (Lh if rel_pos_h.shape[0] != Lh else None, Lw if rel_pos_w.shape[0] != Lw else None)
    return _terms_run(q, rel_pos_h, rel_pos_w, q_size, k_size,
                      _device_index32(cupy, qh, kh), _device_index32(cupy, qw, kw), resize)


def plan(q, rel_pos_h, rel_pos_w, q_size, k_size):
    """``(run(q, rel_pos_h, rel_pos_w) -> (rel_h, rel_w), how)`` for arrays of
    the signature of these: the terms kernel ("kernel"), or for float64 inputs
    and 16-bit head dims above 112 cupy's einsum on the gathered tables ("einsum")."""
    if "float64" in (dtype_of(q), dtype_of(rel_pos_h), dtype_of(rel_pos_w)):
        from relattn.relpos import decomposed_rel_pos

        return (lambda q, th, tw: decomposed_rel_pos(q, th, tw, q_size, k_size)), "einsum"
    dt = {"float16": 0, "bfloat16": 1, "float32": 2}.get(dtype_of(q))
    how = "kernel" if dt == 2 or _mma_terms_ok(dt, int(q.shape[-1])) else "einsum"
    return terms_plan(q, rel_pos_h, rel_pos_w, q_size, k_size), how
