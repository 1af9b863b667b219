"""The attention core's backward on the GPU, as CuPy operations over chunks.

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

import numpy as np

from relattn._arrays import astype, compute_dtype

__all__ = ["CHUNK_BYTES", "chunk_shape", "row_stats", "core_backward"]

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
