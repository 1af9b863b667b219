"""The attention core's backward on the GPU: fused kernels for float16,
bfloat16 and float32 inputs, CuPy operations over chunks for the rest.

Fused (:func:`fused_core_backward`): float16 / bfloat16 q, k, v on
``mma.sync`` with float32 accumulation (``cuda/bwd.cu``), float32 on the
SIMT cores with FMA (``cuda/bwd32.cu``). The 16-bit pullback runs three
kernels: one pass over the keys per block of 64 query rows for each row's
log-sum-exp and its exact ``delta = rowsum(P * dP)``, then one per block of
64 query rows (dq and the terms' gradients, summed over the key tiles) and
one per block of 64 keys (dk and dv, summed over the query tiles), each
recomputing its tiles of the logits and weights. The float32 forward keeps
each row's log-sum-exp (:func:`row_lse`) and its pullback takes ``delta``
from ``out``. On the tensor cores P and dS are rounded to the input's 16-bit
type for the products, as in flash attention's backward; the terms'
gradients are summed in float32 from the unrounded dS. On Hopper the dq and
dk / dv kernels have a second form on warpgroup products (``wgmma``,
``cuda/bwd_wg.cu``, head_dim 64 and 80: :func:`wg_reasons`), the same
formulas and the same bits with each operand tile read once per 64 rows;
it runs dk / dv wherever it can and dq from 1024 keys on
(:func:`kernel_forms`).

Chunked (:func:`row_stats`, :func:`core_backward`), for every other input
(float64, and what :func:`fused_reasons` turns away):

Per (batch*head) ``n``, with the logits ``S = scale * q k^T + rel_h[i, ky] +
rel_w[i, kx]`` (key ``j = ky * k_w + kx``) and the weights ``P = exp(S - m) /
l`` from each logit row's max ``m`` and sum of exponentials ``l``, the
pullback of a cotangent ``dO`` of ``O = P V`` is::

    dV = P^T dO          dP = dO V^T          D = rowsum(P * dP)
    dS = P * (dP - D)
    dq = scale * dS K    dk = scale * dS^T q
    d_rel_h[i, ky] = sum_kx dS[i, (ky, kx)]     d_rel_w[i, kx] = sum_ky dS[i, (ky, kx)]

(``D`` is ``rowsum(dO * O)`` for the exact ``O = P V``.) Nothing Sq x Sk is
held whole: the work goes by chunks, each a block of (batch*head) pairs and
query rows whose logits fit :data:`CHUNK_BYTES` (as many whole heads as fit,
else one head's rows, at least one row), and each chunk holds two buffers of
that size: the logits turned into ``P`` in place, and ``dP`` turned into
``dS`` in place. Every row of a chunk sees all keys, so ``D`` and the terms'
gradients of a row come from one chunk; ``dk`` and ``dv`` are sums over the
row chunks of a head, accumulated transposed (``q^T dS`` and ``dO^T P`` take
the chunks as they lie, where ``dS^T q`` would copy ``dS``). The other
buffers are the size of the inputs: compute-dtype copies of q, k, v, dO
(and k, v transposed), the gradients and the statistics.

:func:`row_stats` computes ``m`` and ``l`` with the same logits, chunk by
chunk, for the forward; :func:`core_backward` reads them back. Half-precision
inputs are computed in float32, float64 in float64, and the results stay in
that compute dtype (the caller adds the tables' part of dq and rounds once).
Importing this module does not import CuPy.
"""

from __future__ import annotations

import enum
import functools

import numpy as np

from relattn._arrays import astype, compute_dtype
from relattn._cache import BoundedCache

from . import tuning

__all__ = ["CHUNK_BYTES", "chunk_shape", "row_stats", "core_backward", "fused_reasons", "row_lse",
           "fused_core_backward", "forward_stats", "core_gradients"]

# Bytes of one chunk's logits (a block of (batch*head) pairs by query rows by
# all keys, in the compute dtype). A chunk of the backward holds two such
# buffers (P and dS), a chunk of row_stats one.
CHUNK_BYTES = 64 * 2**20

_rowdot_kernel: list = []


