"""Numba kernels of the fused CPU backward (see ``relattn.autodiff``).

The attention core's pullback, flash-style: per (batch*head) ``bh``, with
``S = scale * q k^T + rel_h[i, ky] + rel_w[i, kx]`` (key ``j = ky * k_w + kx``),
``P = exp(S - m) / l`` with the row max ``m`` and sum of exponentials ``l``,
``D = rowsum(dO * O)``::

    dP = dO V^T      dS = P * (dP - D)
    dq = scale * dS K         dk = scale * dS^T q         dv = P^T dO
    d_rel_h[i, ky] = sum_kx dS[i, (ky, kx)]     d_rel_w[i, kx] = sum_ky dS[i, (ky, kx)]

Neither ``S``, ``P`` nor ``dS`` is ever stored whole: the logits are
recomputed tile by tile, in the forward's order ``(scale q . k + rel_h) +
rel_w``.  Each kernel is compiled for float32 and float64 (half precision is
computed in float32 by the caller).  With at least 4 (batch, head) pairs per
thread, ``fused_pass`` (parallel over bh) does it all: blocks of 16 query rows
against every key, so ``m`` and ``l`` come from whole rows, and dk / dv are
summed into the work item's own rows.  Otherwise two kernels share the work
over tiles:

* ``rows_pass`` (parallel over (bh, query tile)): with ``mode == 0`` the row
  statistics ``m``, ``l`` of the logits (an online max / sum of exponentials
  over key tiles, as the forward's), with ``mode == 1`` ``D``, ``dq`` and the
  terms' gradients ``d_rel_h``, ``d_rel_w`` (sums over key tiles).
* ``keys_pass`` (parallel over (bh, key tile)): ``dk`` and ``dv``, sums over
  all query rows, reading ``m``, ``l`` and ``D``.

Each query row is handled on its own: its logits over one key tile are a
vector of the tile's length, computed from transposed copies ``kT``, ``vT``
(bh, d, Sk) of ``k`` and ``v`` (made once by the caller) so that every inner
loop runs along a contiguous axis without a reduction (it vectorises without
``reassoc`` fast-math, which the exp's range reduction cannot take).  Memory
per work item: a few vectors of the key tile's length and of ``d``, and for
``keys_pass`` two (d, key tile) accumulators.

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

from ._numba_kernels import _CACHE, _FASTMATH, _fexp


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
# host side
# ---------------------------------------------------------------------------

_TQ = 16    # query rows per work item of rows_pass
_TK = 128   # key tile of rows_pass (the length of its row vectors)
_TK_KEYS = 64  # key tile of keys_pass: (d, 64) accumulators for dk and dv
_TK_MIN = 16
_TQ_FUSED = 16  # query rows per block of fused_pass
_FUSED_MIN_ITEMS = 4  # fused_pass when B*H >= this many per thread


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
    (BH, ...) layout, transposed k and v) and its row statistics."""

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
        self.kT = np.ascontiguousarray(k3.transpose(0, 2, 1))
        self.vT = np.ascontiguousarray(np.asarray(v, dtype=cdt).reshape(BH, Sk, d).transpose(0, 2, 1))
        k_h, k_w = int(k_size[0]), int(k_size[1])
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
        self.m = np.empty((BH, Sq), dtype=cdt)
        self.l = np.empty((BH, Sq), dtype=cdt)
        threads = numba.get_num_threads()
        self.tk = max(1, min(_TK, Sk))
        tk = max(1, min(_TK_KEYS, Sk))
        while BH * -(-Sk // tk) < 4 * threads and tk // 2 >= _TK_MIN:
            tk //= 2
        self.tk_keys = tk
        self.empty = BH * Sq == 0 or Sk == 0 or d == 0
        # enough (batch*head)s to keep every thread busy: one fused pass per
        # bh (its rows' statistics taken from whole logit rows); otherwise the
        # tiled passes, parallel over query / key tiles too
        self.fused = BH >= _FUSED_MIN_ITEMS * threads
        self.have_stats = False

    def _stats(self):
        if not self.have_stats:
            self._rows(0, self.m, self.l, self.q, self.q, self.m, self.q, self.rh, self.rw)
            self.have_stats = True

    def _rows(self, mode, m, l, out, dout, dsum, dq, d_rel_h, d_rel_w):
        _launch(rows_pass, self.q, self.k, self.kT, self.vT, self.rh, self.rw, self.has_rel,
                self.kyi, self.kxi, self.scale, _TQ, self.tk, mode, m, l, out, dout, dsum, dq,
                d_rel_h, d_rel_w)

    def backward(self, out, dout):
        """(dq, dk, dv, d_rel_h, d_rel_w) of the core for the forward's ``out``
        and a cotangent ``dout`` (B, H, Sq, d): (BH, ...) arrays of the compute
        dtype; the terms' gradients None without terms."""
        B, H, Sq, Sk, d = self.shape
        BH, cdt = B * H, self.cdt
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
