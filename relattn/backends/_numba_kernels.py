"""Numba kernels for the numba CPU backend (see ``numba_cpu.py``).

Only compiled code lives here: functions taking plain C-contiguous arrays and
scalars.  Importing this module needs numba; the backend module imports it
lazily.

The attention kernel is flash-style: the work is split over
(batch*head, query tile) pairs in a ``prange``; each pair walks the key tiles,
computes the transposed logit tile ``S^T = K_t Q_t^T`` with BLAS, adds
``scale`` and the decomposed relative-position terms, runs an online softmax
(running max and sum per query) and accumulates ``P V`` with BLAS.  Neither
the ``Sq x Sk`` bias nor the logits ever exist; the extra memory is a few small
per-tile buffers per work item.

The logit tile is kept transposed (keys x queries) so that every per-query
quantity (running max, running sum, rescale factor) is updated by plain
element-wise loops over the contiguous query axis: these vectorise without
``reassoc`` fast-math, so the exp range reduction below keeps its accuracy.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

def _cache_probe():  # pragma: no cover - only decorated, never called
    return 0


def _can_cache() -> bool:
    """numba resolves the cache location when a cache=True function is decorated
    and raises if none is writable (read-only install, no usable home): then the
    kernels compile in memory on each run instead of failing to import."""
    try:
        njit(cache=True)(_cache_probe)
        return True
    except RuntimeError:
        return False


_CACHE = _can_cache()

# fast-math: contraction into FMAs only.  No ``reassoc``: it would fold the
# Cody-Waite split ``(x - n*C1) - n*C2`` into ``x - n*(C1 + C2)``.
_FASTMATH = {"contract"}

# ---------------------------------------------------------------------------
# exp: Cody-Waite range reduction + polynomial, branch-free so it vectorises.
# ---------------------------------------------------------------------------


@intrinsic
def _pow2i_f32(typingctx, n):
    """2.0**n for an integer-valued float32 n in [-126, 127] (exponent bits)."""
    if n != types.float32:
        return None
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        ni = builder.fptosi(args[0], i32)
        e = builder.shl(builder.add(ni, ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(e, ir.FloatType())

    return sig, codegen


@intrinsic
def _pow2i_f64(typingctx, n):
    """2.0**n for an integer-valued float64 n in [-1022, 1023] (exponent bits)."""
    if n != types.float64:
        return None
    sig = types.float64(types.float64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        ni = builder.fptosi(args[0], i64)
        e = builder.shl(builder.add(ni, ir.Constant(i64, 1023)), ir.Constant(i64, 52))
        return builder.bitcast(e, ir.DoubleType())

    return sig, codegen


_F32_LOG2E = np.float32(1.4426950408889634)
_F32_HALF = np.float32(0.5)
_F32_ONE = np.float32(1.0)
_F32_ZERO = np.float32(0.0)
_F32_LO = np.float32(-87.0)  # below this, exp < 1.7e-38: flushed to exactly 0
_F32_C1 = np.float32(0.693359375)  # ln2 split (Cephes expf)
_F32_C2 = np.float32(-2.12194440e-4)
_F32_P0 = np.float32(1.9875691500e-4)
_F32_P1 = np.float32(1.3981999507e-3)
_F32_P2 = np.float32(8.3334519073e-3)
_F32_P3 = np.float32(4.1665795894e-2)
_F32_P4 = np.float32(1.6666665459e-1)
_F32_P5 = np.float32(5.0000001201e-1)


@njit(fastmath=_FASTMATH)
def _exp_f32(x):
    """exp(x) for float32 x <= ~88, ~1 ulp; exactly 0 for x < -87."""
    xc = x if x > _F32_LO else _F32_LO
    n = np.floor(xc * _F32_LOG2E + _F32_HALF)
    r = xc - n * _F32_C1
    r = r - n * _F32_C2
    z = r * r
    p = ((((_F32_P0 * r + _F32_P1) * r + _F32_P2) * r + _F32_P3) * r + _F32_P4) * r + _F32_P5
    p = p * z + r + _F32_ONE
    y = p * _pow2i_f32(n)
    # x < -87 flushes to 0; NaN propagates (as numpy's exp does), never becomes 0.
    return y if x >= _F32_LO else (_F32_ZERO if x < _F32_LO else x)


_F64_LOG2E = 1.4426950408889634
_F64_LO = -708.0
_F64_C1 = 6.93145751953125e-1  # ln2 split (Cephes exp)
_F64_C2 = 1.42860682030941723212e-6


@njit(fastmath=_FASTMATH)
def _exp_f64(x):
    """exp(x) for float64 x <= ~709, a few ulp; exactly 0 for x < -708."""
    xc = x if x > _F64_LO else _F64_LO
    n = np.floor(xc * _F64_LOG2E + 0.5)
    r = xc - n * _F64_C1
    r = r - n * _F64_C2
    # Taylor to degree 13 on |r| <= 0.347: truncation < 1e-17 relative.
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * (r * r) + r + 1.0
    y = p * _pow2i_f64(n)
    return y if x >= _F64_LO else (0.0 if x < _F64_LO else x)


def _fexp(x):  # pragma: no cover - typing stub, replaced by the overload
    raise NotImplementedError


@overload(_fexp, fastmath=_FASTMATH)
def _fexp_ov(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    if x == types.float64:
        return lambda x: _exp_f64(x)
    return None


@njit(cache=_CACHE, fastmath=_FASTMATH)
def exp_array(x, out):
    """out[:] = exp(x[:]) with the kernel's exp (for tests)."""
    for i in range(x.shape[0]):
        out[i] = _fexp(x[i])