def chunk_shape(pairs: int, q_len: int, k_len: int, itemsize: int) -> tuple[int, int]:
    """(pairs, query rows) of one chunk: as many whole heads as fit
    :data:`CHUNK_BYTES`, else one head's rows, as many as fit (at least one)."""
    head_bytes = q_len * k_len * itemsize
    if head_bytes <= CHUNK_BYTES:
        return max(1, min(pairs, CHUNK_BYTES // max(1, head_bytes))), q_len
    return 1, min(q_len, max(1, CHUNK_BYTES // (k_len * itemsize)))


def _chunks(pairs, q_len, k_len, itemsize):
    """The (pair slice, row slice) of every chunk. A chunk of several pairs
    takes whole heads, so each chunk's slice of a C-contiguous (pairs, rows,
    ...) array is C-contiguous."""
    step, rows = chunk_shape(pairs, q_len, k_len, itemsize)
    for p0 in range(0, pairs, step):
        for r0 in range(0, q_len, rows):
            yield slice(p0, p0 + step), slice(r0, r0 + rows)


def _flat(x, work):
    """``x`` (B, H, S, c) as a C-contiguous (B*H, S, c) array of ``work``."""
    import cupy

    return cupy.ascontiguousarray(astype(x, work)).reshape(-1, x.shape[2], x.shape[3])


def _transposed(x3):
    """(n, a, b) -> C-contiguous (n, b, a)."""
    import cupy

    return cupy.ascontiguousarray(x3.transpose(0, 2, 1))


def _rowdot(a, b):
    """``sum(a * b, axis=-1, keepdims=True)`` without an ``a * b`` buffer."""
    import cupy

    if not _rowdot_kernel:
        _rowdot_kernel.append(cupy.ReductionKernel(
            "T x, T y", "T z", "x * y", "a + b", "z = a", "0", "relattn_backward_rowdot"))
    return _rowdot_kernel[0](a, b, axis=a.ndim - 1, keepdims=True)


def _logits(q_scaled, kT, rel_h, rel_w, k_size):
    """``S = (scale q) k^T`` then ``+ rel_h[i, ky]`` then ``+ rel_w[i, kx]``
    (SAM's order), for one chunk: q_scaled (n, m, d), kT (n, d, Sk), rel_h
    (n, m, k_h) and rel_w (n, m, k_w) or both None. A new (n, m, Sk) array."""
    import cupy

    S = cupy.matmul(q_scaled, kT)
    if rel_h is not None:
        k_h, k_w = k_size
        grid = S.reshape(S.shape[0], S.shape[1], k_h, k_w)   # a view: key j = ky * k_w + kx
        grid += rel_h[..., :, None]
        grid += rel_w[..., None, :]
    return S


def _terms3(rel_h, rel_w, work):
    if rel_h is None:
        return None, None
    return _flat(rel_h, work), _flat(rel_w, work)


def row_stats(q, k, rel_h, rel_w, k_size, scale):
    """Each logit row's max and sum of exponentials: (B, H, Sq, 2) in the
    compute dtype, ``[..., 0]`` the max ``m``, ``[..., 1]`` the sum ``l =
    sum_j exp(S_j - m)``. ``q`` (B, H, Sq, d), ``k`` (B, H, Sk, d) CuPy
    arrays; ``rel_h`` (B, H, Sq, k_h), ``rel_w`` (B, H, Sq, k_w) or None.
    The logits are those :func:`core_backward` computes (same operations,
    same chunks). A row whose logits are all -inf has ``m = -inf`` and ``l``
    NaN (its gradients are NaN, as the reference's)."""
    import cupy

    B, H, q_len, _ = q.shape
    k_len = k.shape[2]
    work = compute_dtype(q.dtype)
    pairs = B * H
    stats = cupy.empty((pairs, q_len, 2), dtype=work)
    if pairs == 0:
        return stats.reshape(B, H, q_len, 2)
    q3 = _flat(q, work)
    kT = _transposed(_flat(k, work))
    h3, w3 = _terms3(rel_h, rel_w, work)
    s = work.type(scale)
    for ps, rs in _chunks(pairs, q_len, k_len, work.itemsize):
        S = _logits(q3[ps, rs] * s, kT[ps], None if h3 is None else h3[ps, rs],
                    None if w3 is None else w3[ps, rs], k_size)
        row_max = S.max(axis=2, keepdims=True)
        S -= row_max
        cupy.exp(S, out=S)
        stats[ps, rs, 0:1] = row_max
        stats[ps, rs, 1:2] = S.sum(axis=2, keepdims=True)
    return stats.reshape(B, H, q_len, 2)


def core_backward(q, k, v, rel_h, rel_w, k_size, scale, out, dout, stats):
    """The attention core's gradients ``(dq, dk, dv, d_rel_h, d_rel_w)``.

    ``q`` (B, H, Sq, d), ``k`` / ``v`` (B, H, Sk, d) and ``dout`` (B, H, Sq,
    d) CuPy arrays of one dtype; ``rel_h`` (B, H, Sq, k_h) and ``rel_w`` (B,
    H, Sq, k_w) the terms, or both None; ``stats`` from :func:`row_stats`.
    Returns C-contiguous arrays of the compute dtype: dq, dk, dv of the
    shapes of q, k, v, and d_rel_h, d_rel_w of the terms' shapes (None
    without terms). ``dq`` is the core's part only (``scale * dS k``); the
    terms reach q through the tables, which the caller adds.

    ``out`` is part of the contract (a flash-style kernel takes ``D =
    rowsum(dO * O)`` from it); these chunks see whole rows of ``P`` and
    ``dP`` and take ``D = rowsum(P * dP)`` instead, which for half-precision
    inputs does not see out's rounding to the half type.
    """
    import cupy

    B, H, q_len, head_dim = q.shape
    k_len, v_dim = k.shape[2], v.shape[3]
    work = compute_dtype(q.dtype)
    pairs = B * H
    use_rel = rel_h is not None
    dq = cupy.empty((pairs, q_len, head_dim), dtype=work)
    dkT = cupy.zeros((pairs, head_dim, k_len), dtype=work)   # dk^T = sum over row chunks of q^T dS
    dvT = cupy.zeros((pairs, v_dim, k_len), dtype=work)      # dv^T = sum over row chunks of dO^T P
    d_rel_h = d_rel_w = None
    if use_rel:
        k_h, k_w = k_size
        d_rel_h = cupy.empty((pairs, q_len, k_h), dtype=work)
        d_rel_w = cupy.empty((pairs, q_len, k_w), dtype=work)
    if pairs:
        q3, k3, do3 = _flat(q, work), _flat(k, work), _flat(dout, work)
        kT, vT = _transposed(k3), _transposed(_flat(v, work))
        h3, w3 = _terms3(rel_h, rel_w, work)
        st = stats.reshape(pairs, q_len, 2)
        s = work.type(scale)
        for ps, rs in _chunks(pairs, q_len, k_len, work.itemsize):
            qc, doc = q3[ps, rs], do3[ps, rs]
            # P = exp(S - m) / l, in the logits' buffer
            P = _logits(qc * s, kT[ps], None if h3 is None else h3[ps, rs],
                        None if w3 is None else w3[ps, rs], k_size)
            P -= st[ps, rs, 0:1]
            cupy.exp(P, out=P)
            P /= st[ps, rs, 1:2]
            dvT[ps] += cupy.matmul(_transposed(doc), P)          # dV^T += dO^T P
            dS = cupy.matmul(doc, vT[ps])                        # dP = dO V^T
            dS -= _rowdot(P, dS)                                 # dP - D, D = rowsum(P * dP)
            dS *= P                                              # dS = P * (dP - D)
            if use_rel:
                grid = dS.reshape(dS.shape[0], dS.shape[1], k_h, k_w)
                d_rel_h[ps, rs] = grid.sum(axis=3)               # sum over kx
                d_rel_w[ps, rs] = grid.sum(axis=2)               # sum over ky
            dq[ps, rs] = cupy.matmul(dS, k3[ps])                 # dS K (scaled below)
            dkT[ps] += cupy.matmul(_transposed(qc), dS)          # q^T dS (scaled below)
            del P, dS
        dq *= s
        dkT *= s
    dk = _transposed(dkT).reshape(B, H, k_len, head_dim)
    dv = _transposed(dvT).reshape(B, H, k_len, v_dim)
    dq = dq.reshape(B, H, q_len, head_dim)
    if use_rel:
        d_rel_h = d_rel_h.reshape(B, H, q_len, k_h)
        d_rel_w = d_rel_w.reshape(B, H, q_len, k_w)
    return dq, dk, dv, d_rel_h, d_rel_w


# ------------------------------------------------------------------ fused
# relattn_bwd_rows / _dq / _dkv (cuda/bwd.cu, 16-bit on mma.sync) and
# relattn_bwd32_stats / _dq / _dkv (cuda/bwd32.cu, float32 on the SIMT cores):
# flash-style, nothing Sq x Sk in memory.
FUSED_DTYPES = ("float16", "bfloat16", "float32")
FUSED_MAX_HEAD_DIM = 128
FUSED_MAX_TERMS = 256   # k_h + k_w: GENERIC sums the terms' gradients of 64 rows in shared memory
_LOG2E = 1.4426950408889634
_LDT32 = 68             # bwd32.cu's RB32_LDT: a transposed tile's row of 64 values, padded
_SW_Q, _SW_K, _DS = 72, 68, 68   # bwd.cu's RB_SW_Q, RB_SW_K, RB_DS


class Bias(enum.IntEnum):
    """The bias modes of the fused kernels (their ``REL``)."""
    NONE = 0        # no terms
    KEY_ROWS = 1    # k_w == 64 and Sk % 64 == 0: a 64-key tile is one key row
    GENERIC = 2     # any grid: (ky, kx) per key


def _names(dt: int, hd: int) -> dict:
    """The kernels' instantiation names, by (kind, bias): dt 0 float16, 1
    bfloat16 (bwd.cu: "stats" the log-sum-exp alone, "rows" with delta), 2
    float32 (bwd32.cu)."""
    if dt == 2:
        return {(kind, rel): f"relattn_bwd32_{kind}<{hd}, {rel}>"
                for kind in ("stats", "dq", "dkv") for rel in (0, 1, 2)}
    names = {(kind, rel): f"relattn_bwd_{kind}<{dt}, {hd}, {rel}>" for kind in ("dq", "dkv") for rel in (0, 1, 2)}
    for rel in (0, 1, 2):
        names[("stats", rel)] = f"relattn_bwd_rows<{dt}, {hd}, {rel}, false>"
        names[("rows", rel)] = f"relattn_bwd_rows<{dt}, {hd}, {rel}, true>"
    names[("delta", None)] = f"relattn_bwd_delta<{dt}>"
    return names


def _padded(d: int) -> int:
    return max(16, (d + 15) // 16 * 16)


def _key_columns(bias, kh: int, kw: int) -> int:
    """bwd.cu's ``nh``: the rel_h columns a block of 64 keys reads."""
    return 1 if bias != Bias.GENERIC else min(kh, 63 // kw + 2)


def _smem(dtype_name_: str, d: int, bias, kh: int, kw: int) -> dict:
    """Shared bytes of each kernel. float32: tiles transposed (HD, 68) and the
    (64, 68) P / dS tiles. 16-bit: double-buffered tiles of (64, HD + 8);
    the query-major kernels add their rows' terms, the generic dq their
    gradients and a dS tile per warp; dkv's stages add the query tile's
    lse2, delta and terms."""
    hd = _padded(d)
    if dtype_name_ == "float32":
        tile, rows = hd * _LDT32 * 4, 64 * _LDT32 * 4
        sizes = {"stats": 2 * tile, "dq": 4 * tile + rows, "dkv": 4 * tile + 2 * rows}
        if bias == Bias.GENERIC:
            sizes["dq"] += 64 * (kh + kw) * 4
        return sizes
    tile = 64 * (hd + 8) * 2
    terms = 0 if bias == Bias.NONE else 64 * (kh + (_SW_Q if bias == Bias.KEY_ROWS else kw)) * 4
    key_terms = 0 if bias == Bias.NONE else 64 * (_key_columns(bias, kh, kw)
                                                  + (_SW_K if bias == Bias.KEY_ROWS else kw)) * 4
    sizes = {"stats": 2 * tile + terms, "rows": 4 * tile + terms, "dq": 4 * tile + terms,
             "dkv": 4 * tile + 2 * (128 * 4 + key_terms), "delta": 0}
    if bias == Bias.GENERIC:
        sizes["dq"] += 64 * (kh + kw) * 4 + 64 * _DS * 4
    return sizes


def fused_reasons(q, k, v, rel_h, k_size) -> list[str]:
    """Why the fused kernels cannot take this problem (empty: they can).
    ``q``, ``k``, ``v`` CuPy arrays (B, H, S, d); ``rel_h`` the terms or None."""
    from relattn._arrays import dtype_name

    from . import _device

    terms = None if rel_h is None else tuple(int(n) for n in k_size)
    return list(_fused_reasons(dtype_name(q.dtype), dtype_name(k.dtype), dtype_name(v.dtype), tuple(q.shape),
                               tuple(k.shape), tuple(v.shape), terms, _device.current()))


@functools.lru_cache(maxsize=256)
def _fused_reasons(name, k_name, v_name, q_shape, k_shape, v_shape, terms, dev) -> tuple:
    """:func:`fused_reasons` by signature (``terms``: the key grid, or None
    without terms), asked once per signature."""
    reasons = []
    if name not in FUSED_DTYPES or k_name != name or v_name != name:
        reasons.append(f"dtype {name} (takes {', '.join(FUSED_DTYPES)} for q, k and v alike)")
    d = q_shape[3]
    step = 1 if name == "float32" else 8
    if d % step or d > FUSED_MAX_HEAD_DIM or v_shape[3] != d:
        what = "any" if step == 1 else f"a multiple of {step}"
        reasons.append(f"head_dim {d} (takes {what} up to {FUSED_MAX_HEAD_DIM}, v's the same)")
    if 0 in q_shape or 0 in k_shape:
        reasons.append("an empty axis")
    if k_shape[2] >= 2**22:
        reasons.append(f"{k_shape[2]} keys (takes fewer than 2**22)")
    if terms is not None and sum(terms) > FUSED_MAX_TERMS:
        reasons.append(f"k_h + k_w = {sum(terms)} > {FUSED_MAX_TERMS}")
    if name != "float32" and dev.cc < 80:
        reasons.append(f"compute capability {dev.cc // 10}.{dev.cc % 10} < 8.0 (mma.sync bf16)")
    if not reasons:
        kh, kw = (1, 1) if terms is None else terms
        bias = Bias.NONE if terms is None else _bias(True, terms, k_shape[2])
        need = max(_smem(name, d, bias, kh, kw).values())
        if need > dev.smem_optin:
            reasons.append(f"{need} bytes of shared memory per block (the device gives {dev.smem_optin})")
    return tuple(reasons)


# relattn_bwd_wg_dq / _dkv (cuda/bwd_wg.cu): the 16-bit dq and dk / dv kernels
# on wgmma (sm_90a), a block of NWG warpgroups of 64 rows each (queries in dq,
# keys in dkv; tuning.bwd_wg_warpgroups).
WG_HEAD_DIMS = (64, 80)    # padded head dims: the 128-byte swizzle of 64 columns, head_dim 80's 16 after it


def wg_reasons(q, k, v, rel_h, k_size) -> list[str]:
    """Why the wgmma kernels (``kernels="wg"``) cannot take this problem
    (empty: they can); :func:`fused_reasons`' first."""
    from relattn._arrays import dtype_name

    from . import _device

    terms = None if rel_h is None else tuple(int(n) for n in k_size)
    return list(_wg_reasons(dtype_name(q.dtype), dtype_name(k.dtype), dtype_name(v.dtype), tuple(q.shape),
                            tuple(k.shape), tuple(v.shape), terms, _device.current()))


@functools.lru_cache(maxsize=256)
def _wg_reasons(name, k_name, v_name, q_shape, k_shape, v_shape, terms, dev) -> tuple:
    reasons = list(_fused_reasons(name, k_name, v_name, q_shape, k_shape, v_shape, terms, dev))
    if reasons:
        return tuple(reasons)
    if name == "float32":
        reasons.append("dtype float32 (the wgmma kernels take float16 and bfloat16)")
    hd = _padded(q_shape[3])
    if hd not in WG_HEAD_DIMS:
        reasons.append(f"head_dim {q_shape[3]} (the wgmma kernels take 56, 64, 72 and 80)")
    if not dev.hopper:
        reasons.append(f"Hopper kernels unavailable: {dev.hopper_reason}")
    if not reasons:
        kh, kw = (1, 1) if terms is None else terms
        bias = Bias.NONE if terms is None else _bias(True, terms, k_shape[2])
        for kind in ("dq", "dkv"):
            need = _wg_smem(kind, hd, bias, kh, kw, tuning.bwd_wg_warpgroups(kind, hd))
            if need > dev.smem_optin:
                reasons.append(f"{need} bytes of shared memory per {kind} block (the device gives {dev.smem_optin})")
    return tuple(reasons)


def wg_kernel_name(kind: str, dt: int, hd: int, bias, nwg: int) -> str:
    """The instantiation of relattn_bwd_wg_<kind> ("dq" or "dkv"): dt 0
    float16 / 1 bfloat16, hd the padded head_dim, nwg warpgroups per block."""
    return f"relattn_bwd_wg_{kind}<{dt}, {hd}, {int(bias)}, {nwg}>"


def _wg_key_columns(bias, kh: int, kw: int, nwg: int) -> int:
    """bwd_wg.cu's ``nh``: the rel_h columns a block of 64 NWG keys reads."""
    if bias == Bias.NONE:
        return 1
    return nwg if bias == Bias.KEY_ROWS else min(kh, (64 * nwg - 1) // kw + 2)


def _wg_smem(kind: str, hd: int, bias, kh: int, kw: int, nwg: int) -> int:
    """Shared bytes of relattn_bwd_wg_<kind> (the layouts in bwd_wg.cu): 1024
    for the swizzled tiles' alignment, the block's two tiles of 64 NWG rows,
    two stages of two 64-row tiles, then the float32 rows: dq's terms (and in
    the generic mode their gradients and a dS tile per warp), dkv's lse2,
    delta and terms per stage."""
    n = 1024 + 2 * 64 * nwg * hd * 2 + 4 * 64 * hd * 2
    if kind == "dq":
        rows = 64 * nwg
        if bias != Bias.NONE:
            n += rows * (kh + (_SW_Q if bias == Bias.KEY_ROWS else kw)) * 4
        if bias == Bias.GENERIC:
            n += rows * (kh + kw) * 4 + 4 * nwg * 16 * _DS * 4
        return n
    terms = 0 if bias == Bias.NONE else 64 * (_wg_key_columns(bias, kh, kw, nwg)
                                              + (_SW_K if bias == Bias.KEY_ROWS else kw))
    return n + 2 * (128 + terms) * 4


def kernel_forms(q, k, v, rel_h, k_size, kernels="auto") -> dict:
    """Which form runs the fused 16-bit dq and dk / dv kernels of this
    problem ({"dq": "mma" or "wg", "dkv": ...}; float32 inputs: "simt"), for
    ``kernels`` "auto", "mma" or "wg" (ValueError where "wg" cannot run,
    naming why)."""
    from relattn._arrays import dtype_name

    if kernels not in ("auto", "mma", "wg"):
        raise ValueError(f"kernels: expected 'auto', 'mma' or 'wg', got {kernels!r}")
    why = wg_reasons(q, k, v, rel_h, k_size)
    if kernels == "wg" and why:
        raise ValueError("kernels='wg' cannot take this problem: " + "; ".join(why))
    if dtype_name(q.dtype) == "float32":
        return {"dq": "simt", "dkv": "simt"}
    if kernels == "mma" or why:
        return {"dq": "mma", "dkv": "mma"}
    dq = "wg" if kernels == "wg" or k.shape[2] >= tuning.BWD_WG_DQ_MIN_KEYS else "mma"
    return {"dq": dq, "dkv": "wg"}


def _bias(rel_h, k_size, k_len) -> Bias:
    if rel_h is None:
        return Bias.NONE
    return Bias.KEY_ROWS if (k_size[1] == 64 and k_len % 64 == 0) else Bias.GENERIC


class _Fused:
    """The fused kernels for one problem: its bias mode, block size, shared
    bytes per kernel and the operands as the kernels read them. One per
    (dtype, head_dim, bias mode, key grid): :meth:`of`."""

    @classmethod
    def of(cls, q, rel_h, k_size, k_len):
        from relattn._arrays import dtype_name

        bias = _bias(rel_h, k_size, k_len)
        kh, kw = (1, 1) if rel_h is None else (int(n) for n in k_size)
        return cls._cached(dtype_name(q.dtype), int(q.shape[3]), bias, kh, kw)

    @classmethod
    @functools.lru_cache(maxsize=64)
    def _cached(cls, name, d, bias, kh, kw):
        return cls(name, d, bias, kh, kw)

    def __init__(self, name, d, bias, kh, kw):
        from . import _build

        hd = self.hd = _padded(d)
        self.float32 = name == "float32"
        dt = self.dt = 2 if self.float32 else 1 if name == "bfloat16" else 0
        self.bias = bias
        self.kh, self.kw = kh, kw
        self.nh = _key_columns(self.bias, self.kh, self.kw)
        self.threads = 256 if self.float32 else 128
        self.smem = _smem(name, d, self.bias, self.kh, self.kw)
        names = _names(dt, hd)
        family = "bwd32" if self.float32 else "bwd"
        source = _build.family_source(family)
        self._get = lambda kind: _build.portable_kernel(
            (family, dt, hd), names, (kind, None if kind == "delta" else int(self.bias)), self.smem[kind], source)

    def launch(self, kind, blocks, args):
        self._get(kind)((blocks,), (self.threads,), args, shared_mem=self.smem[kind])

    def launch_wg(self, kind, pairs, rows, args, nwg=None):
        """relattn_bwd_wg_<kind> ("dq" or "dkv") over ``rows`` rows (queries
        or keys) of each of ``pairs`` heads; dkv's ``nh`` is appended here.
        ``nwg``: warpgroups per block (default tuning.bwd_wg_warpgroups)."""
        from . import _build

        nwg = tuning.bwd_wg_warpgroups(kind, self.hd) if nwg is None else nwg
        fn = _build.sm90_kernel(wg_kernel_name(kind, self.dt, self.hd, self.bias, nwg))
        if kind == "dkv":
            args = args + (np.int32(_wg_key_columns(self.bias, self.kh, self.kw, nwg)),)
        fn((pairs * -(-rows // (64 * nwg)),), (128 * nwg,), args,
           shared_mem=_wg_smem(kind, self.hd, self.bias, self.kh, self.kw, nwg))

    def operand(self, x):
        """(B, H, S, d) -> C-contiguous (B*H, S, d): float32 as it is, 16-bit as its bits."""
        import cupy

        from relattn.backends.gpu.cublas import contiguous

        if not self.float32:
            x = x.view(cupy.uint16)
        return contiguous(x).reshape(-1, x.shape[2], x.shape[3])


def _terms32(rel_h, rel_w):
    import cupy

    if rel_h is None:
        dummy = cupy.zeros((1,), dtype=np.float32)
        return dummy, dummy
    return (cupy.ascontiguousarray(astype(t, np.float32)).reshape(-1, t.shape[2], t.shape[3])
            for t in (rel_h, rel_w))


def row_lse(q, k, rel_h, rel_w, k_size, scale):
    """Each logit row's log-sum-exp in the log2 domain, ``log2 sum_j
    exp2(log2(e) * S_j)``, (B, H, Sq) float32, by the stats kernel (the
    logits as the fused backward computes them); -inf for a row whose
    logits are all -inf. Inputs that :func:`fused_reasons` accepts."""
    import cupy

    B, H, q_len, d = q.shape
    k_len = k.shape[2]
    f = _Fused.of(q, rel_h, k_size, k_len)
    rh, rw = _terms32(rel_h, rel_w)
    lse = cupy.empty((B * H, q_len), dtype=np.float32)
    tail = tuple(np.int32(n) for n in (q_len, k_len, d, f.kh, f.kw)) + (
        np.float32(scale * _LOG2E), np.float32(1.0 / f.kw))
    qx, kx = f.operand(q), f.operand(k)
    args = (qx, kx, rh, rw, lse) if f.float32 else (qx, kx, kx, qx, rh, rw, lse, lse)
    f.launch("stats", B * H * -(-q_len // 64), args + tail)
    return lse.reshape(B, H, q_len)


def fused_core_backward(q, k, v, rel_h, rel_w, k_size, scale, out, dout, lse=None, kernels="auto",
                        warpgroups=None):
    """:func:`core_backward`'s gradients by the fused kernels: (B, H, ...)
    arrays, ``dq`` the core's part only; float32, but for 16-bit inputs
    ``dk`` and ``dv`` come in their type (rounded once from float32). float32 inputs take
    :func:`row_lse`'s ``lse`` from the forward and ``delta = rowsum(dO *
    O)`` from ``out``. 16-bit inputs take the forward kernel's ``lse``
    where it kept one (:func:`relattn.backends.gpu.planner.Plan.writes_lse`)
    and ``delta = rowsum(dO * O)`` from the stored 16-bit ``out``, as flash
    attention's backward does; without it (``lse`` None) they compute each
    row's log-sum-exp and the exact ``delta = rowsum(P * dP)`` here, in one
    more pass over the keys (the rounding of ``out`` reaches the terms'
    gradients, partial sums of dS, at about 1e-3 of their size: within the
    16-bit gradients' 1e-2). Inputs that :func:`fused_reasons` accepts.
    ``kernels``: the 16-bit dq and dk / dv kernels' form: "mma"
    (``cuda/bwd.cu``), "wg" (their ``wgmma`` form, ``cuda/bwd_wg.cu``; inputs
    that :func:`wg_reasons` accepts, else ValueError) or "auto": "wg" for dk
    / dv where it can run, and for dq from :data:`tuning.BWD_WG_DQ_MIN_KEYS`
    keys on (:func:`kernel_forms` names the choice). ``warpgroups``: the
    wgmma kernels' warpgroups per block, 1 or 2 (default
    :func:`tuning.bwd_wg_warpgroups`). Each signature's launches are
    planned on its first call (:class:`_Launches16`, :func:`_planned`)."""
    import cupy

    B, H, q_len, d = q.shape
    k_len = k.shape[2]
    pairs = B * H
    f = _Fused.of(q, rel_h, k_size, k_len)
    if f.float32:
        if lse is None:
            raise ValueError("lse: float32 inputs take row_lse's")
        kernel_forms(q, k, v, rel_h, k_size, kernels)   # "wg" refused with its reason
        plan = None
    else:
        if warpgroups not in (None, 1, 2):
            raise ValueError(f"warpgroups: expected None, 1 or 2, got {warpgroups!r}")
        key = ("core16", q.dtype, q.shape, k.shape, v.shape, rel_h is None, tuple(k_size), float(scale),
               lse is None, kernels, warpgroups)
        plan = _planned(key, lambda: _Launches16(f, q, k, v, rel_h, k_size, scale, lse is None, kernels, warpgroups))
    rh, rw = _terms32(rel_h, rel_w)
    f32, empty = np.float32, cupy.empty
    dq = empty((pairs, q_len, d), dtype=f32)
    half = np.float32 if f.float32 else k.dtype     # dk and dv: the 16-bit kernels round them once
    dk = empty((pairs, k_len, d), dtype=half)
    dv = empty((pairs, k_len, d), dtype=half)
    delta = empty((pairs, q_len), dtype=f32)
    if rel_h is None:
        d_rel_h = d_rel_w = cupy.zeros((1,), dtype=f32)
    else:
        d_rel_h = empty((pairs, q_len, f.kh), dtype=f32)
        d_rel_w = empty((pairs, q_len, f.kw), dtype=f32)
    qx, kx, vx, dox = (f.operand(x) for x in (q, k, v, dout))
    if f.float32:
        ints = tuple(np.int32(n) for n in (q_len, k_len, d, f.kh, f.kw))
        tail = ints + (f32(scale * _LOG2E), f32(1.0 / f.kw), f32(scale))
        q_blocks, k_blocks = pairs * -(-q_len // 64), pairs * -(-k_len // 64)
        lse = lse.reshape(pairs, q_len)
        f.launch("dq", q_blocks, (qx, kx, vx, f.operand(out), dox, rh, rw, lse, delta, dq, d_rel_h, d_rel_w) + tail)
        f.launch("dkv", k_blocks, (qx, kx, vx, dox, rh, rw, lse, delta, dk, dv) + tail)
    else:
        stream = cupy.cuda.get_current_stream().ptr
        if lse is None:
            lse = empty((pairs, q_len), dtype=f32)
            plan.rows((qx, kx, vx, dox, rh, rw, lse, delta), stream)
        else:
            lse = lse.reshape(pairs, q_len)
            plan.delta((dox, f.operand(out), delta), stream)
        plan.dq((qx, kx, vx, dox, rh, rw, lse, delta, dq, d_rel_h, d_rel_w), stream)
        plan.dkv((qx, kx, vx, dox, rh, rw, lse, delta, dk, dv), stream)
    dq = dq.reshape(B, H, q_len, d)
    dk = dk.reshape(B, H, k_len, d)
    dv = dv.reshape(B, H, k_len, d)
    if rel_h is None:
        return dq, dk, dv, None, None
    return dq, dk, dv, d_rel_h.reshape(B, H, q_len, f.kh), d_rel_w.reshape(B, H, q_len, f.kw)


class _Launch:
    """One kernel launch planned for a signature (``_build.RawLaunch``: the
    argument block built once): ``launch(arrays, stream)`` writes the
    arrays' device pointers into the ``"ptr"`` slots of ``spec``, in order,
    and launches on ``stream`` (a stream pointer). ``keep``: device arrays
    whose pointers ``spec`` holds fixed, kept alive with the launch."""

    __slots__ = ("_raw", "_keep")

    def __init__(self, fn, grid, block, smem, spec, keep=()):
        from . import _build

        grid = grid if isinstance(grid, tuple) else (grid,)
        self._raw = _build.RawLaunch(fn, grid, (block,), smem, spec)
        self._keep = keep

    def __call__(self, arrays, stream):
        self._raw(tuple(a.data.ptr for a in arrays), (), stream)


class _Launches16:
    """The 16-bit fused pullback's launches for one signature: the row pass
    (``rows``: each row's log-sum-exp and delta) or, with the forward's
    log-sum-exp, ``delta`` alone; then ``dq`` and ``dkv`` in the forms
    :func:`kernel_forms` picks (ValueError from it for a ``kernels`` that
    cannot run). Built on the first call of a signature, so that later calls
    only allocate and launch."""

    def __init__(self, f, q, k, v, rel_h, k_size, scale, rows_pass, kernels, warpgroups):
        from . import _build

        forms = kernel_forms(q, k, v, rel_h, k_size, kernels)
        B, H, q_len, d = (int(n) for n in q.shape)
        k_len, pairs, f32 = int(k.shape[2]), B * H, np.float32
        ints = tuple(np.int32(n) for n in (q_len, k_len, d, f.kh, f.kw))
        tail = ints + (f32(scale * _LOG2E), f32(1.0 / f.kw), f32(scale))
        q_blocks, k_blocks = pairs * -(-q_len // 64), pairs * -(-k_len // 64)
        if rows_pass:
            self.rows = _Launch(f._get("rows"), q_blocks, 128, f.smem["rows"], ["ptr"] * 8 + list(tail[:-1]))
        else:
            rows = pairs * q_len
            self.delta = _Launch(f._get("delta"), -(-rows // 4), 128, 0, ["ptr"] * 3 + [np.int64(rows), np.int32(d)])
        for kind, n_rows, blocks, nptr in (("dq", q_len, q_blocks, 11), ("dkv", k_len, k_blocks, 10)):
            if forms[kind] == "wg":
                nwg = tuning.bwd_wg_warpgroups(kind, f.hd) if warpgroups is None else warpgroups
                fn = _build.sm90_kernel(wg_kernel_name(kind, f.dt, f.hd, f.bias, nwg))
                extra = (np.int32(_wg_key_columns(f.bias, f.kh, f.kw, nwg)),) if kind == "dkv" else ()
                launch = _Launch(fn, pairs * -(-n_rows // (64 * nwg)), 128 * nwg,
                                 _wg_smem(kind, f.hd, f.bias, f.kh, f.kw, nwg), ["ptr"] * nptr + list(tail + extra))
            else:
                extra = (np.int32(f.nh),) if kind == "dkv" else ()
                launch = _Launch(f._get(kind), blocks, 128, f.smem[kind], ["ptr"] * nptr + list(tail + extra))
            setattr(self, kind, launch)


def takes_forward_lse(q, k, v, rel_h, k_size) -> bool:
    """The 16-bit fused kernels take this problem, and with it the forward
    kernel's log-sum-exp where the forward keeps one."""
    from relattn._arrays import dtype_name

    return dtype_name(q.dtype) != "float32" and not fused_reasons(q, k, v, rel_h, k_size)


def forward_stats(q, k, v, rel_h, rel_w, k_size, scale):
    """What the backward keeps of the forward: None where the 16-bit fused
    kernels take the problem (they compute each row's log-sum-exp in the
    pullback, with its delta), :func:`row_lse`'s (B, H, Sq) for the float32
    fused kernels, else :func:`row_stats`'s (B, H, Sq, 2).
    :func:`core_gradients` tells them apart."""
    from relattn._arrays import dtype_name

    if fused_reasons(q, k, v, rel_h, k_size):
        return row_stats(q, k, rel_h, rel_w, k_size, scale)
    if dtype_name(q.dtype) != "float32":
        return None
    return row_lse(q, k, rel_h, rel_w, k_size, scale)


def core_gradients(q, k, v, rel_h, rel_w, k_size, scale, out, dout, stats):
    """The core's gradients from :func:`forward_stats`' ``stats``: the fused
    kernels for None or a log-sum-exp, the chunks for the (max, sum) pairs."""
    if stats is None or stats.ndim == 3:
        return fused_core_backward(q, k, v, rel_h, rel_w, k_size, scale, out, dout, stats)
    return core_backward(q, k, v, rel_h, rel_w, k_size, scale, out, dout, stats)


# ------------------------------------------------------------------ terms' pullback
# relattn_bwd_terms_dq / _grid / _scatter (cuda/bwd_terms.cu): the pullback
# through rel_h = q . Rh, rel_w = q . Rw and SAM's gather, for float32
# terms' gradients and gathered tables; 16-bit or float32 q.
TERMS_DTYPES = ("float16", "bfloat16", "float32")
_TERMS_DT = {"float16": 0, "bfloat16": 1, "float32": 2}
_TERMS_SPLIT_BLOCKS = 528         # blocks the grid kernel aims for (4 per SM of an H100), splitting its rows
_TERMS_SPLIT_MIN_ROWS = 64        # but no split of fewer rows than this
_TERMS_PART_BYTES = 4 * 2**20     # nor a split buffer larger than this


_TERMS_GRID_ROWS = 32             # bwd_terms.cu's RBT_ROWS: rows a stage of the grid kernel holds


def _terms_kernel(kind, dt, variant=(), smem=0):
    """``kind`` "side" (variant (last, nj): last the side rounding to q's
    type, nj column groups of 64), "grid" (variant (ki, nj): ki values of kk
    per thread, 2 or 8) or "scatter", for q's type code ``dt``."""
    from . import _build

    which = (kind, dt if kind != "scatter" else 0, variant)
    return _build.portable_kernel(("bwd_terms",), _terms_names(), which, smem, _build.family_source("bwd_terms"))


@functools.lru_cache(maxsize=1)
def _terms_names() -> dict:
    """Every instantiation of ``cuda/bwd_terms.cu`` by (kind, q's type code,
    variant), built once (it is looked up on every launch)."""
    elem = {0: "u16", 1: "u16", 2: "float"}
    names = {("side", d, (t, nj)): f"relattn_bwd_terms_side<{d}, {elem[d]}, {'true' if t else 'false'}, {nj}>"
             for d in (0, 1, 2) for t in (0, 1) for nj in (1, 2)}
    names.update({("grid", d, (ki, nj)): f"relattn_bwd_terms_grid<{d}, {elem[d]}, {ki}, {nj}>"
                  for d in (0, 1, 2) for ki in (2, 8) for nj in (1, 2)})
    names[("scatter", 0, ())] = "relattn_bwd_terms_scatter"
    names.update({("gather", d, ()): f"relattn_bwd_terms_gather<{d}, {elem[d]}>" for d in (0, 1, 2)})
    return names


def gathered_f32(table, q_len: int, k_len: int):
    """SAM's gather of a table of ``2 * max(q_len, k_len) - 1`` rows (float16,
    bfloat16 or float32, C-contiguous) as float32 ``(q_len, k_len, D)``, by one
    kernel (``table[index]`` and a cast would be two CuPy operations)."""
    import cupy

    D = int(table.shape[1])
    dt = _terms_dt_of(table.dtype)
    out = cupy.empty((q_len, k_len, D), dtype=np.float32)
    if q_len * k_len * D:
        launch = _planned(("gather", dt, q_len, k_len, D), lambda: _gather_launch(dt, q_len, k_len, D))
        launch((table, out), cupy.cuda.get_current_stream().ptr)
    return out


def _gather_launch(dt, q_len, k_len, D):
    import cupy

    from relattn.relpos import _device_index32

    index = _device_index32(cupy, q_len, k_len)
    n = q_len * k_len * D
    return _Launch(_terms_kernel("gather", dt), -(-n // 256), 256, 0,
                   ["ptr", index.data.ptr, "ptr", np.int32(q_len * k_len), np.int32(D)], keep=(index,))


# The planned launches of the fused pullback, the terms' pullback and the
# gathers, per signature key and device.
_launches = BoundedCache(256)


def _planned(key, make):
    """What ``make()`` builds (a launch, or launches) for ``key`` on the
    current device, built on the key's first call."""
    import cupy

    return _launches.get_or_make((*key, cupy.cuda.runtime.getDevice()), make)


def _column_groups(D: int) -> int:
    """The terms' pullback kernels' column groups of 64 (D <= 128)."""
    return 1 if D <= 64 else 2


def _side(side, q_size, k_size):
    """``(na, nb, kl, sa, sb)`` of one side of the terms: query row i = bh * Sq
    + a * sa + b * sb reads table slice a of na (side h: a = y, b = x; side w:
    a = x, b = y), nb rows b per slice and batch-head, kl keys per slice."""
    (qh, qw), (kh, kw) = q_size, k_size
    return (qh, qw, kh, qw, 1) if side == "h" else (qw, qh, kw, 1, qw)


def _terms_split(na, tiles, rows, kl, D):
    """How many row ranges the grid kernel splits each (a, kk tile) into."""
    want = -(-_TERMS_SPLIT_BLOCKS // max(1, na * tiles))
    by_rows = max(1, rows // _TERMS_SPLIT_MIN_ROWS)
    by_bytes = max(1, _TERMS_PART_BYTES // max(1, na * kl * D * 4))
    return max(1, min(want, by_rows, by_bytes))


def _adjoint_launches(side, dt, nbh, Sq, D, q_size, k_size):
    """``(grid, scatter, part_shape, rows)`` of one side's table gradient
    (:func:`_gather_adjoint`): the grid kernel over q and the terms'
    gradients, its rows (batch, head, b) split for enough blocks, into
    ``part`` (splits, na, kl, D); then the gather's adjoint, which also sums
    the splits, into (rows, D)."""
    import cupy

    from relattn.autodiff import _gather_slots, _on_device

    na, nb, kl, sa, sb = _side(side, q_size, k_size)
    ki = 2 if kl <= 16 else 8
    tiles = -(-kl // (8 * ki))
    splits = _terms_split(na, tiles, nbh * nb, kl, D)
    nj = _column_groups(D)
    smem = 2 * _TERMS_GRID_ROWS * (8 * ki * 4 + 64 * nj * (4 if dt == 2 else 2)) + 2 * _TERMS_GRID_ROWS * 8
    grid = _Launch(_terms_kernel("grid", dt, (ki, nj), smem), (na, tiles, splits), 128, smem,
                   ["ptr"] * 3 + [np.int32(n) for n in (na, kl, nbh, Sq, nb, sa, sb, D, splits)])
    slots = _gather_slots(na, kl)
    width, rows = slots.shape
    dev_slots = _on_device(cupy, ("vjp-gather-slots", na, kl), slots)
    scatter = _Launch(_terms_kernel("scatter", 0), rows, 256, 0,
                      ["ptr", dev_slots.data.ptr, "ptr", np.int32(width), np.int32(rows), np.int64(na * kl),
                       np.int64(na * kl), np.int32(D), np.int32(splits)], keep=(dev_slots,))
    return grid, scatter, (splits, na, kl, D), rows


def _gather_adjoint(d3, q3, side, q_size, k_size, dt):
    """The gradient of one side's table before the resize (2 max - 1 rows,
    float32): from the terms' gradients d3 (B*H, Sq, kl) and q3 (B*H, Sq, D)
    by the grid kernel, then the gather's adjoint by the scatter kernel
    (:func:`_adjoint_launches`)."""
    import cupy

    nbh, Sq, D = (int(n) for n in q3.shape)
    grid, scatter, part_shape, rows = _planned(("adjoint", side, dt, nbh, Sq, D, q_size, k_size),
                                               lambda: _adjoint_launches(side, dt, nbh, Sq, D, q_size, k_size))
    stream = cupy.cuda.get_current_stream().ptr
    part = cupy.empty(part_shape, dtype=np.float32)
    grid((d3, q3, part), stream)
    g = cupy.empty((rows, D), dtype=np.float32)
    scatter((part, g), stream)
    return g


def _side_launches(dt, nbh, Sq, D, q_size, k_size):
    """The side kernels of :func:`terms_dq`, w then h (None where a side has no rows)."""
    out = []
    for side, last in (("w", False), ("h", True)):
        na, nb, kl, sa, sb = _side(side, q_size, k_size)
        tiles = -(-(nbh * nb) // 64)
        out.append(_Launch(_terms_kernel("side", dt, (int(last), _column_groups(D))), (tiles, na), 128, 0,
                           ["ptr"] * 4 + [np.int32(n) for n in (kl, nbh, Sq, nb, sa, sb, D)])
                   if tiles and na else None)
    return tuple(out)


def terms_dq(q, dq_core, d_rel_h, d_rel_w, Rh, Rw, q_size, k_size):
    """``dq`` of q's shape and dtype: the core's float32 part plus the terms'
    (side w added first, then side h, rounded once). ``d_rel_h`` /
    ``d_rel_w`` float32 (B, H, Sq, k_*), ``Rh`` (q_h, k_h, D) / ``Rw``
    (q_w, k_w, D) float32, q 16-bit or float32 (:data:`TERMS_DTYPES`), D <=
    128. ``dq_core`` (float32, q's shape) is the sum's workspace: when
    contiguous it is overwritten (and, for float32 q, returned)."""
    import cupy

    B, H, Sq, D = q.shape
    dt = _terms_dt(q)
    q_size, k_size = tuple(q_size), tuple(k_size)
    side_w, side_h = _planned(("sides", dt, B * H, Sq, D, q_size, k_size),
                              lambda: _side_launches(dt, B * H, Sq, D, q_size, k_size))
    dh3, dw3 = _terms3_f32(d_rel_h, d_rel_w)
    Rh, Rw = (cupy.ascontiguousarray(t) for t in (Rh, Rw))
    acc = cupy.ascontiguousarray(dq_core)
    dq = acc if dt == 2 else cupy.empty((B, H, Sq, D), dtype=q.dtype)
    stream = cupy.cuda.get_current_stream().ptr
    if side_w is not None:
        side_w((dw3, Rw, acc, acc), stream)
    if side_h is not None:
        side_h((dh3, Rh, acc, dq), stream)
    return dq.reshape(B, H, Sq, D)


def tables_pullback(q, d_rel_h, d_rel_w, q_size, k_size):
    """``(g_h, g_w)``: the gradients of the two gathered-side tables (``2 max
    - 1`` rows, float32; the resize's adjoint, if any, is the caller's), from
    the terms' gradients and q as for :func:`terms_dq`. Run after it, once
    ``dq_core`` is released, the split buffers of the grid kernel do not add
    to the backward's peak."""
    import cupy

    from relattn.backends.gpu.cublas import contiguous

    B, H, Sq, D = q.shape
    dt = _terms_dt(q)
    q3 = contiguous(q.view(cupy.uint16) if dt < 2 else q).reshape(B * H, Sq, D)
    dh3, dw3 = _terms3_f32(d_rel_h, d_rel_w)
    q_size, k_size = tuple(q_size), tuple(k_size)
    return _gather_adjoint(dh3, q3, "h", q_size, k_size, dt), _gather_adjoint(dw3, q3, "w", q_size, k_size, dt)


def _terms_dt(q):
    """q's type code for the terms' pullback kernels; head_dim <= 128."""
    if q.shape[3] > 128:
        raise ValueError(f"q: the terms' pullback takes head_dim <= 128, got {q.shape[3]}")
    return _terms_dt_of(q.dtype)


def _terms_dt_of(dtype):
    from relattn._arrays import dtype_name

    return _TERMS_DT[dtype_name(dtype)]


def _terms3_f32(d_rel_h, d_rel_w):
    import cupy

    return (cupy.ascontiguousarray(t).reshape(t.shape[0] * t.shape[1], t.shape[2], -1) for t in (d_rel_h, d_rel_w))
