"""The reference path in any array-API-standard namespace.

``relattn.rel_pos_attention`` converts foreign tensors to numpy/CuPy through
DLPack and runs the fastest backend. This module instead runs the reference
formula *inside* the caller's namespace (``array_api_strict``, PyTorch via
``array_api_compat``, JAX, ...), with no conversion of q, k, v: useful for
checking an array library, or where DLPack is not available. The small
relative-position tables are gathered (and resized) on the host with the same
code as everywhere else, so the index maths stays written once.
"""

from __future__ import annotations

import numpy as np

from relattn.backends.reference import softmax_attention
from relattn.relpos import get_rel_pos

__all__ = ["rel_pos_attention"]


def _namespace(*arrays):
    try:
        from array_api_compat import array_namespace
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("relattn.array_api needs array-api-compat (pip install array-api-compat)") from None
    return array_namespace(*[a for a in arrays if a is not None])


def _check(xp, name, x, ndim):
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name}: expected a real floating dtype, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {tuple(x.shape)} ({x.ndim}-D)")


def _host_table(name, table):
    try:
        return np.from_dlpack(table)
    except Exception:  # noqa: BLE001 - producers without DLPack
        return np.asarray(table)


def rel_pos_attention(q, k, v, rel_pos_h=None, rel_pos_w=None, q_size=None, k_size=None, *, scale=None):
    """Reference attention with the decomposed bias, computed in ``q``'s namespace.

    Same arguments and semantics as :func:`relattn.rel_pos_attention` (without
    ``backend``). Computes in float32 or float64 as the inputs are (half
    precision is widened to float32 when the namespace has it) and returns an
    array of ``q``'s namespace and dtype.

    Examples
    --------
    >>> import numpy as np, relattn.array_api
    >>> q = np.ones((1, 1, 4, 8), np.float32)
    >>> relattn.array_api.rel_pos_attention(q, q, q).shape
    (1, 1, 4, 8)
    """
    xp = _namespace(q, k, v, rel_pos_h, rel_pos_w)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check(xp, name, x, 4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    if tuple(k.shape[:2]) != (batch, heads) or k.shape[3] != head_dim or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k, v: expected shape ({batch}, {heads}, Sk, {head_dim}), got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    work = xp.float64 if q.dtype == xp.float64 else xp.float32
    q_w, k_w_, v_w = (xp.reshape(xp.astype(a, work), (batch * heads, a.shape[2], head_dim)) for a in (q, k, v))
    rel_h = rel_w = None
    if rel_pos_h is not None or rel_pos_w is not None:
        from relattn.functional import _prepare_sizes

        q_size, k_size = _prepare_sizes(q_size, k_size, q_len, k_len)
        host_dtype = np.float64 if work == xp.float64 else np.float32
        table_h = get_rel_pos(q_size[0], k_size[0], _host_table("rel_pos_h", rel_pos_h)).astype(host_dtype)
        table_w = get_rel_pos(q_size[1], k_size[1], _host_table("rel_pos_w", rel_pos_w)).astype(host_dtype)
        if table_h.shape[-1] != head_dim or table_w.shape[-1] != head_dim:
            raise ValueError(f"rel_pos_h, rel_pos_w: expected {head_dim} columns to match q's head_dim, "
                             f"got {table_h.shape[-1]} and {table_w.shape[-1]}")
        table_h, table_w = xp.asarray(table_h), xp.asarray(table_w)
        grid_q = xp.reshape(q_w, (batch * heads, q_size[0], q_size[1], head_dim))
        # rel_h[n, y, x, ky] = sum_c q[n, y, x, c] * Rh[y, ky, c]: batched over y.
        rel_h = xp.matmul(grid_q, xp.matrix_transpose(table_h))
        rel_w = xp.matmul(xp.permute_dims(grid_q, (0, 2, 1, 3)), xp.matrix_transpose(table_w))
        rel_w = xp.permute_dims(rel_w, (0, 2, 1, 3))
        rel_h = xp.reshape(rel_h, (batch * heads, q_len, k_size[0]))
        rel_w = xp.reshape(rel_w, (batch * heads, q_len, k_size[1]))
    out = softmax_attention(xp, q_w, k_w_, v_w, rel_h, rel_w, k_size, scale)
    return xp.astype(xp.reshape(out, (batch, heads, q_len, head_dim)), q.dtype)