# ---------------------------------------------------------------------------
# tile products (own loops: BLAS inside a numba prange oversubscribes and, with
# numba's OpenMP layer, makes pthreads OpenBLAS print warnings)
# ---------------------------------------------------------------------------


@njit(fastmath=_FASTMATH)
def _qk_tile(kb, j0, nk, qT, nq, sT, spare, rhT, rwT, has_rel, k_w, m):
    """sT[j, i] = rhT[ky, i] + rwT[kx, i] + sum_c kb[j0 + j, c] * qT[c, i]
    (key j0 + j = ky * k_w + kx; qT already holds scale * q), and
    m[i] = max(m[i], max_j sT[j, i]), for j < nk, i < nq.

    Two keys x four channels per pass over the (vectorised) query axis:
    8 FMAs per 6 loads and 2 stores.  The bias initialises the accumulators
    and the running max is taken while the rows are hot.
    """
    d = qT.shape[0]
    d4 = d - d % 4
    ky = j0 // k_w
    kx = j0 - ky * k_w
    for j in range(0, nk, 2):
        two = j + 1 < nk
        s0 = sT[j]
        s1 = sT[j + 1] if two else spare
        kr0 = kb[j0 + j]
        kr1 = kb[j0 + j + 1] if two else kr0
        if has_rel:
            ky1 = ky
            kx1 = kx + 1
            if kx1 == k_w:
                kx1 = 0
                ky1 += 1
            if not two:
                ky1 = ky
                kx1 = kx
            h0 = rhT[ky]
            w0 = rwT[kx]
            h1 = rhT[ky1]
            w1 = rwT[kx1]
            for i in range(nq):
                s0[i] = h0[i] + w0[i]
                s1[i] = h1[i] + w1[i]
            kx = kx1 + 1
            ky = ky1
            if kx == k_w:
                kx = 0
                ky += 1
        else:
            for i in range(nq):
                s0[i] = 0
                s1[i] = 0
        for c in range(0, d4, 4):
            a0 = kr0[c]
            a1 = kr0[c + 1]
            a2 = kr0[c + 2]
            a3 = kr0[c + 3]
            b0 = kr1[c]
            b1 = kr1[c + 1]
            b2 = kr1[c + 2]
            b3 = kr1[c + 3]
            q0 = qT[c]
            q1 = qT[c + 1]
            q2 = qT[c + 2]
            q3 = qT[c + 3]
            for i in range(nq):
                x0 = q0[i]
                x1 = q1[i]
                x2 = q2[i]
                x3 = q3[i]
                s0[i] = s0[i] + a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
                s1[i] = s1[i] + b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
        for c in range(d4, d):
            a0 = kr0[c]
            b0 = kr1[c]
            q0 = qT[c]
            for i in range(nq):
                s0[i] = s0[i] + a0 * q0[i]
                s1[i] = s1[i] + b0 * q0[i]
        for i in range(nq):
            x0 = s0[i]
            x1 = s1[i]
            mi = m[i]
            mi = x0 if x0 > mi else mi
            mi = x1 if x1 > mi else mi
            m[i] = mi


@njit(fastmath=_FASTMATH)
def _pv_tile(pT, nk, nq, vb, j0, oT):
    """oT[c, i] += sum_j vb[j0 + j, c] * pT[j, i] for c < d, i < nq, j < nk.

    Two channels x four keys per pass over the (vectorised) query axis, as in
    ``_qk_tile``.  ``oT`` has a spare row ``d`` that absorbs the second
    channel of the last pair when d is odd.
    """
    d = oT.shape[0] - 1
    nk4 = nk - nk % 4
    for c in range(0, d, 2):
        c1 = min(c + 1, d - 1)
        o0 = oT[c]
        o1 = oT[c + 1]
        for j in range(0, nk4, 4):
            va = vb[j0 + j]
            vb1 = vb[j0 + j + 1]
            vb2 = vb[j0 + j + 2]
            vb3 = vb[j0 + j + 3]
            a0 = va[c]
            a1 = vb1[c]
            a2 = vb2[c]
            a3 = vb3[c]
            b0 = va[c1]
            b1 = vb1[c1]
            b2 = vb2[c1]
            b3 = vb3[c1]
            p0 = pT[j]
            p1 = pT[j + 1]
            p2 = pT[j + 2]
            p3 = pT[j + 3]
            for i in range(nq):
                x0 = p0[i]
                x1 = p1[i]
                x2 = p2[i]
                x3 = p3[i]
                o0[i] = o0[i] + a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
                o1[i] = o1[i] + b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
        for j in range(nk4, nk):
            a0 = vb[j0 + j, c]
            b0 = vb[j0 + j, c1]
            p0 = pT[j]
            for i in range(nq):
                o0[i] = o0[i] + a0 * p0[i]
                o1[i] = o1[i] + b0 * p0[i]


