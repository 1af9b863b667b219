"""The backward pass: ``rel_pos_attention`` and its pullback (VJP).

The reference is exact, readable like the formulas, numpy only. Per (batch,
head), with ``S = scale * q k^T + rel_h[i, ky] + rel_w[i, kx]``, ``P =
softmax(S)`` and ``O = P V``, the pullback of a cotangent ``dO`` is

    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - rowsum(dO * O))          (rowsum(dO * O) = rowsum(P * dP))
    dq = scale * dS k  + sum_ky d_rel_h[i, ky] Rh[y(i), ky] + sum_kx d_rel_w[i, kx] Rw[x(i), kx]
    dk = scale * dS^T q
    d_rel_h[i, ky] = sum_kx dS[i, (ky, kx)]     d_rel_w[i, kx] = sum_ky dS[i, (ky, kx)]

and the tables' gradients go back through SAM's ``get_rel_pos``: ``Rh[y, ky] =
table[index[y, ky]]`` (a gather, whose adjoint is a scatter-add over the index
table) of the table linearly resized to ``2 * max(q_h, k_h) - 1`` rows when it
has another row count (whose adjoint sends each output row's cotangent back to
its two source rows with the same weights). The tables are shared by all heads
and batch entries, so their gradients are sums over them. The two
scatter-adds are written with array operations numpy and CuPy share, adding
in the order of ``np.add.at`` (so with its bits on numpy).

The forward is the numpy backend's (``relattn.backends.reference``): the same
operations in the same order, so ``out`` is the bits of
``rel_pos_attention(..., backend="numpy")``; it keeps the log-sum-exp of every
logit row, as its two parts (the row's max and its sum of exponentials), for the
backward, which recomputes each head's logits with the same operations and so
the forward's weights (to rounding; normally bit for bit).

``backend="numba"`` (and ``"auto"`` on numpy arrays where numba runs) takes
the fused path instead: the numba forward, then
``relattn.backends._numba_backward``'s flash-style kernels for the core (dq,
dk, dv and the terms' gradients d_rel_h, d_rel_w, never an S_q x S_k buffer),
then the same table adjoints. With float32 terms the float32 kernel also
takes the pullback through ``q . R`` (so the terms' gradients never exist
whole) and only the gather's and the resize's adjoints are left.

CuPy arrays (``backend="cupy"`` or ``"auto"``) take the GPU path: ``out``
from ``rel_pos_attention(..., backend="cupy")``, then the core's gradients
from :func:`_core_backward_gpu`, then the table adjoints above in CuPy.
float16 / bfloat16 inputs (head_dim a multiple of 8 up to 128, compute
capability 8.0 and newer) take fused tensor-core kernels, float32 inputs
(head_dim up to 128) fused SIMT kernels (``relattn.backends.gpu.backward``,
``cuda/bwd.cu``, ``cuda/bwd32.cu``): the forward keeps one log-sum-exp per
query row, the backward recomputes the logits tile by tile and never holds
an S_q x S_k buffer. Other inputs (float64) keep each row's max and sum of
exponentials and go by CuPy operations over chunks of query rows (each
chunk's logits within ``relattn.backends.gpu.backward.CHUNK_BYTES``).
Everything stays on the inputs' device. What a CuPy call decides from its
arrays' signature (shapes, strides, dtypes, device, alignment; scale, sizes,
backend) is decided once (:class:`_GpuVjp`): a later call of that signature
skips validation and planning, as :func:`relattn.rel_pos_attention`'s call
plans do, and the pullback's kernels launch from argument blocks built on
the signature's first call.
"""

from __future__ import annotations

import functools

import numpy as np

from relattn import backends
from relattn._arrays import array_module, astype, compute_dtype, dtype_name
from relattn._cache import BoundedCache
from relattn.backends import reference
from relattn.functional import BackendError, _call_key, _prepare, _row_chunk
from relattn.relpos import (
    _gathered,
    _on_device,
    _relative_index,
    _resize_arithmetic,
    _resize_plan,
    decomposed_rel_pos_rows,
    resize_ahead,
)
from relattn.relpos import terms as relpos_terms

__all__ = ["rel_pos_attention_vjp"]


# ------------------------------------------------------------------ forward
def _logits(qc, kc, hc, wc, k_size, scale):
    """The numpy backend's logits (``reference.logits_inplace``) in a new buffer."""
    buffer = np.empty((qc.shape[0], qc.shape[1], kc.shape[1]), dtype=qc.dtype)
    return reference.logits_inplace(qc, kc, hc, wc, k_size, scale, buffer)


def _core(q, k, v, rel_h, rel_w, k_size, scale):
    """``reference.attention``, also returning each logit row's log-sum-exp as
    its max and its sum of exponentials: shape (B, heads, Sq, 2), in the
    compute dtype."""
    stats = np.empty(q.shape[:3] + (2,), dtype=compute_dtype(q.dtype))
    if stats.size == 0:
        return reference.attention(q, k, v, rel_h, rel_w, k_size, scale), stats
    return reference.attention(q, k, v, rel_h, rel_w, k_size, scale, stats), stats


