"""The reference backend: the formulas of spec/REFERENCE.md, written plainly in numpy.

It materializes the logits and the bias one chunk at a time, computes in
float32 for half-precision inputs and in float64 for float64, and rounds once
at the end. It is the oracle the fast backends are tested against and the
fallback when nothing faster fits.

A chunk is a block of (batch, head) pairs whose logits together fit
``CHUNK_BYTES``; when one head's logits do not fit, it is a block of query rows
of one head that does (at least one row: a single row larger than the budget is
a chunk of its own, over budget). The softmax runs in place in the chunk's
logits buffer, so the peak extra memory of a call is about 1 x CHUNK_BYTES plus
the output (in the compute dtype, and its cast for half-precision inputs), plus
small per-chunk terms: the scaled q rows, the row max and the row sum (at most
``rows * (d + 2)`` values), numpy's iteration buffer for the broadcast in-place
additions (``np.getbufsize()`` values), and for half-precision inputs float32
copies of the chunk's q rows and of its heads' k and v (an input whose batch and
head axes cannot be merged without a copy is first copied whole).
``tests/test_memory.py`` measures it: with CHUNK_BYTES = 1 MiB and one head of
16 MiB float32 logits, the peak less the output is 1.04 MiB.

Bits: each chunk computes exactly the operations of the formula, in its order,
per element. When whole heads fit, the BLAS calls have the same shapes as on
the whole problem and the result is that of the plain formula bit for bit; a
head split into row blocks gives, for each block, the formula's bits on those
rows, which may differ in the last bits from the whole-head evaluation (BLAS's
per-element result can depend on how many rows a call has).
"""

from __future__ import annotations

import numpy as np

from relattn._arrays import compute_dtype

NAME = "numpy"
ARRAY_MODULE = "numpy"

# Bytes of logits one chunk (a block of (batch, head) pairs, or of query rows of
# one head) may hold. The softmax is computed in place in that buffer: a call's
# peak extra memory is about 1 x CHUNK_BYTES plus the output and the small
# per-chunk terms listed in the module docstring.
CHUNK_BYTES = 256 * 2**20
# Refuse work whose single-head logits alone would not fit this budget.
MAX_HEAD_BYTES = 8 * 2**30


def unavailable_reason():
    return None


def describe() -> str:
    return f"the formula, materialized (logits in chunks of at most {CHUNK_BYTES // 2**20} MiB)"


def not_supported_reasons(q, k, v, rel_pos_h, rel_pos_w, k_size):
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
    (n, Sq, k_w) or both None, all in the compute dtype. Used by
    :mod:`relattn.array_api` (any array-API namespace); this backend runs
    :func:`_softmax_attention_inplace`, the same steps in place in numpy.
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


def logits_inplace(q, k, rel_h, rel_w, k_size, scale, logits):
    """``logits = scale * q k^T + rel_h[i, ky] + rel_w[i, kx]`` into the (n, Sq,
    Sk) buffer ``logits``, in SAM's order ``(scale * q.k + rel_h) + rel_w``;
    ``rel_h`` / ``rel_w`` None: no bias. Returns ``logits``."""
    np.matmul(q * scale, np.matrix_transpose(k), out=logits)  # scale q k^T
    if rel_h is not None:
        k_h, k_w = k_size
        grid = logits.reshape(logits.shape[0], logits.shape[1], k_h, k_w)  # a view
        grid += rel_h[..., :, None]
        grid += rel_w[..., None, :]
    return logits


def _softmax_attention_inplace(q, k, v, rel_h, rel_w, k_size, scale, logits, out, stats=None):
    """:func:`softmax_attention` for numpy, in place: ``out = softmax(logits) @ v``.

    ``logits`` is a C-contiguous (n, Sq, Sk) buffer of the compute dtype that
    every step overwrites; ``out`` (n, Sq, d) receives the result. Per element
    the operations and their order are those of :func:`softmax_attention`, so
    the bits are the same; the only extra memory is the scaled ``q``, the row
    max and sum, and numpy's iteration buffer for the broadcast additions.
    ``stats`` (n, Sq, 2), when given, receives each row's max and sum of
    exponentials (its log-sum-exp, for a backward pass).
    """
    logits_inplace(q, k, rel_h, rel_w, k_size, scale, logits)
    row_max = np.max(logits, axis=-1, keepdims=True)
    logits -= row_max
    weights = np.exp(logits, out=logits)
    row_sum = np.sum(weights, axis=-1, keepdims=True)
    weights /= row_sum
    np.matmul(weights, v, out=out)
    if stats is not None:
        stats[..., :1], stats[..., 1:] = row_max, row_sum


def _chunk_shape(pairs, q_len, k_len, itemsize):
    """(pairs, query rows) of one chunk: as many whole heads as fit CHUNK_BYTES,
    else one head's rows, as many as fit (at least one)."""
    head_bytes = q_len * k_len * itemsize
    if head_bytes <= CHUNK_BYTES:
        return min(pairs, CHUNK_BYTES // max(1, head_bytes)), q_len
    return 1, min(q_len, max(1, CHUNK_BYTES // (k_len * itemsize)))


def attention(q, k, v, rel_h, rel_w, k_size, scale, stats=None):
    """The backend contract (see ``relattn.backends``); ``stats``, when given,
    a (B, heads, Sq, 2) array of the compute dtype that receives each logit
    row's max and sum of exponentials."""
    batch, heads, q_len, head_dim = q.shape
    k_len, v_dim = k.shape[2], v.shape[3]
    work = compute_dtype(q.dtype)
    out = np.empty((batch, heads, q_len, v_dim), dtype=work)
    pairs = batch * heads
    if pairs == 0 or q_len == 0:
        return out.astype(q.dtype)
    q_flat, k_flat, v_flat, h_flat, w_flat = (
        None if a is None else a.reshape(pairs, *a.shape[2:]) for a in (q, k, v, rel_h, rel_w))
    out_flat = out.reshape(pairs, q_len, v_dim)
    stats_flat = None if stats is None else stats.reshape(pairs, q_len, 2)
    step, rows = _chunk_shape(pairs, q_len, k_len, work.itemsize)
    buffer = np.empty(step * rows * k_len, dtype=work)  # one chunk's logits, reused
    scale = work.type(scale)
    for start in range(0, pairs, step):
        pair_sl = slice(start, start + step)
        kc = vc = None  # drop the previous block's copies before making the next
        kc, vc = (a[pair_sl].astype(work, copy=False) for a in (k_flat, v_flat))
        for row in range(0, q_len, rows):
            sl = (pair_sl, slice(row, row + rows))
            qc, hc, wc = (None if a is None else a[sl].astype(work, copy=False)
                          for a in (q_flat, h_flat, w_flat))
            n, m = qc.shape[:2]
            logits = buffer[: n * m * k_len].reshape(n, m, k_len)
            _softmax_attention_inplace(qc, kc, vc, hc, wc, k_size, scale, logits, out_flat[sl],
                                       None if stats_flat is None else stats_flat[sl])
    return out.astype(q.dtype, copy=False)
