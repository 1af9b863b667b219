"""The reference backend: the formulas of spec/REFERENCE.md, written plainly in numpy.

It materializes the logits and the bias (one chunk of heads at a time so the
working set stays bounded), computes in float32 for half-precision inputs and in
float64 for float64, and rounds once at the end. It is the oracle the fast
backends are tested against and the fallback when nothing faster fits.
"""

from __future__ import annotations

import numpy as np

from relattn._arrays import array_module, compute_dtype

NAME = "numpy"
ARRAY_MODULE = "numpy"

# Bytes of logits one chunk of (batch, head) pairs may hold.
CHUNK_BYTES = 256 * 2**20
# Refuse work whose single-head logits alone would not fit this budget.
MAX_HEAD_BYTES = 8 * 2**30


def unavailable_reason():
    return None


def not_supported_reasons(q, k, v, rel_h, rel_w, k_size):
    work = compute_dtype(q.dtype)
    head_bytes = q.shape[2] * k.shape[2] * work.itemsize
    if head_bytes > MAX_HEAD_BYTES:
        return [
            f"the materialized logits of one head need {head_bytes / 2**30:.1f} GiB "
            f"(limit {MAX_HEAD_BYTES / 2**30:.0f} GiB); use a fused backend (numba, cupy)"
        ]
    return []


def softmax_attention(xp, q, k, v, rel_h, rel_w, k_size, scale):
    """The formula, in array-API calls only, for arrays of namespace ``xp``.

    ``q`` (n, Sq, d), ``k``/``v`` (n, Sk, d), ``rel_h`` (n, Sq, k_h), ``rel_w``
    (n, Sq, k_w) or both None, all in the compute dtype. Shared by this backend
    (numpy) and :mod:`relattn.array_api` (any array-API namespace).
    """
    logits = xp.matmul(q * scale, xp.matrix_transpose(k))  # (n, Sq, Sk)
    if rel_h is not None:
        k_h, k_w = k_size
        n, q_len = logits.shape[0], logits.shape[1]
        grid = xp.reshape(logits, (n, q_len, k_h, k_w))
        # SAM's order: (scale * q.k + rel_h) + rel_w.
        grid = (grid + rel_h[..., :, None]) + rel_w[..., None, :]
        logits = xp.reshape(grid, (n, q_len, k_h * k_w))
    logits = logits - xp.max(logits, axis=-1, keepdims=True)
    weights = xp.exp(logits)
    weights = weights / xp.sum(weights, axis=-1, keepdims=True)
    return xp.matmul(weights, v)


def attention(q, k, v, rel_h, rel_w, k_size, scale):
    xp = array_module(q)
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    work = compute_dtype(q.dtype)
    out = xp.empty((batch, heads, q_len, v.shape[3]), dtype=work)
    pairs = batch * heads
    if pairs == 0:
        return out.astype(q.dtype)
    flat = [None if a is None else a.reshape(pairs, *a.shape[2:]) for a in (q, k, v, rel_h, rel_w)]
    out_flat = out.reshape(pairs, q_len, v.shape[3])
    step = max(1, CHUNK_BYTES // max(1, q_len * k_len * work.itemsize))
    for start in range(0, pairs, step):
        sl = slice(start, start + step)
        qc, kc, vc, hc, wc = (None if a is None else a[sl].astype(work, copy=False) for a in flat)
        out_flat[sl] = softmax_attention(xp, qc, kc, vc, hc, wc, k_size, work.type(scale))
    return out.astype(q.dtype, copy=False)