def _forward(q, k, v, th, tw, q_size, k_size, scale):
    """``functional._cpu_run`` of the numpy backend (terms whole, or by
    chunks of query rows past ``TERMS_BUDGET``), through :func:`_core`."""
    if th is None:
        return _core(q, k, v, None, None, k_size, scale)
    rows = _row_chunk(q, th, q_size, k_size)
    if rows is None:
        rel_h, rel_w = relpos_terms(q, th, tw, q_size, k_size)
        return _core(q, k, v, rel_h, rel_w, k_size, scale)
    out = np.empty(q.shape[:3] + (v.shape[3],), dtype=q.dtype)
    stats = np.empty(q.shape[:3] + (2,), dtype=compute_dtype(q.dtype))
    for start in range(0, q.shape[2], rows):
        q_rows = q[:, :, start:start + rows]
        rel_h, rel_w = decomposed_rel_pos_rows(q_rows, th, tw, q_size, k_size, start)
        out[:, :, start:start + rows], stats[:, :, start:start + rows] = _core(
            q_rows, k, v, rel_h, rel_w, k_size, scale)
    return out, stats


# ----------------------------------------------------------------- backward
# The adjoints of the gather and of the resize are scatter-adds: each target
# row sums the cotangents of the positions that read it. They are summed one
# by one, in the order of the positions (the order of ``np.add.at``, so the
# bits are its bits), with plain array operations that numpy and CuPy both
# have: every target row lists its positions in a (rows, width) table, padded
# with a position that holds zeros, and step t adds column t of that table to
# every row at once (adding +0.0 changes no sum: one that starts at +0.0
# never becomes -0.0).
def _accumulation_slots(index, rows):
    """``slots`` (width, rows): ``slots[t, r]`` is the t-th position p (in
    increasing order) with ``index[p] == r``, or ``index.size`` (the zero
    row) past the last; ``width`` is the largest count."""
    n = index.size
    order = np.argsort(index, kind="stable")          # positions grouped by row, increasing within
    counts = np.bincount(index, minlength=rows)
    starts = np.cumsum(counts) - counts
    target = index[order]
    slots = np.full((int(counts.max(initial=0)), rows), n, dtype=np.int64)
    slots[np.arange(n) - starts[target], target] = order
    slots.flags.writeable = False
    return slots


@functools.lru_cache(maxsize=256)
def _gather_slots(q_len, k_len):
    """The slots of the gather ``Rh[y, ky] = table[index[y, ky]]`` (positions
    ``y * k_len + ky``)."""
    return _accumulation_slots(_relative_index(q_len, k_len).ravel(), 2 * max(q_len, k_len) - 1)


@functools.lru_cache(maxsize=256)
def _resize_slots(in_rows, length, arithmetic):
    """The slots of the resize's two reads, ``x[i0[r]]`` (positions ``r``)
    then ``x[i1[r]]`` (positions ``length + r``)."""
    i0, i1, _, _ = _resize_plan(in_rows, length, arithmetic)
    return _accumulation_slots(np.concatenate([i0, i1]), in_rows)


# Bytes of one block of gathered rows in the blocked scatter-add (see _scatter_add).
SCATTER_BLOCK_BYTES = 32 * 2**20