@njit(fastmath=_FASTMATH)
def _softmax_tile(sT, nk, nq, m, alpha, lsum, tsum):
    """In place: sT[j, i] = exp(sT[j, i] - m[i]); on entry alpha holds the old
    running max, on exit the rescale factor exp(old - new).  The tile's weights
    are summed in tsum first, then lsum = lsum * alpha + tsum (two-level
    summation keeps the float32 error ~ (tk + Sk/tk) eps, not Sk eps)."""
    for i in range(nq):
        alpha[i] = _fexp(alpha[i] - m[i])
        tsum[i] = 0
    for j in range(nk):
        srow = sT[j]
        for i in range(nq):
            p = _fexp(srow[i] - m[i])
            srow[i] = p
            tsum[i] += p
    for i in range(nq):
        lsum[i] = lsum[i] * alpha[i] + tsum[i]


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------


@njit(cache=_CACHE, parallel=True, fastmath=_FASTMATH)
def attention_fwd(q, k, v, rel_h, rel_w, has_rel, k_w, scale, tq, tk, out):
    """Flash-style attention with decomposed relative-position bias.

    q: (BH, Sq, d); k, v: (BH, Sk, d); out: (BH, Sq, d), all C-contiguous and
    of one float dtype.  rel_h: (BH, Sq, k_h), rel_w: (BH, Sq, k_w) when
    ``has_rel`` (else ignored, any shape).  Key j = ky * k_w + kx.  tq / tk:
    query / key tile sizes.  ``scale`` is a scalar of the array dtype.

    Work items are (batch*head, query tile) pairs.  Per item the query axis
    is padded to a multiple of 8 lanes (zero q and bias: finite, discarded),
    so the vectorised loops never run a scalar remainder.
    """
    BH, Sq, d = q.shape
    Sk = k.shape[1]
    dt = q.dtype
    sc = scale
    nqt = (Sq + tq - 1) // tq
    n_items = BH * nqt
    k_h = Sk // k_w if k_w > 0 else 0
    for it in prange(n_items):
        bh = it // nqt
        qt = it - bh * nqt
        i0 = qt * tq
        nq0 = min(tq, Sq - i0)
        nq = (nq0 + 7) // 8 * 8
        qb = q[bh]
        kb = k[bh]
        vb = v[bh]
        qT = np.zeros((d, nq), dtype=dt)
        for i in range(nq0):
            for c in range(d):
                qT[c, i] = qb[i0 + i, c] * sc
        m = np.full(nq, -np.inf, dtype=dt)
        alpha = np.empty(nq, dtype=dt)
        lsum = np.zeros(nq, dtype=dt)
        oT = np.zeros((d, nq), dtype=dt)
        pT = np.empty((d + 1, nq), dtype=dt)  # tile's P V; spare row d for odd d
        tsum = np.empty(nq, dtype=dt)
        sbuf = np.empty(tk * nq + nq, dtype=dt)
        spare = sbuf[tk * nq:]
        if has_rel:
            rhT = np.zeros((k_h, nq), dtype=dt)
            rwT = np.zeros((k_w, nq), dtype=dt)
            for i in range(nq0):
                for a in range(k_h):
                    rhT[a, i] = rel_h[bh, i0 + i, a]
                for a in range(k_w):
                    rwT[a, i] = rel_w[bh, i0 + i, a]
        else:
            rhT = np.zeros((1, nq), dtype=dt)
            rwT = np.zeros((1, nq), dtype=dt)
        for j0 in range(0, Sk, tk):
            nk = min(tk, Sk - j0)
            sT = sbuf[:nk * nq].reshape((nk, nq))
            for i in range(nq):
                alpha[i] = m[i]  # old running max
            _qk_tile(kb, j0, nk, qT, nq, sT, spare, rhT, rwT, has_rel, k_w, m)
            _softmax_tile(sT, nk, nq, m, alpha, lsum, tsum)
            pT[:, :] = 0
            _pv_tile(sT, nk, nq, vb, j0, pT)
            # two-level accumulation (see _softmax_tile)
            for c in range(d):
                orow = oT[c]
                prow = pT[c]
                for i in range(nq):
                    orow[i] = orow[i] * alpha[i] + prow[i]
        for i in range(nq):
            lsum[i] = 1 / lsum[i]
        ob = out[bh]
        for i in range(nq0):
            li = lsum[i]
            orow = ob[i0 + i]
            for c in range(d):
                orow[c] = oT[c, i] * li
