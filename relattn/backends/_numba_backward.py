"""Numba kernels of the fused CPU backward (see ``relattn.autodiff``).

The attention core's pullback, flash-style: per (batch*head) ``bh``, with
``S = scale * q k^T + rel_h[i, ky] + rel_w[i, kx]`` (key ``j = ky * k_w + kx``),
``P = exp(S - m) / l`` with the row max ``m`` and sum of exponentials ``l``,
``D = rowsum(dO * O)``::

    dP = dO V^T      dS = P * (dP - D)
    dq = scale * dS K         dk = scale * dS^T q         dv = P^T dO
    d_rel_h[i, ky] = sum_kx dS[i, (ky, kx)]     d_rel_w[i, kx] = sum_ky dS[i, (ky, kx)]

Neither ``S``, ``P`` nor ``dS`` is ever stored whole: the logits are
recomputed block by block, in the forward's order ``(scale q . k + rel_h) +
rel_w``.  Three ways through it:

* float32 (and half precision, computed in float32 by the caller) with at
  least one (batch, head) pair per 4 threads: ``fused_f32``, parallel over
  runs of consecutive bh.  Blocks of 16 query rows against every key, so
  ``m`` and ``l`` come from whole rows: the block's logits ``S^T`` (Sk, 16)
  are computed with the forward's register-blocked micro-kernel
  (``_numba_kernels._qk16``, 8-lane vectors along the queries), their
  exponentials and row sums taken in place; then per key tile of 64 ``dP^T``
  (``_dp16``, the same blocking), ``P`` and ``dS`` element-wise, ``dq^T +=
  K^T dS^T`` (the forward's ``_pv16``) and ``dk``, ``dv`` of the tile's keys
  (``_rows_acc``: four keys x four channel vectors in registers, a sum over
  the block's rows) into the bh's (Sk, d) accumulators.  It reads q, k, v as
  they are (no transposed copies).  Given the gathered tables ``Rh``, ``Rw``
  it also takes the terms' pullback (``rel_h = q . Rh``, ``rel_w = q . Rw``)
  row by row: ``dq`` gets ``d_rel_h Rh + d_rel_w Rw``, and the tables'
  gradients are summed per run of bh (a fixed split of the bh over the
  threads, so the sums' order does not depend on scheduling), so ``d_rel_h``
  and ``d_rel_w`` never exist whole.  Memory per run: the (Sk, 16) logit
  block, two (Sk, d) accumulators and small blocks.
* float64 with at least 4 (batch, head) pairs per thread: ``fused_pass``
  (parallel over bh), the same blocking with plain loops LLVM vectorises:
  blocks of 16 query rows against every key, dk / dv summed into the work
  item's own rows.
* otherwise two kernels share the work over tiles:

  - ``rows_pass`` (parallel over (bh, query tile)): with ``mode == 0`` the row
    statistics ``m``, ``l`` of the logits (an online max / sum of exponentials
    over key tiles, as the forward's), with ``mode == 1`` ``D``, ``dq`` and the
    terms' gradients ``d_rel_h``, ``d_rel_w`` (sums over key tiles).
  - ``keys_pass`` (parallel over (bh, key tile)): ``dk`` and ``dv``, sums over
    all query rows, reading ``m``, ``l`` and ``D``.

  Each query row is handled on its own: its logits over one key tile are a
  vector of the tile's length.

``fused_pass`` and the tiled passes read transposed copies ``kT``, ``vT``
(bh, d, Sk) of ``k`` and ``v`` (made once by the caller) so that every inner
loop runs along a contiguous axis without a reduction (it vectorises without
``reassoc`` fast-math, which the exp's range reduction cannot take).  Memory
per work item: a few vectors of the key tile's length and of ``d`` (for
``fused_pass`` (16, Sk) blocks), and for ``keys_pass`` two (d, key tile)
accumulators.

Non-finite values: a fully masked row has ``m = -inf``, so ``S - m`` is NaN
and its gradients are NaN, as the reference's; a masked key (``S = -inf``) of
a row with finite ``m`` has ``P = 0`` exactly, so its ``dS``, ``dk`` and
``dv`` contributions are 0 (and ``dq`` gets ``0 * k``, NaN where ``k`` is
infinite, as the reference's matmul gives).  NaN / inf inputs elsewhere
propagate through the same products as in the reference, but the order of
the sums differs, so which entries become NaN rather than +-inf may differ.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._numba_kernels import (
    _CACHE,
    _FASTMATH,
    _dot1,
    _dot4,
    _fexp,
    _keepalive,
    _pv16,
    _qk16,
    aptr,
    padd,
    vadd,
    vbcast,
    vdiv,
    vexp,
    vfma,
    vload,
    vmul,
    vstore,
    vsub,
    vzero,
)


@njit(fastmath=_FASTMATH)
def _logit_row(qs, kT, bh, j0, nk, s, has_rel, rh_row, rw_row, kyi, kxi):
    """s[j] = (sum_c qs[c] kT[bh, c, j0 + j] + rh_row[ky]) + rw_row[kx], j < nk."""
    d = qs.shape[0]
    for j in range(nk):
        s[j] = 0
    for c in range(d):
        a = qs[c]
        kr = kT[bh, c, j0:j0 + nk]   # a slice: non-negative indices, so the loop vectorises
        for j in range(nk):
            s[j] += a * kr[j]
    if has_rel:
        ky = kyi[j0:j0 + nk]
        kx = kxi[j0:j0 + nk]
        for j in range(nk):
            s[j] = (s[j] + rh_row[ky[j]]) + rw_row[kx[j]]


@njit(fastmath=_FASTMATH)
def _dp_row(do, vT, bh, j0, nk, dp):
    """dp[j] = sum_c do[c] vT[bh, c, j0 + j], j < nk."""
    d = do.shape[0]
    for j in range(nk):
        dp[j] = 0
    for c in range(d):
        a = do[c]
        vr = vT[bh, c, j0:j0 + nk]
        for j in range(nk):
            dp[j] += a * vr[j]


@njit(cache=_CACHE, parallel=True, fastmath=_FASTMATH)
def rows_pass(q, k, kT, vT, rel_h, rel_w, has_rel, kyi, kxi, scale, tq, tk, mode,
              m, l, out, dout, dsum, dq, d_rel_h, d_rel_w):
    """Per query row (work items: (bh, query tile of ``tq`` rows); key tiles of ``tk``).

    q, k: (BH, S*, d); kT, vT: (BH, d, Sk); rel_h (BH, Sq, k_h), rel_w (BH,
    Sq, k_w) and kyi, kxi (Sk,) int64, the key's (ky, kx), when ``has_rel``.
    mode 0: m, l (BH, Sq) receive each logit row's max and sum of exp(S - m).
    mode 1: reads m, l, out, dout (BH, Sq, d); writes dsum (BH, Sq) = D,
    dq (BH, Sq, d), d_rel_h, d_rel_w (when ``has_rel``).
    """
    BH, Sq, d = q.shape
    Sk = k.shape[1]
    dt = q.dtype
    sc = scale
    nqt = (Sq + tq - 1) // tq
    k_h = rel_h.shape[2]
    k_w = rel_w.shape[2]
    for it in prange(BH * nqt):
        bh = it // nqt
        i0 = (it - bh * nqt) * tq
        i1 = min(i0 + tq, Sq)
        qs = np.empty(d, dtype=dt)
        do = np.empty(d, dtype=dt)
        acc = np.empty(d, dtype=dt)
        s = np.empty(tk, dtype=dt)
        dp = np.empty(tk, dtype=dt)
        dh = np.empty(k_h, dtype=dt)
        dw = np.empty(k_w, dtype=dt)
        consts = np.zeros(2, dtype=dt)   # typed constants: 0 and -inf
        consts[1] = -np.inf
        zero = consts[0]
        ninf = consts[1]
        for i in range(i0, i1):
            for c in range(d):
                qs[c] = q[bh, i, c] * sc
            rh_row = rel_h[bh, i] if has_rel else rel_h[0, 0]
            rw_row = rel_w[bh, i] if has_rel else rel_w[0, 0]
            if mode == 0:
                mi = ninf
                li = zero
                for j0 in range(0, Sk, tk):
                    nk = min(tk, Sk - j0)
                    _logit_row(qs, kT, bh, j0, nk, s, has_rel, rh_row, rw_row, kyi, kxi)
                    mn = mi
                    for j in range(nk):
                        x = s[j]
                        mn = x if x > mn else mn
                    base = mn if mn != ninf else zero  # all masked so far: exp(-inf) = 0, not exp(NaN)
                    alpha = _fexp(mi - base)
                    for j in range(nk):          # element-wise: vectorises
                        s[j] = _fexp(s[j] - base)
                    tsum = zero
                    for j in range(nk):
                        tsum += s[j]
                    li = li * alpha + tsum
                    mi = mn
                m[bh, i] = mi
                l[bh, i] = li
                continue
            di = zero
            for c in range(d):
                x = dout[bh, i, c]
                do[c] = x
                di += x * out[bh, i, c]
                acc[c] = 0
            dsum[bh, i] = di
            mi = m[bh, i]
            li = l[bh, i]
            for a in range(k_h):
                dh[a] = 0
            for a in range(k_w):
                dw[a] = 0
            for j0 in range(0, Sk, tk):
                nk = min(tk, Sk - j0)
                _logit_row(qs, kT, bh, j0, nk, s, has_rel, rh_row, rw_row, kyi, kxi)
                _dp_row(do, vT, bh, j0, nk, dp)
                for j in range(nk):
                    p = _fexp(s[j] - mi) / li
                    s[j] = p * (dp[j] - di)          # dS
                for j in range(nk):
                    g = s[j]
                    kr = k[bh, j0 + j]
                    for c in range(d):
                        acc[c] += g * kr[c]
                if has_rel:
                    ky = kyi[j0:j0 + nk]
                    kx = kxi[j0:j0 + nk]
                    for j in range(nk):
                        dh[ky[j]] += s[j]
                        dw[kx[j]] += s[j]
            for c in range(d):
                dq[bh, i, c] = sc * acc[c]
            if has_rel:
                for a in range(k_h):
                    d_rel_h[bh, i, a] = dh[a]
                for a in range(k_w):
                    d_rel_w[bh, i, a] = dw[a]


@njit(cache=_CACHE, parallel=True, fastmath=_FASTMATH)
def keys_pass(q, kT, vT, rel_h, rel_w, has_rel, kyi, kxi, scale, tk, m, l, dout, dsum, dk, dv):
    """dk, dv (BH, Sk, d) per key tile of ``tk`` keys (work items: (bh, key
    tile)), summed over every query row; arguments as ``rows_pass``, dsum the
    D that its mode 1 wrote."""
    BH, Sq, d = q.shape
    Sk = kT.shape[2]
    dt = q.dtype
    sc = scale
    nkt = (Sk + tk - 1) // tk
    for it in prange(BH * nkt):
        bh = it // nkt
        j0 = (it - bh * nkt) * tk
        nk = min(tk, Sk - j0)
        qs = np.empty(d, dtype=dt)
        do = np.empty(d, dtype=dt)
        s = np.empty(nk, dtype=dt)
        dp = np.empty(nk, dtype=dt)
        dkT = np.zeros((d, nk), dtype=dt)
        dvT = np.zeros((d, nk), dtype=dt)
        for i in range(Sq):
            for c in range(d):
                qs[c] = q[bh, i, c] * sc
                do[c] = dout[bh, i, c]
            rh_row = rel_h[bh, i] if has_rel else rel_h[0, 0]
            rw_row = rel_w[bh, i] if has_rel else rel_w[0, 0]
            _logit_row(qs, kT, bh, j0, nk, s, has_rel, rh_row, rw_row, kyi, kxi)
            _dp_row(do, vT, bh, j0, nk, dp)
            mi = m[bh, i]
            li = l[bh, i]
            di = dsum[bh, i]
            for j in range(nk):
                p = _fexp(s[j] - mi) / li
                dp[j] = p * (dp[j] - di)             # dS
                s[j] = p
            for c in range(d):
                a = do[c]
                b = q[bh, i, c]
                vr = dvT[c]
                kr = dkT[c]
                for j in range(nk):
                    vr[j] += a * s[j]
                    kr[j] += b * dp[j]
        for j in range(nk):
            for c in range(d):
                dk[bh, j0 + j, c] = sc * dkT[c, j]
                dv[bh, j0 + j, c] = dvT[c, j]


@njit(cache=_CACHE, parallel=True, fastmath=_FASTMATH)
def fused_pass(q, k, kT, vT, rel_h, rel_w, has_rel, kyi, kxi, scale, tq, out, dout,
               dq, dk, dv, d_rel_h, d_rel_w):
    """The whole backward of one (batch*head) ``bh`` per work item (parallel
    over ``bh``): blocks of ``tq`` query rows against all ``Sk`` keys at once,
    so each row's max and sum of exponentials are taken exactly from the
    block's logits (no separate statistics pass) and ``dk``, ``dv`` are summed
    in place over the blocks (``bh``'s rows of them belong to this work item).
    Memory per work item: a few (tq, Sk) blocks and (tq, d) blocks.
    Arguments as ``rows_pass``; dq, dk, dv zeroed by the caller."""
    BH, Sq, d = q.shape
    Sk = k.shape[1]
    dt = q.dtype
    sc = scale
    k_h = rel_h.shape[2]
    k_w = rel_w.shape[2]
    grid = k_h * k_w == Sk   # key j = ky * k_w + kx: the terms by grid rows
    for bh in prange(BH):
        qs = np.empty((tq, d), dtype=dt)
        do = np.empty((tq, d), dtype=dt)
        acc = np.empty((tq, d), dtype=dt)
        s = np.empty((tq, Sk), dtype=dt)
        dp = np.empty((tq, Sk), dtype=dt)
        dsv = np.empty(tq, dtype=dt)
        consts = np.zeros(2, dtype=dt)   # typed constants: 0 and -inf
        consts[1] = -np.inf
        zero = consts[0]
        ninf = consts[1]
        for i0 in range(0, Sq, tq):
            nq = min(tq, Sq - i0)
            for r in range(nq):
                i = i0 + r
                di = zero
                for c in range(d):
                    qs[r, c] = q[bh, i, c] * sc
                    x = dout[bh, i, c]
                    do[r, c] = x
                    di += x * out[bh, i, c]
                    acc[r, c] = 0
                dsv[r] = di
                for j in range(Sk):
                    s[r, j] = 0
                    dp[r, j] = 0
            # logits and dP: k / v rows shared by the block's rows
            for c in range(d):
                kr = kT[bh, c]
                vr = vT[bh, c]
                for r in range(nq):
                    a = qs[r, c]
                    b = do[r, c]
                    sr = s[r]
                    pr = dp[r]
                    for j in range(Sk):
                        sr[j] += a * kr[j]
                        pr[j] += b * vr[j]
            for r in range(nq):
                i = i0 + r
                sr = s[r]
                pr = dp[r]
                if has_rel:
                    rh_row = rel_h[bh, i]
                    rw_row = rel_w[bh, i]
                    if grid:
                        for ky in range(k_h):
                            h = rh_row[ky]
                            sg = sr[ky * k_w:(ky + 1) * k_w]
                            for kx in range(k_w):
                                sg[kx] = (sg[kx] + h) + rw_row[kx]
                    else:
                        for j in range(Sk):
                            sr[j] = (sr[j] + rh_row[kyi[j]]) + rw_row[kxi[j]]
                mi = ninf
                for j in range(Sk):
                    x = sr[j]
                    mi = x if x > mi else mi
                for j in range(Sk):
                    sr[j] = _fexp(sr[j] - mi)
                li = zero
                for j in range(Sk):
                    li += sr[j]
                di = dsv[r]
                for j in range(Sk):
                    p = sr[j] / li
                    sr[j] = p                       # P
                    pr[j] = p * (pr[j] - di)        # dS
                if has_rel:
                    for a in range(k_h):
                        d_rel_h[bh, i, a] = 0
                    for a in range(k_w):
                        d_rel_w[bh, i, a] = 0
                    dh = d_rel_h[bh, i]
                    dw = d_rel_w[bh, i]
                    if grid:
                        for ky in range(k_h):
                            pg = pr[ky * k_w:(ky + 1) * k_w]
                            t = zero
                            for kx in range(k_w):
                                g = pg[kx]
                                t += g
                                dw[kx] += g
                            dh[ky] = t
                    else:
                        for j in range(Sk):
                            g = pr[j]
                            dh[kyi[j]] += g
                            dw[kxi[j]] += g
            # dq += dS k, dk += dS^T q, dv += P^T dO
            for j in range(Sk):
                kr = k[bh, j]
                dkr = dk[bh, j]
                dvr = dv[bh, j]
                for r in range(nq):
                    g = dp[r, j]
                    p = s[r, j]
                    ar = acc[r]
                    qr = qs[r]
                    dr = do[r]
                    for c in range(d):
                        ar[c] += g * kr[c]
                        dkr[c] += g * qr[c]
                        dvr[c] += p * dr[c]
            for r in range(nq):
                for c in range(d):
                    dq[bh, i0 + r, c] = sc * acc[r, c]


# ---------------------------------------------------------------------------
# float32: explicit 8-lane vectors, register-blocked micro-kernels
# ---------------------------------------------------------------------------

@njit(fastmath=_FASTMATH)
def _dp16(vb, j0, nk, d, doT, nq, io, dpT):
    """dpT[j, i] = vb[j0 + j] . doT[:, i] for queries io..io+15, j < nk (flat
    arrays, row stride nq): four keys x two query vectors per pass over the
    channels (``_qk16`` without the bias and the running max)."""
    io1 = io + 8
    nk4 = nk - nk % 4
    zero = vzero()
    for j in range(0, nk4, 4):
        a0, a1, b0, b1, c0, c1, e0, e1 = _dot4(vb, j0 + j, d, doT, nq, io, io1, zero)
        s = j * nq + io
        vstore(dpT, s, a0)
        vstore(dpT, s + 8, a1)
        vstore(dpT, s + nq, b0)
        vstore(dpT, s + nq + 8, b1)
        vstore(dpT, s + 2 * nq, c0)
        vstore(dpT, s + 2 * nq + 8, c1)
        vstore(dpT, s + 3 * nq, e0)
        vstore(dpT, s + 3 * nq + 8, e1)
    for j in range(nk4, nk):
        a0, a1 = _dot1(vb, j0 + j, d, doT, nq, io, io1, zero)
        vstore(dpT, j * nq + io, a0)
        vstore(dpT, j * nq + io1, a1)


@njit(fastmath=_FASTMATH)
def _rows_acc(gT, nq, nq0, src, dp, nk4, acc):
    """acc[j, c] += sum_{i < nq0} gT[j, i] src[i, c] for j < nk4 (a multiple
    of 4), c < dp (a multiple of 8); gT (nk4, nq), src (nq, dp), acc (nk4, dp)
    flat.  Four keys x four channel vectors (then x one) in registers per
    pass over the queries."""
    dp32 = dp - dp % 32
    for j in range(0, nk4, 4):
        g0 = j * nq
        g1 = g0 + nq
        g2 = g1 + nq
        g3 = g2 + nq
        for c in range(0, dp32, 32):
            a0 = vzero()
            a1 = vzero()
            a2 = vzero()
            a3 = vzero()
            b0 = vzero()
            b1 = vzero()
            b2 = vzero()
            b3 = vzero()
            c0 = vzero()
            c1 = vzero()
            c2 = vzero()
            c3 = vzero()
            e0 = vzero()
            e1 = vzero()
            e2 = vzero()
            e3 = vzero()
            for i in range(nq0):
                o = i * dp + c
                x0 = vload(src, o)
                x1 = vload(src, o + 8)
                x2 = vload(src, o + 16)
                x3 = vload(src, o + 24)
                t = vbcast(gT[g0 + i])
                a0 = vfma(t, x0, a0)
                a1 = vfma(t, x1, a1)
                a2 = vfma(t, x2, a2)
                a3 = vfma(t, x3, a3)
                t = vbcast(gT[g1 + i])
                b0 = vfma(t, x0, b0)
                b1 = vfma(t, x1, b1)
                b2 = vfma(t, x2, b2)
                b3 = vfma(t, x3, b3)
                t = vbcast(gT[g2 + i])
                c0 = vfma(t, x0, c0)
                c1 = vfma(t, x1, c1)
                c2 = vfma(t, x2, c2)
                c3 = vfma(t, x3, c3)
                t = vbcast(gT[g3 + i])
                e0 = vfma(t, x0, e0)
                e1 = vfma(t, x1, e1)
                e2 = vfma(t, x2, e2)
                e3 = vfma(t, x3, e3)
            o = j * dp + c
            vstore(acc, o, vadd(vload(acc, o), a0))
            vstore(acc, o + 8, vadd(vload(acc, o + 8), a1))
            vstore(acc, o + 16, vadd(vload(acc, o + 16), a2))
            vstore(acc, o + 24, vadd(vload(acc, o + 24), a3))
            o += dp
            vstore(acc, o, vadd(vload(acc, o), b0))
            vstore(acc, o + 8, vadd(vload(acc, o + 8), b1))
            vstore(acc, o + 16, vadd(vload(acc, o + 16), b2))
            vstore(acc, o + 24, vadd(vload(acc, o + 24), b3))
            o += dp
            vstore(acc, o, vadd(vload(acc, o), c0))
            vstore(acc, o + 8, vadd(vload(acc, o + 8), c1))
            vstore(acc, o + 16, vadd(vload(acc, o + 16), c2))
            vstore(acc, o + 24, vadd(vload(acc, o + 24), c3))
            o += dp
            vstore(acc, o, vadd(vload(acc, o), e0))
            vstore(acc, o + 8, vadd(vload(acc, o + 8), e1))
            vstore(acc, o + 16, vadd(vload(acc, o + 16), e2))
            vstore(acc, o + 24, vadd(vload(acc, o + 24), e3))
        for c in range(dp32, dp, 8):
            a0 = vzero()
            b0 = vzero()
            c0 = vzero()
            e0 = vzero()
            for i in range(nq0):
                x0 = vload(src, i * dp + c)
                a0 = vfma(vbcast(gT[g0 + i]), x0, a0)
                b0 = vfma(vbcast(gT[g1 + i]), x0, b0)
                c0 = vfma(vbcast(gT[g2 + i]), x0, c0)
                e0 = vfma(vbcast(gT[g3 + i]), x0, e0)
            o = j * dp + c
            vstore(acc, o, vadd(vload(acc, o), a0))
            o += dp
            vstore(acc, o, vadd(vload(acc, o), b0))
            o += dp
            vstore(acc, o, vadd(vload(acc, o), c0))
            o += dp
            vstore(acc, o, vadd(vload(acc, o), e0))


@njit(fastmath=_FASTMATH)
def _terms_row(g, rr, qr, trow, gr, d):
    """trow[c] += g * rr[c] and gr[c] += g * qr[c] for c < d (pointers)."""
    d8 = d - d % 8
    gv = vbcast(g)
    for c in range(0, d8, 8):
        vstore(trow, c, vfma(gv, vload(rr, c), vload(trow, c)))
        vstore(gr, c, vfma(gv, vload(qr, c), vload(gr, c)))
    for c in range(d8, d):
        trow[c] += g * rr[c]
        gr[c] += g * qr[c]


@njit(cache=_CACHE, parallel=True, fastmath=_FASTMATH)
def fused_f32(q, k, v, rel_h, rel_w, has_rel, k_w, scale, tq, tk, out, dout,
              dq, dk, dv, d_rel_h, d_rel_w, groups, fold, Rh, Rw, q_w, dRh, dRw):
    """The whole backward of float32 problems on 8-lane vectors.

    Work items: ``groups`` runs of consecutive ``bh`` (parallel over the
    runs; the caller picks one run per bh, or with ``fold`` one per thread).
    Per block of ``tq`` query rows (a multiple of 16; the last block padded
    with zero rows): the whole logit rows ``S^T`` (Sk, tq) by
    ``_qk16`` (the forward's micro-kernel: logits and row max), their
    exponentials and sums, then per key tile of ``tk``: ``dP^T``
    (``_dp16``), ``P`` and ``dS`` in place, ``dq^T += K_t^T dS^T``
    (``_pv16``), and ``dk``, ``dv`` of the tile's keys (``_rows_acc``) into
    the bh's (Sk, d) accumulators.  Queries run along the vector lanes
    everywhere but in ``dk`` / ``dv``, where the channels do.

    With ``fold`` (terms only) the terms' pullback is done here too, per query
    row ``i = (y, x)`` (``x < q_w``): ``dq[i] += sum_ky d_rel_h[i, ky] Rh[y, ky]
    + sum_kx d_rel_w[i, kx] Rw[x, kx]`` and ``dRh[grp, y, ky] += d_rel_h[i, ky]
    q[i]``, ``dRw[grp, x, kx] += d_rel_w[i, kx] q[i]`` (one slice per run,
    zeroed by the caller); ``d_rel_h`` / ``d_rel_w`` are then not written.
    Memory per work item: the (Sk, tq) logit block, two (Sk, d)
    accumulators and (tq, d) / (tk, tq) blocks.  Other arguments as
    ``fused_pass`` (``k_w`` for the key grid)."""
    BH, Sq, d = q.shape
    Sk = k.shape[1]
    dt = q.dtype
    sc = scale
    nq = tq
    dp = (d + 7) // 8 * 8            # channels padded to whole vectors (dk, dv)
    sk4 = (Sk + 3) // 4 * 4          # keys padded to groups of 4 (dk, dv)
    k_h = rel_h.shape[2] if has_rel else 1
    kw = k_w if has_rel else 1
    consts = np.zeros(2, dtype=dt)
    consts[1] = -np.inf
    zero = consts[0]
    ninf = consts[1]
    for grp in prange(groups):
        qT = np.zeros(d * nq, dtype=dt)
        doT = np.zeros(d * nq, dtype=dt)
        qs = np.zeros(nq * dp, dtype=dt)
        dos = np.zeros(nq * dp, dtype=dt)
        sT = np.zeros(sk4 * nq, dtype=dt)       # rows Sk..sk4 stay 0
        dpT = np.zeros(tk * nq, dtype=dt)
        dqT = np.empty(d * nq, dtype=dt)
        ones = np.ones(nq, dtype=dt)
        m = np.empty(nq, dtype=dt)
        lsum = np.empty(nq, dtype=dt)
        dsv = np.empty(nq, dtype=dt)
        dka = np.empty(sk4 * dp, dtype=dt)
        dva = np.empty(sk4 * dp, dtype=dt)
        rhT = np.zeros(k_h * nq, dtype=dt)
        rwT = np.zeros(kw * nq, dtype=dt)
        dhT = np.zeros(k_h * nq, dtype=dt)
        dwT = np.zeros(kw * nq, dtype=dt)
        trow = np.empty(d, dtype=dt)
        kyo = np.zeros(Sk, dtype=np.int64)     # offsets of the key's bias rows
        kxo = np.zeros(Sk, dtype=np.int64)
        if has_rel:
            for j in range(Sk):
                ky = j // kw
                kyo[j] = ky * nq
                kxo[j] = (j - ky * kw) * nq
        pq = aptr(qT)
        pdo = aptr(doT)
        pqs = aptr(qs)
        pdos = aptr(dos)
        ps = aptr(sT)
        pdp = aptr(dpT)
        pdq = aptr(dqT)
        pone = aptr(ones)
        pm = aptr(m)
        pl = aptr(lsum)
        pD = aptr(dsv)
        pdk = aptr(dka)
        pdv = aptr(dva)
        prh = aptr(rhT)
        prw = aptr(rwT)
        pdh = aptr(dhT)
        pdw = aptr(dwT)
        pky = aptr(kyo)
        pkx = aptr(kxo)
        ptr = aptr(trow)
        pRh = aptr(Rh)
        pRw = aptr(Rw)
        gi = np.int64(grp) if fold else np.int64(0)   # (one unused slice without fold)
        gh = dRh[gi]
        gw = dRw[gi]
        pgh = aptr(gh)
        pgw = aptr(gw)
        for bh in range(grp * BH // groups, (grp + 1) * BH // groups):
            kb = k[bh]
            vb = v[bh]
            qb = q[bh]
            pk = aptr(kb)
            pv = aptr(vb)
            pqb = aptr(qb)
            for a in range(sk4 * dp):
                dka[a] = 0
                dva[a] = 0
            for i0 in range(0, Sq, nq):
                nq0 = min(nq, Sq - i0)
                for i in range(nq):
                    if i < nq0:
                        di = zero
                        for c in range(d):
                            x = q[bh, i0 + i, c] * sc
                            qT[c * nq + i] = x
                            qs[i * dp + c] = x
                            y = dout[bh, i0 + i, c]
                            doT[c * nq + i] = y
                            dos[i * dp + c] = y
                            di += y * out[bh, i0 + i, c]
                        dsv[i] = di
                        if has_rel:
                            for a in range(k_h):
                                rhT[a * nq + i] = rel_h[bh, i0 + i, a]
                            for a in range(kw):
                                rwT[a * nq + i] = rel_w[bh, i0 + i, a]
                    else:                     # padding: zero q, dO, bias
                        for c in range(d):
                            qT[c * nq + i] = 0
                            qs[i * dp + c] = 0
                            doT[c * nq + i] = 0
                            dos[i * dp + c] = 0
                        dsv[i] = 0
                        for a in range(k_h):
                            rhT[a * nq + i] = 0
                        for a in range(kw):
                            rwT[a * nq + i] = 0
                    m[i] = ninf
                for a in range(d * nq):
                    dqT[a] = 0
                for a in range(k_h * nq):
                    dhT[a] = 0
                for a in range(kw * nq):
                    dwT[a] = 0
                # logits of the whole rows and their max
                for j0 in range(0, Sk, tk):
                    nk = min(tk, Sk - j0)
                    for io in range(0, nq, 16):
                        _qk16(pk, j0, nk, d, pq, nq, io, padd(ps, j0 * nq), prh, prw,
                              padd(pky, j0), padd(pkx, j0), pm)
                # exp(S - m) in place, and its row sums (per key tile, then summed)
                for io in range(0, nq, 8):
                    mv = vload(pm, io)
                    lv = vzero()
                    for j0 in range(0, Sk, tk):
                        j1 = min(j0 + tk, Sk)
                        t0 = vzero()
                        t1 = vzero()
                        j = j0
                        while j + 1 < j1:
                            s = j * nq + io
                            p0 = vexp(vsub(vload(ps, s), mv))
                            p1 = vexp(vsub(vload(ps, s + nq), mv))
                            vstore(ps, s, p0)
                            vstore(ps, s + nq, p1)
                            t0 = vadd(t0, p0)
                            t1 = vadd(t1, p1)
                            j += 2
                        if j < j1:
                            s = j * nq + io
                            p0 = vexp(vsub(vload(ps, s), mv))
                            vstore(ps, s, p0)
                            t0 = vadd(t0, p0)
                        lv = vadd(lv, vadd(t0, t1))
                    vstore(pl, io, lv)
                for j0 in range(0, Sk, tk):
                    nk = min(tk, Sk - j0)
                    nk4 = (nk + 3) // 4 * 4
                    for io in range(0, nq, 16):
                        _dp16(pv, j0, nk, d, pdo, nq, io, pdp)
                    for io in range(0, nq, 8):
                        lv = vload(pl, io)
                        dv_ = vload(pD, io)
                        for j in range(nk):
                            so = (j0 + j) * nq + io
                            p = vdiv(vload(ps, so), lv)
                            vstore(ps, so, p)                                  # P
                            o = j * nq + io
                            g = vmul(p, vsub(vload(pdp, o), dv_))
                            vstore(pdp, o, g)                                  # dS
                            if has_rel:
                                h = kyo[j0 + j] + io
                                vstore(pdh, h, vadd(vload(pdh, h), g))
                                w = kxo[j0 + j] + io
                                vstore(pdw, w, vadd(vload(pdw, w), g))
                    for a in range(nk * nq, nk4 * nq):
                        dpT[a] = 0
                    # dq^T += K_t^T dS^T;  dk += dS^T (scale q);  dv += P^T dO
                    for io in range(0, nq, 16):
                        _pv16(pk, j0, nk, pdp, nq, io, d, pdq, pone)
                    _rows_acc(pdp, nq, nq0, pqs, dp, nk4, padd(pdk, j0 * dp))
                    _rows_acc(padd(ps, j0 * nq), nq, nq0, pdos, dp, nk4, padd(pdv, j0 * dp))
                for i in range(nq0):
                    ii = i0 + i
                    dqr = dq[bh, ii]
                    if fold:
                        y = ii // q_w
                        x = ii - y * q_w
                        pqr = padd(pqb, ii * d)
                        for c in range(d):
                            trow[c] = 0
                        for a in range(k_h):
                            _terms_row(dhT[a * nq + i], padd(pRh, (y * k_h + a) * d), pqr, ptr,
                                       padd(pgh, (y * k_h + a) * d), d)
                        for c in range(d):
                            dqr[c] = trow[c]
                            trow[c] = 0
                        for a in range(kw):
                            _terms_row(dwT[a * nq + i], padd(pRw, (x * kw + a) * d), pqr, ptr,
                                       padd(pgw, (x * kw + a) * d), d)
                        for c in range(d):
                            dqr[c] = sc * dqT[c * nq + i] + (dqr[c] + trow[c])
                    else:
                        for c in range(d):
                            dqr[c] = sc * dqT[c * nq + i]
                        if has_rel:
                            for a in range(k_h):
                                d_rel_h[bh, ii, a] = dhT[a * nq + i]
                            for a in range(kw):
                                d_rel_w[bh, ii, a] = dwT[a * nq + i]
            for j in range(Sk):
                for c in range(d):
                    dk[bh, j, c] = dka[j * dp + c]
                    dv[bh, j, c] = dva[j * dp + c]
            _keepalive(kb, vb, qb)
        _keepalive(qT, doT, qs, dos, sT, dpT, dqT, ones, m, lsum, dsv, dka, dva,
                   rhT, rwT, dhT, dwT, kyo, kxo, trow, Rh, Rw, gh, gw)


# ---------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------

_TQ = 16    # query rows per work item of rows_pass
_TK = 128   # key tile of rows_pass (the length of its row vectors)
_TK_KEYS = 64  # key tile of keys_pass: (d, 64) accumulators for dk and dv
_TK_MIN = 16
_TQ_FUSED = 16  # query rows per block of fused_pass
_FUSED_MIN_ITEMS = 4  # fused_pass when B*H >= this many per thread
_TQ_VEC = 16    # query rows per block of fused_f32 (a multiple of 16)
_TK_VEC = 64    # key tile of fused_f32
# fused_f32 when 4 * B*H >= threads: it runs one bh per thread, the tiled
# passes use every thread but run several times slower per row
_VECTOR_THREADS_PER_ITEM = 4


def _launch(kernel, *args):
    """``kernel(*args)``, one work item at a time per thread (chunk size 1, as
    the forward), serialized under numba's workqueue layer (see ``numba_cpu``)."""
    import contextlib

    import numba

    from . import numba_cpu

    lock = numba_cpu._workqueue_lock if numba_cpu._serialize(numba) else contextlib.nullcontext()
    setc = getattr(numba, "set_parallel_chunksize", None)
    with lock:
        old = setc(1) if setc is not None else None
        try:
            kernel(*args)
        finally:
            if setc is not None:
                setc(old)


def _writable(a):
    """``a``, or a copy where it is read-only: the kernels take one array type
    (a read-only view, e.g. from JAX or ``np.broadcast_to``, would be another,
    and q doubles as an unused output argument of the statistics pass)."""
    return a if a.flags.writeable else a.copy()


class Problem:
    """The inputs of one forward as the kernels take them (compute dtype,
    (BH, ...) layout; for ``fused_pass`` and the tiled passes also transposed
    copies of k and v, and for the tiled passes the row statistics)."""

    def __init__(self, q, k, v, rel_h, rel_w, k_size, scale):
        import numba

        B, H, Sq, d = q.shape
        Sk = k.shape[2]
        self.shape = (B, H, Sq, Sk, d)
        cdt = np.float64 if q.dtype == np.float64 else np.float32
        self.cdt = cdt
        BH = B * H
        self.q = _writable(np.ascontiguousarray(q, dtype=cdt).reshape(BH, Sq, d))
        k3 = _writable(np.ascontiguousarray(k, dtype=cdt).reshape(BH, Sk, d))
        self.k = k3
        k_h, k_w = int(k_size[0]), int(k_size[1])
        self.k_w = k_w
        self.has_rel = rel_h is not None
        if self.has_rel:
            self.rh = _writable(np.ascontiguousarray(rel_h, dtype=cdt).reshape(BH, Sq, k_h))
            self.rw = _writable(np.ascontiguousarray(rel_w, dtype=cdt).reshape(BH, Sq, k_w))
            j = np.arange(Sk, dtype=np.int64)
            self.kyi, self.kxi = j // k_w, j % k_w
        else:
            self.rh = self.rw = np.zeros((1, 1, 1), dtype=cdt)
            self.kyi = self.kxi = np.zeros(max(Sk, 1), dtype=np.int64)
        self.scale = cdt(scale)
        threads = numba.get_num_threads()
        self.tk = max(1, min(_TK, Sk))
        tk = max(1, min(_TK_KEYS, Sk))
        while BH * -(-Sk // tk) < 4 * threads and tk // 2 >= _TK_MIN:
            tk //= 2
        self.tk_keys = tk
        self.empty = BH * Sq == 0 or Sk == 0 or d == 0
        # float32 with at least one bh per 4 threads: fused_f32 (k and v as
        # they are, no row statistics kept). Otherwise, with enough bh to keep
        # every thread busy, one fused_pass per bh (its rows' statistics taken
        # from whole logit rows), else the tiled passes, parallel over query /
        # key tiles too
        self.vector = cdt == np.float32 and _VECTOR_THREADS_PER_ITEM * BH >= threads
        self.fused = BH >= _FUSED_MIN_ITEMS * threads
        if self.vector:
            self.v = _writable(np.ascontiguousarray(v, dtype=cdt).reshape(BH, Sk, d))
        else:
            self.m = np.empty((BH, Sq), dtype=cdt)
            self.l = np.empty((BH, Sq), dtype=cdt)
            self.kT = np.ascontiguousarray(k3.transpose(0, 2, 1))
            self.vT = np.ascontiguousarray(np.asarray(v, dtype=cdt).reshape(BH, Sk, d).transpose(0, 2, 1))
        self.have_stats = False

    def _stats(self):
        if not self.have_stats:
            self._rows(0, self.m, self.l, self.q, self.q, self.m, self.q, self.rh, self.rw)
            self.have_stats = True

    def _rows(self, mode, m, l, out, dout, dsum, dq, d_rel_h, d_rel_w):
        _launch(rows_pass, self.q, self.k, self.kT, self.vT, self.rh, self.rw, self.has_rel,
                self.kyi, self.kxi, self.scale, _TQ, self.tk, mode, m, l, out, dout, dsum, dq,
                d_rel_h, d_rel_w)

    def folds_terms(self, term_dtype):
        """Whether :meth:`backward` can take the terms' pullback too (the
        float32 vector kernel, with terms computed in float32)."""
        return self.vector and self.has_rel and not self.empty and np.dtype(term_dtype) == np.float32

    def backward(self, out, dout, tables=None):
        """(dq, dk, dv, d_rel_h, d_rel_w) of the core for the forward's ``out``
        and a cotangent ``dout`` (B, H, Sq, d): (BH, ...) arrays of the compute
        dtype; the terms' gradients None without terms.

        ``tables`` = (Rh, Rw, q_w), the gathered tables (q_h, k_h, d) and
        (q_w, k_w, d) in float32 and the query grid's width, where
        :meth:`folds_terms`: the terms' pullback is taken too, and the result
        is (dq, dk, dv, dRh, dRw), dq with the terms' part and dRh (q_h, k_h,
        d), dRw (q_w, k_w, d) the gathered tables' gradients (summed over
        batch and heads)."""
        B, H, Sq, Sk, d = self.shape
        BH, cdt = B * H, self.cdt
        if self.vector and not self.empty:
            # fused_f32 writes every entry
            dq = np.empty((BH, Sq, d), dtype=cdt)
            dk = np.empty((BH, Sk, d), dtype=cdt)
            dv = np.empty((BH, Sk, d), dtype=cdt)
            o3 = _writable(np.ascontiguousarray(out, dtype=cdt).reshape(BH, Sq, d))
            do3 = _writable(np.ascontiguousarray(dout, dtype=cdt).reshape(BH, Sq, d))
            fold = tables is not None
            unused = np.zeros((1, 1, 1), dtype=cdt)
            if fold:
                import numba

                groups = max(1, min(BH, numba.get_num_threads()))   # the bits do not depend on scheduling
                Rh = np.ascontiguousarray(tables[0], dtype=cdt)
                Rw = np.ascontiguousarray(tables[1], dtype=cdt)
                q_w = int(tables[2])
                dRh = np.zeros((groups,) + Rh.shape, dtype=cdt)
                dRw = np.zeros((groups,) + Rw.shape, dtype=cdt)
                dh = dw = unused
            else:
                groups, q_w = BH, 1
                Rh = Rw = unused
                dRh = dRw = unused[None]
                if self.has_rel:
                    dh = np.empty((BH, Sq, self.rh.shape[2]), dtype=cdt)
                    dw = np.empty((BH, Sq, self.rw.shape[2]), dtype=cdt)
                else:
                    dh = dw = unused
            _launch(fused_f32, self.q, self.k, self.v, self.rh, self.rw, self.has_rel, self.k_w,
                    self.scale, _TQ_VEC, _TK_VEC, o3, do3, dq, dk, dv, dh, dw,
                    groups, fold, Rh, Rw, q_w, dRh, dRw)
            if fold:
                return dq, dk, dv, dRh.sum(axis=0), dRw.sum(axis=0)
            if not self.has_rel:
                dh = dw = None
            return dq, dk, dv, dh, dw
        dq = np.zeros((BH, Sq, d), dtype=cdt)
        dk = np.zeros((BH, Sk, d), dtype=cdt)
        dv = np.zeros((BH, Sk, d), dtype=cdt)
        if self.has_rel:
            dh = np.zeros((BH, Sq, self.rh.shape[2]), dtype=cdt)
            dw = np.zeros((BH, Sq, self.rw.shape[2]), dtype=cdt)
        else:
            dh = dw = np.zeros((1, 1, 1), dtype=cdt)
        if not self.empty:
            o3 = _writable(np.ascontiguousarray(out, dtype=cdt).reshape(BH, Sq, d))
            do3 = _writable(np.ascontiguousarray(dout, dtype=cdt).reshape(BH, Sq, d))
            if self.fused:
                _launch(fused_pass, self.q, self.k, self.kT, self.vT, self.rh, self.rw, self.has_rel,
                        self.kyi, self.kxi, self.scale, _TQ_FUSED, o3, do3, dq, dk, dv, dh, dw)
                if not self.has_rel:
                    dh = dw = None
                return dq, dk, dv, dh, dw
            self._stats()
            dsum = np.empty((BH, Sq), dtype=cdt)
            self._rows(1, self.m, self.l, o3, do3, dsum, dq, dh, dw)
            _launch(keys_pass, self.q, self.kT, self.vT, self.rh, self.rw, self.has_rel, self.kyi,
                    self.kxi, self.scale, self.tk_keys, self.m, self.l, do3, dsum, dk, dv)
        if not self.has_rel:
            dh = dw = None
        return dq, dk, dv, dh, dw