def _scatter_add(values, slots, key, blocked=None):
    """``out[r] = sum of values[p] over the positions p of row r``; ``values``
    (n, C) numpy or CuPy, ``slots`` from :func:`_accumulation_slots` (``key``
    names them for the device cache). Returns (rows, C) of values' dtype.

    numpy: one row of ``slots`` at a time, added in the slots' order from
    +0.0. CuPy (``blocked`` None), or ``blocked=True``: blocks of slot rows
    (their gathered values within :data:`SCATTER_BLOCK_BYTES`) gathered at
    once and summed by the array library's reduction, block after block: a
    launch or two per block where the row at a time costs two per slot row
    (64 at SAM's global grid), on a GPU the pullback's host time. The same
    sums, deterministic, rounded in the reduction's order."""
    xp = array_module(values)
    slots = _on_device(xp, key, slots)
    width, rows = slots.shape
    channels = values.shape[1]
    padded = xp.concatenate([values, xp.zeros((1, channels), dtype=values.dtype)])
    if blocked is None:
        blocked = xp is not np
    if not blocked:
        out = xp.zeros((rows, channels), dtype=values.dtype)
        for column in slots:
            out += padded[column]
        return out
    step = max(1, SCATTER_BLOCK_BYTES // max(1, rows * channels * values.dtype.itemsize))
    out = None
    for t in range(0, width, step):
        part = padded[slots[t:t + step]].sum(axis=0)
        out = part if out is None else out + part
    return xp.zeros((rows, channels), dtype=values.dtype) if out is None else out


def _resize_adjoint(d_resized, in_rows, arithmetic):
    """Adjoint of ``resize_rel_pos`` from ``in_rows`` rows: ``out[r] =
    lambda0[r] x[i0[r]] + lambda1[r] x[i1[r]]``, so ``dx[i0[r]] += lambda0[r]
    dout[r]`` and ``dx[i1[r]] += lambda1[r] dout[r]`` (the weights of the resize)."""
    length = d_resized.shape[0]
    xp = array_module(d_resized)
    dtype = d_resized.dtype
    _, _, lambda0, lambda1 = _resize_plan(in_rows, length, arithmetic)
    weights = [_on_device(xp, ("vjp-resize-weight", in_rows, length, arithmetic, dtype.str, n),
                          lam.astype(dtype)) for n, lam in enumerate((lambda0, lambda1))]
    products = xp.concatenate([weights[0] * d_resized, weights[1] * d_resized])
    return _scatter_add(products, _resize_slots(in_rows, length, arithmetic),
                        ("vjp-resize-slots", in_rows, length, arithmetic))


def _table_adjoint(d_gathered, table, q_len, k_len, resize_dtype):
    """Gradient of the stored ``table`` (its shape and dtype) from the gradient
    of ``get_rel_pos(q_len, k_len, table)`` (q_len, k_len, C): scatter-add
    through the gather, then the resize's adjoint when the table was resized.
    numpy or CuPy arrays (those of ``d_gathered``)."""
    rows = 2 * max(q_len, k_len) - 1
    d_resized = _scatter_add(d_gathered.reshape(q_len * k_len, d_gathered.shape[2]),
                             _gather_slots(q_len, k_len), ("vjp-gather-slots", q_len, k_len))
    assert d_resized.shape[0] == rows
    return _resized_adjoint(d_resized, table, resize_dtype)


def _resized_adjoint(d_resized, table, resize_dtype):
    """The stored ``table``'s gradient from that of the table SAM's gather
    read (``2 * max - 1`` rows): the resize's adjoint when the table was
    resized, in the table's dtype."""
    if table.shape[0] != d_resized.shape[0]:
        d_resized = _resize_adjoint(d_resized, table.shape[0],
                                    _resize_arithmetic(table.dtype, resize_dtype))
    return astype(d_resized, table.dtype)


def _check_dout(dout, out):
    """``dout`` checked against ``out``: the same array type, dtype and shape
    (and for CuPy the same device); TypeError / ValueError naming it."""
    if type(dout) is not type(out):
        raise TypeError(f"dout: expected a {array_module(out).__name__} array like out, "
                        f"got {type(dout).__name__}")
    if dout.dtype != out.dtype:
        raise TypeError(f"dout: expected dtype {dtype_name(out.dtype)} (that of out), "
                        f"got {dtype_name(dout.dtype)}")
    if dout.shape != out.shape:
        raise ValueError(f"dout: expected shape {tuple(out.shape)} (that of out), got {tuple(dout.shape)}")
    if type(out) is not np.ndarray and dout.device.id != out.device.id:
        raise ValueError(f"dout: expected an array on device {out.device.id} (that of out), "
                         f"got one on device {dout.device.id}")
    return dout


def _pullback(q, k, v, th, tw, stored, q_size, k_size, scale, resize_dtype, out, stats):
    """The pullback of one forward; ``th``/``tw`` are the tables as the
    backend got them (resized ahead in ``"table"`` mode), ``stored`` the
    caller's tables (whose shapes and dtypes the gradients take)."""
    batch, heads, q_len, head_dim = q.shape
    work = compute_dtype(q.dtype)                  # the attention's arithmetic (as the forward)
    use_rel = th is not None
    if use_rel:
        (q_h, q_w), (k_h, k_w) = q_size, k_size
        term_work = compute_dtype(q.dtype, th.dtype, tw.dtype)   # the terms' arithmetic
        # Rh[y, ky] and Rw[x, kx] as the forward gathered them: (q_h, k_h, C), (q_w, k_w, C)
        Rh = astype(_gathered(q_h, k_h, th), term_work)
        Rw = astype(_gathered(q_w, k_w, tw), term_work)
    scale_w = work.type(scale)

    def pullback(dout):
        dout = _check_dout(dout, out)
        dq = np.empty(q.shape, dtype=q.dtype)
        dk = np.empty(k.shape, dtype=k.dtype)
        dv = np.empty(v.shape, dtype=v.dtype)
        if use_rel:
            dRh = np.zeros(Rh.shape, dtype=term_work)
            dRw = np.zeros(Rw.shape, dtype=term_work)
        for b in range(batch):
            for h in range(heads):
                qi = q[b, h].astype(work)
                ki = k[b, h].astype(work)
                vi = v[b, h].astype(work)
                do = dout[b, h].astype(work)
                # This head's logits (S_q x S_k, materialized), recomputed with the
                # forward's operations, and its weights from the saved row max and sum.
                rel_h = rel_w = None
                if use_rel:
                    rel_h, rel_w = (t[0].astype(work) for t in relpos_terms(
                        q[b, h:h + 1], th, tw, q_size, k_size))        # (1, Sq, k_h), (1, Sq, k_w)
                S = _logits(qi[None], ki[None], rel_h, rel_w, k_size, scale_w)[0]
                row_max, row_sum = stats[b, h, :, 0:1], stats[b, h, :, 1:2]
                P = np.exp(S - row_max) / row_sum                      # softmax, as the forward
                dv[b, h] = P.T @ do                                    # dV = P^T dO
                dP = do @ vi.T                                         # dP = dO V^T
                dS = P * (dP - np.sum(P * dP, axis=-1, keepdims=True))
                dq_bh = scale_w * (dS @ ki)
                dk[b, h] = scale_w * (dS.T @ qi)
                if use_rel:
                    dS_grid = dS.reshape(q_len, k_h, k_w).astype(term_work)
                    d_rel_h = dS_grid.sum(axis=2)                       # (Sq, k_h)
                    d_rel_w = dS_grid.sum(axis=1)                       # (Sq, k_w)
                    # rel_h[(y, x), ky] = q_(y,x) . Rh[y, ky]; rel_w[(y, x), kx] = q_(y,x) . Rw[x, kx]
                    q_grid = q[b, h].astype(term_work).reshape(q_h, q_w, head_dim)
                    dh_grid = d_rel_h.reshape(q_h, q_w, k_h)
                    dw_grid = d_rel_w.reshape(q_h, q_w, k_w)
                    dq_terms = (np.einsum("yxk,ykc->yxc", dh_grid, Rh)
                                + np.einsum("yxk,xkc->yxc", dw_grid, Rw))
                    dRh += np.einsum("yxk,yxc->ykc", dh_grid, q_grid)
                    dRw += np.einsum("yxk,yxc->xkc", dw_grid, q_grid)
                    dq_bh = dq_bh + dq_terms.reshape(q_len, head_dim)
                dq[b, h] = dq_bh
        if not use_rel:
            return dq, dk, dv, None, None
        d_h = _table_adjoint(dRh, stored[0], q_h, k_h, resize_dtype)
        d_w = _table_adjoint(dRw, stored[1], q_w, k_w, resize_dtype)
        return dq, dk, dv, d_h, d_w

    return pullback


# ------------------------------------------------------------ fused (numba)
def _numba_available() -> bool:
    return backends.get("numba").unavailable_reason() is None


def _forward_numba(q, k, v, th, tw, q_size, k_size, scale):
    """The numba backend's forward (``functional._cpu_run`` of it: terms whole,
    or by chunks of query rows past ``TERMS_BUDGET``), so ``out`` is the bits
    of ``rel_pos_attention(..., backend="numba")``; and the fused backward's
    state (``_numba_backward.Problem``: the inputs as its kernels take them
    and each logit row's max and sum of exponentials). The terms are kept
    whole for the backward (B x heads x Sq x (k_h + k_w) values)."""
    from relattn.backends import _numba_backward, numba_cpu

    if th is None:
        rel_h = rel_w = None
        out = numba_cpu.attention(q, k, v, None, None, k_size, scale)
    else:
        rows = _row_chunk(q, th, q_size, k_size)
        if rows is None:
            rel_h, rel_w = relpos_terms(q, th, tw, q_size, k_size)
            out = numba_cpu.attention(q, k, v, rel_h, rel_w, k_size, scale)
        else:
            out = np.empty(q.shape[:3] + (v.shape[3],), dtype=q.dtype)
            parts = []
            for start in range(0, q.shape[2], rows):
                q_rows = q[:, :, start:start + rows]
                h, w = decomposed_rel_pos_rows(q_rows, th, tw, q_size, k_size, start)
                out[:, :, start:start + rows] = numba_cpu.attention(q_rows, k, v, h, w, k_size, scale)
                parts.append((h, w))
            rel_h = np.concatenate([h for h, _ in parts], axis=2)
            rel_w = np.concatenate([w for _, w in parts], axis=2)
    return out, _numba_backward.Problem(q, k, v, rel_h, rel_w, k_size, scale)


def _gathered_tables(th, tw, q_size, k_size, term_work):
    """``Rh`` (q_h, k_h, C) and ``Rw`` (q_w, k_w, C) as the forward gathered
    them, in the terms' arithmetic ``term_work``: on the GPU, float32 from
    tables of the gather's row count by one kernel each."""
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    if array_module(th) is not np and term_work == np.float32:
        from relattn.backends.gpu import backward

        if all(dtype_name(t.dtype) in backward.TERMS_DTYPES and t.flags.c_contiguous
               and t.shape[0] == 2 * max(a, b) - 1 for t, a, b in ((th, q_h, k_h), (tw, q_w, k_w))):
            return backward.gathered_f32(th, q_h, k_h), backward.gathered_f32(tw, q_w, k_w)
    return astype(_gathered(q_h, k_h, th), term_work), astype(_gathered(q_w, k_w, tw), term_work)


def _terms_pullback(q, dq_core, d_rel_h, d_rel_w, Rh, Rw, stored, q_size, k_size, resize_dtype, term_work):
    """The pullback through the terms ``rel_h = q . Rh``, ``rel_w = q . Rw``,
    batched over batch and heads, numpy or CuPy (the arrays'): ``dq`` (q's
    shape and dtype: the core's ``dq_core`` plus the terms' part) and the
    stored tables' gradients (through the gather and the resize).
    ``d_rel_h`` / ``d_rel_w``: (B*H, Sq, k_h) / (B*H, Sq, k_w) or of shape
    (B, H, Sq, k_*)."""
    xp = array_module(q)
    batch, heads, q_len, head_dim = q.shape
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    n = batch * heads
    dh = astype(d_rel_h, term_work).reshape(n, q_h, q_w, k_h)
    dw = astype(d_rel_w, term_work).reshape(n, q_h, q_w, k_w)
    q_grid = astype(q, term_work).reshape(n, q_h, q_w, head_dim)
    # dq += sum_ky d_rel_h[(y, x), ky] Rh[y, ky] + sum_kx d_rel_w[(y, x), kx] Rw[x, kx]
    dq_h = xp.matmul(dh.transpose(1, 0, 2, 3).reshape(q_h, n * q_w, k_h), Rh)
    dq_w = xp.matmul(dw.transpose(2, 0, 1, 3).reshape(q_w, n * q_h, k_w), Rw)
    dq_terms = (dq_h.reshape(q_h, n, q_w, head_dim).transpose(1, 0, 2, 3)
                + dq_w.reshape(q_w, n, q_h, head_dim).transpose(1, 2, 0, 3))
    dq = astype((dq_core.reshape(n, q_h, q_w, head_dim) + dq_terms).reshape(q.shape), q.dtype)
    # dRh[y, ky] = sum_(b, h, x) d_rel_h q;  dRw[x, kx] = sum_(b, h, y) d_rel_w q
    dRh = xp.matmul(dh.transpose(1, 3, 0, 2).reshape(q_h, k_h, n * q_w),
                    q_grid.transpose(1, 0, 2, 3).reshape(q_h, n * q_w, head_dim))
    dRw = xp.matmul(dw.transpose(2, 3, 0, 1).reshape(q_w, k_w, n * q_h),
                    q_grid.transpose(2, 0, 1, 3).reshape(q_w, n * q_h, head_dim))
    d_h = _table_adjoint(dRh, stored[0], q_h, k_h, resize_dtype)
    d_w = _table_adjoint(dRw, stored[1], q_w, k_w, resize_dtype)
    return dq, d_h, d_w


def _pullback_numba(q, k, v, th, tw, stored, q_size, k_size, resize_dtype, out, problem):
    """The pullback through the fused kernels (``_numba_backward``): the core's
    gradients and the terms' (``d_rel_h``, ``d_rel_w``) come from the kernels;
    the tables' go back through ``q . R``, the gather and the resize as in
    :func:`_pullback`, batched over batch and heads (:func:`_terms_pullback`).
    Where the float32 kernel runs and the terms are float32
    (``Problem.folds_terms``) it takes the pullback through ``q . R`` too (the
    terms' gradients, B x heads x Sq x (k_h + k_w) values, never exist whole);
    then only the gather's and the resize's adjoints are left here."""
    use_rel = th is not None
    if use_rel:
        term_work = compute_dtype(q.dtype, th.dtype, tw.dtype)
        Rh, Rw = _gathered_tables(th, tw, q_size, k_size, term_work)
    k_shape, k_dtype, v_shape, v_dtype = k.shape, k.dtype, v.shape, v.dtype
    # the kernels take the terms' pullback too: no (B*H, Sq, k) gradients of the terms
    tables = (Rh, Rw, q_size[1]) if use_rel and problem.folds_terms(term_work) else None

    def pullback(dout):
        dout = _check_dout(dout, out)
        dq3, dk3, dv3, g_h, g_w = problem.backward(out, dout, tables)
        dk = dk3.reshape(k_shape).astype(k_dtype, copy=False)
        dv = dv3.reshape(v_shape).astype(v_dtype, copy=False)
        if not use_rel:
            return dq3.reshape(q.shape).astype(q.dtype, copy=False), dk, dv, None, None
        if tables is not None:   # g_h, g_w: the gathered tables' gradients; dq complete
            dq = dq3.reshape(q.shape).astype(q.dtype, copy=False)
            d_h = _table_adjoint(g_h, stored[0], q_size[0], k_size[0], resize_dtype)
            d_w = _table_adjoint(g_w, stored[1], q_size[1], k_size[1], resize_dtype)
        else:                    # g_h, g_w: the terms' gradients
            dq, d_h, d_w = _terms_pullback(q, dq3, g_h, g_w, Rh, Rw, stored, q_size, k_size,
                                           resize_dtype, term_work)
        return dq, dk, dv, d_h, d_w

    return pullback


# ------------------------------------------------------------------ GPU (cupy)
def _lse_plan(q, k, v, th, tw, q_size, k_size, scale):
    """The cupy backend's plan of this forward (tables ``th``, ``tw`` as it
    gets them) when its kernel keeps each row's log-sum-exp, else None."""
    try:
        plan = backends.get("cupy").plan(q, k, v, th, tw, q_size, k_size, scale)
    except ValueError:   # no kernel: rel_pos_attention's own path says why
        return None
    return plan if plan.writes_lse else None


class _GpuVjp:
    """What :func:`rel_pos_attention_vjp` decides from the signature of a
    call on CuPy arrays (validated), decided once: the resize ahead of the
    kernels, the terms kernel's run, and the forward plan that keeps each
    row's log-sum-exp (or None). Calling it, ``vjp(q, k, v, rel_pos_h,
    rel_pos_w)``, computes the forward of arrays of that signature and
    returns ``(out, pullback)``; calls of the same signature on CuPy arrays
    reuse it (:data:`_gpu_vjps`), skipping validation and planning as
    :func:`relattn.rel_pos_attention`'s plans do."""

    def __init__(self, q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, resize_dtype):
        from relattn.backends.gpu import backward, terms

        self.sizes, self.scale, self.resize_dtype = (q_size, k_size), scale, resize_dtype
        self.prep = resize_ahead(resize_dtype, rel_pos_h, rel_pos_w, q_size, k_size)
        self.terms_run = self.lse_plan = None
        self.kernels = False
        with q.device:
            th, tw = (rel_pos_h, rel_pos_w) if self.prep is None else self.prep(rel_pos_h, rel_pos_w)
            if th is not None:
                self.terms_run = terms.plan(q, th, tw, q_size, k_size)[0]
                term_work = compute_dtype(q.dtype, th.dtype, tw.dtype)
                # the terms' pullback kernels: float32 terms, 16-bit or float32 q
                self.kernels = term_work == np.float32 and dtype_name(q.dtype) in backward.TERMS_DTYPES
            if backward.takes_forward_lse(q, k, v, th, k_size):
                self.lse_plan = _lse_plan(q, k, v, th, tw, q_size, k_size, scale)

    def __call__(self, q, k, v, rel_pos_h, rel_pos_w):
        stored = (rel_pos_h, rel_pos_w)
        with q.device:
            th, tw = stored if self.prep is None else self.prep(*stored)
            out, rel_h, rel_w, stats = self._forward(q, k, v, stored, th, tw)
            return out, _pullback_gpu(q, k, v, th, tw, stored, *self.sizes, self.scale, self.resize_dtype,
                                      out, rel_h, rel_w, stats, self.kernels)

    def _forward(self, q, k, v, stored, th, tw):
        """The cupy backend's forward, ``out`` with the bits of
        ``rel_pos_attention(..., backend="cupy")`` (its plan), and the
        backward's state: the terms ``rel_h``, ``rel_w`` of the tables ``th``,
        ``tw`` as the backend got them, whole, in the attention's compute
        dtype (or None), and what the backward keeps of the logit rows: for
        the 16-bit fused kernels the forward kernel's log-sum-exp of each row
        where it keeps one (``relattn_ws``: the pullback then skips its row
        pass), else nothing (the pullback computes it); otherwise
        :func:`relattn.backends.gpu.backward.forward_stats` (the log-sum-exp
        for the float32 fused kernels; else each row's max and sum of
        exponentials)."""
        import cupy

        from relattn.backends.gpu import backward
        from relattn.functional import rel_pos_attention

        rel_h = rel_w = None
        if self.terms_run is not None:   # the terms kernel the cupy backend runs (einsum for float64)
            work = compute_dtype(q.dtype)
            rel_h, rel_w = (astype(t, work) for t in self.terms_run(q, th, tw))
        if self.lse_plan is not None:
            lse = cupy.empty(q.shape[:3], dtype=np.float32)
            return self.lse_plan.run(q, k, v, th, tw, lse=lse), rel_h, rel_w, lse
        q_size, k_size = self.sizes
        out = rel_pos_attention(q, k, v, stored[0], stored[1], q_size, k_size, scale=self.scale,
                                backend="cupy", resize_dtype=self.resize_dtype)
        return out, rel_h, rel_w, backward.forward_stats(q, k, v, rel_h, rel_w, k_size, self.scale)


# The _GpuVjp of each call signature (functional._call_key), as the call plans
# of rel_pos_attention are kept.
_gpu_vjps = BoundedCache(64)


def _core_backward_gpu(q, k, v, rel_h, rel_w, k_size, scale, out, dout, stats):
    """The attention core's pullback on the GPU: ``(dq, dk, dv, d_rel_h,
    d_rel_w)`` in the compute dtype, ``dq`` without the terms' part, the
    terms' gradients (B, H, Sq, k_h) and (B, H, Sq, k_w) or None: the
    fused kernels for the inputs they take, else CuPy operations over
    chunks of query rows (:func:`relattn.backends.gpu.backward.core_gradients`)."""
    from relattn.backends.gpu import backward

    return backward.core_gradients(q, k, v, rel_h, rel_w, k_size, scale, out, dout, stats)


def _pullback_gpu(q, k, v, th, tw, stored, q_size, k_size, scale, resize_dtype, out, rel_h, rel_w, stats, kernels):
    """The pullback on the GPU: the core's gradients from
    :func:`_core_backward_gpu`, then the tables': with ``kernels`` (float32
    terms, 16-bit or float32 q) by the terms' pullback kernels
    (:func:`relattn.backends.gpu.backward.terms_dq`: dq's terms part, and
    :func:`~relattn.backends.gpu.backward.tables_pullback`:
    the gathered tables' gradients and the gather's adjoint), else as for
    the fused CPU backward (:func:`_terms_pullback`, in CuPy); then the
    resize's adjoint where a table was resized."""
    from relattn.backends.gpu import backward
    from relattn.backends.gpu.cublas import contiguous

    use_rel = th is not None
    if use_rel:
        term_work = compute_dtype(q.dtype, th.dtype, tw.dtype)
        Rh, Rw = _gathered_tables(th, tw, q_size, k_size, term_work)

    def pullback(dout):
        dout = _check_dout(dout, out)
        with q.device:
            # the terms' kernels and the fused core read q contiguous: one copy for both
            qc = contiguous(q) if kernels else q
            dq3, dk3, dv3, dh3, dw3 = _core_backward_gpu(qc, k, v, rel_h, rel_w, k_size, scale,
                                                         out, dout, stats)
            dk, dv = astype(dk3, k.dtype), astype(dv3, v.dtype)
            if not use_rel:
                return astype(dq3, q.dtype), dk, dv, None, None
            if kernels:
                dq = backward.terms_dq(q, dq3, dh3, dw3, Rh, Rw, q_size, k_size)
                del dq3   # the tables' pullback runs without the core's float32 dq
                g_h, g_w = backward.tables_pullback(qc, dh3, dw3, q_size, k_size)
                d_h, d_w = (_resized_adjoint(g, t, resize_dtype) for g, t in zip((g_h, g_w), stored))
            else:
                dq, d_h, d_w = _terms_pullback(q, dq3, dh3, dw3, Rh, Rw, stored, q_size, k_size,
                                               resize_dtype, term_work)
        return dq, dk, dv, d_h, d_w

    return pullback


def _check_backend(backend, xp):
    """``backend`` checked for arrays of the library ``xp``: BackendError when
    the backward there cannot take them."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
    backends.get(backend)   # ValueError naming the known backends
    if xp is np and backend == "cupy":
        why = backends.get("cupy").unavailable_reason()
        raise BackendError(
            "backend: the backward is not available on backend 'cupy' for numpy arrays: the GPU "
            "backward takes CuPy arrays (and returns the gradients on their device); pass CuPy "
            "arrays, or use backend='numba' or 'numpy' on the host"
            + ("" if why is None else f" (backend 'cupy' cannot run here: {why})"))
    if xp is not np and backend in ("numpy", "numba"):
        raise BackendError(
            f"backend: {backend!r} runs the backward on the host, and these are {xp.__name__} arrays; "
            f"use backend='cupy' (or 'auto') for the GPU backward, or copy the arrays to the host first")


def rel_pos_attention_vjp(
    q, k, v, rel_pos_h=None, rel_pos_w=None, q_size=None, k_size=None, *, scale=None, backend="auto",
    resize_dtype="float32",
):
    """:func:`rel_pos_attention` and its pullback (vector-Jacobian product).

    Three implementations. The reference (``backend="numpy"``): exact, in
    numpy, written as the formulas (module docstring of
    :mod:`relattn.autodiff`); its forward is the numpy backend's, so ``out`` is
    bit for bit ``rel_pos_attention(..., backend="numpy")``; it keeps the
    log-sum-exp of each logit row (as 2 x B x heads x Sq values) and its
    pullback materializes each (batch, head)'s S_q x S_k weights one head at a
    time. The fused CPU one (``backend="numba"``, and ``"auto"`` on numpy
    arrays where numba runs): the numba backend's forward (``out`` is bit for
    bit ``rel_pos_attention(..., backend="numba")``) and flash-style kernels
    (``relattn.backends._numba_backward``) that recompute the logits tile by
    tile and never hold an S_q x S_k buffer. The GPU one (``backend="cupy"``,
    and ``"auto"``, on CuPy arrays): the cupy backend's forward (``out`` is
    bit for bit ``rel_pos_attention(..., backend="cupy")``), keeping each
    logit row's log-sum-exp where the forward kernel gives it (float16 /
    bfloat16 on Hopper's ``relattn_ws``) or computing it on the device, and a
    pullback by fused kernels (float16 / bfloat16 on the tensor cores,
    float32 on the SIMT cores; ``relattn.backends.gpu.backward``) or, for the
    rest (float64), CuPy operations over chunks of query rows (at most two
    buffers of ``CHUNK_BYTES`` for the logits' blocks); never S_q x S_k. The
    gradients are CuPy arrays on the inputs' device. The fused and GPU ones
    keep the rel_h / rel_w terms whole for the pullback.

    Parameters
    ----------
    q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, resize_dtype
        As for :func:`rel_pos_attention`, validated the same way; numpy or
        CuPy arrays (or DLPack tensors, taken as one or the other).
    backend : {"auto", "numpy", "numba", "cupy"}
        ``"auto"``: on numpy arrays the fused numba kernels where numba can
        run (O(tile) memory; faster than the reference at SAM's windows),
        else the reference; on CuPy arrays the GPU backward.
        ``"numpy"``: the reference (it holds one head's Sq x Sk weights);
        ``"numba"``: the fused kernels (:class:`BackendError` when numba
        cannot run); both take numpy arrays only. ``"cupy"``: the GPU
        backward, CuPy arrays only.

    Returns
    -------
    out : numpy.ndarray or cupy.ndarray, shape (B, heads, Sq, d)
        The attention, as :func:`rel_pos_attention` with the backend that ran.
    pullback : callable
        ``pullback(dout) -> (dq, dk, dv, d_rel_pos_h, d_rel_pos_w)`` for a
        cotangent ``dout`` of out's array type, shape and dtype (for CuPy,
        on out's device; ``ValueError`` / ``TypeError`` naming ``dout``
        otherwise). ``dq``, ``dk``, ``dv`` have the shapes and dtypes of
        ``q``, ``k``, ``v``; the table gradients those of the stored tables
        (through the resize when a table was resized), or None without
        tables; all of the inputs' array type. float64 inputs are
        differentiated in float64; half-precision ones in float32, rounded
        once at the end. The pullback may be called any number of times.

    Raises
    ------
    BackendError
        For CuPy arrays with ``backend="numpy"`` or ``"numba"``, numpy
        arrays with ``backend="cupy"``, ``backend="numba"`` where numba
        cannot run, or CuPy inputs the cupy backend cannot take.

    Examples
    --------
    >>> import numpy as np, relattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 6, 4)) for _ in range(3))
    >>> table_h, table_w = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    >>> out, pullback = relattn.rel_pos_attention_vjp(q, k, v, table_h, table_w, q_size=(2, 3))
    >>> dq, dk, dv, d_h, d_w = pullback(np.ones_like(out))
    >>> dq.shape, d_h.shape, d_w.dtype
    ((1, 2, 6, 4), (3, 4), dtype('float64'))
    """
    key = None
    if type(q) is not np.ndarray:   # CuPy arrays of a signature seen before: its plan
        key = _call_key(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, backend, resize_dtype)
        vjp = None if key is None else _gpu_vjps.get(key)
        if vjp is not None:
            return vjp(q, k, v, rel_pos_h, rel_pos_w)
    q, k, v, rel_pos_h, rel_pos_w, scale, q_size, k_size = _prepare(
        q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, resize_dtype)
    xp = array_module(q)
    if backend != "auto":
        _check_backend(backend, xp)
    if xp is not np:
        vjp = _GpuVjp(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, resize_dtype)
        if key is not None:
            vjp = _gpu_vjps.keep(key, vjp)
        return vjp(q, k, v, rel_pos_h, rel_pos_w)
    stored = (rel_pos_h, rel_pos_w)
    prep = resize_ahead(resize_dtype, rel_pos_h, rel_pos_w, q_size, k_size)
    if backend == "numba" and not _numba_available():
        raise BackendError(f"backend: 'numba' cannot run: {backends.get('numba').unavailable_reason()}")
    fused = backend == "numba" or (backend == "auto" and _numba_available())
    th, tw = stored if prep is None else prep(*stored)
    if fused:
        try:
            out, problem = _forward_numba(q, k, v, th, tw, q_size, k_size, scale)
        except backends.BackendFailure as exc:
            if backend == "numba":
                raise BackendError(f"backend: 'numba' cannot run: {exc}") from None
            fused = False      # "auto": the numba kernels fail here; the reference backward
    if fused:
        pullback = _pullback_numba(q, k, v, th, tw, stored, q_size, k_size, resize_dtype, out, problem)
        return out, pullback
    out, stats = _forward(q, k, v, th, tw, q_size, k_size, scale)
    pullback = _pullback(q, k, v, th, tw, stored, q_size, k_size, scale, resize_dtype, out, stats)
    return out, pullback
