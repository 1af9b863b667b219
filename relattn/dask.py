"""Dask helpers: the same kernels over arrays chunked along batch (and heads).

Each chunk is an ordinary numpy or CuPy array, so every chunk runs through the
backend ``auto`` picks for it (numba on CPU chunks, the CUDA kernel on CuPy
chunks). Scheduling is Dask's: the local threaded scheduler, or a
``dask.distributed`` cluster, with no change to this code::

    from dask.distributed import Client
    client = Client("tcp://scheduler:8786")           # or Client() for a local cluster
    x = da.from_zarr("features.zarr").rechunk({0: 4})   # (B, H, W, C), 4 images a chunk
    y = relattn.dask.attention(layer, x)                # lazy
    y.to_zarr("out.zarr")                               # runs on the cluster
"""

from __future__ import annotations

import math

from relattn._arrays import dtype_name
from relattn.functional import rel_pos_attention as _rel_pos_attention

__all__ = ["rel_pos_attention", "attention"]


def _da():
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("relattn.dask needs the dask package (pip install relattn[dask])") from None
    return da


def rel_pos_attention(q, k, v, rel_pos_h=None, rel_pos_w=None, q_size=None, k_size=None, *, scale=None,
                      backend="auto"):
    """:func:`relattn.rel_pos_attention` over Dask arrays, blockwise.

    Parameters
    ----------
    q, k, v : dask.array.Array, shapes (B, heads, Sq, d) and (B, heads, Sk, d)
        May be chunked along batch and heads; the token and channel axes are
        made whole (rechunked) since every query needs every key.
    rel_pos_h, rel_pos_w : array, optional
        Small tables, numpy or CuPy (matching the chunks), sent to every task.
    q_size, k_size, scale, backend
        As for :func:`relattn.rel_pos_attention`.

    Returns
    -------
    dask.array.Array, shape (B, heads, Sq, d)
        Lazy; chunked like ``q`` along batch and heads.

    Raises
    ------
    TypeError
        Naming ``q``, ``k`` or ``v`` when it is not a dask array, or ``k`` or
        ``v`` when its dtype differs from ``q``'s.
    ValueError
        Naming ``k`` or ``v`` (or ``q``) when it is not 4-D, when ``k``'s batch,
        heads or head_dim differ from ``q``'s, when ``v``'s shape differs from
        ``k``'s, or when a chunk size it needs is unknown (NaN: call
        ``compute_chunk_sizes()`` first). Checked when the graph is built; the
        other arguments are checked as each block runs.

    Examples
    --------
    >>> import numpy as np, dask.array as da, relattn.dask
    >>> q = da.from_array(np.ones((4, 2, 6, 8), np.float32), chunks=(1, 2, 6, 8))
    >>> relattn.dask.rel_pos_attention(q, q, q).compute().shape
    (4, 2, 6, 8)
    """
    da = _da()
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, da.Array):
            raise TypeError(f"{name}: expected a dask array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name}: expected a 4-D (B, heads, S, d) array, got shape {x.shape}")
    _check_qkv(q, k, v)
    batch_chunks, head_chunks = q.chunks[0], q.chunks[1]
    q = q.rechunk({2: -1, 3: -1})
    k, v = (x.rechunk({0: batch_chunks, 1: head_chunks, 2: -1, 3: -1}) for x in (k, v))

    def block(qb, kb, vb):
        return _rel_pos_attention(qb, kb, vb, rel_pos_h, rel_pos_w, q_size, k_size, scale=scale, backend=backend)

    return da.map_blocks(block, q, k, v, dtype=q.dtype, chunks=q.chunks, meta=q._meta)


def attention(layer, x, window_size=None):
    """Run an :class:`relattn.Attention` layer over a Dask array of feature maps.

    Parameters
    ----------
    layer : relattn.Attention
    x : dask.array.Array, shape (B, H, W, dim)
        Chunked along batch (images); ``H``, ``W`` and ``dim`` are made whole.
    window_size : int, optional
        As for :meth:`relattn.Attention.forward`.

    Returns
    -------
    dask.array.Array, shape (B, H, W, dim)

    Raises
    ------
    TypeError
        ``layer`` is not an :class:`relattn.Attention` or ``x`` is not a dask
        array (naming it).
    ValueError
        Naming ``x`` when it is not 4-D, when its last axis differs from
        ``layer.dim``, or when its ``H``, ``W`` or ``dim`` chunk sizes are
        unknown (NaN). Other problems are reported as the blocks run.

    Examples
    --------
    >>> import numpy as np, dask.array as da, relattn, relattn.dask
    >>> layer = relattn.Attention(32, 4, use_rel_pos=True, input_size=(6, 6), rng=0)
    >>> x = da.from_array(np.ones((3, 6, 6, 32), np.float32), chunks=(1, 6, 6, 32))
    >>> relattn.dask.attention(layer, x).compute().shape
    (3, 6, 6, 32)
    """
    da = _da()
    from relattn.module import Attention

    if not isinstance(layer, Attention):
        raise TypeError(f"layer: expected a relattn.Attention, got {type(layer).__name__}")
    if not isinstance(x, da.Array):
        raise TypeError(f"x: expected a dask array, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x: expected a 4-D (B, H, W, dim) array, got shape {x.shape}")
    _check_known("x", x, (1, 2, 3), "H, W and dim")
    if x.shape[3] != layer.dim:
        raise ValueError(f"x: expected shape (B, H, W, {layer.dim}) for the layer's dim, got {_shape(x)}")
    x = x.rechunk({1: -1, 2: -1, 3: -1})
    return x.map_blocks(lambda block: layer(block, window_size=window_size), dtype=x.dtype, meta=x._meta)


def _shape(x) -> tuple:
    return tuple(n if math.isnan(n) else int(n) for n in x.shape)


def _unknown(sizes) -> bool:
    return any(math.isnan(n) for n in sizes)


def _check_known(name, x, axes, what):
    """``x``'s chunk sizes along ``axes`` must be known (they are made whole)."""
    if any(_unknown(x.chunks[a]) for a in axes):
        raise ValueError(f"{name}: expected known chunk sizes along {what} (call {name}.compute_chunk_sizes() "
                         f"first), got shape {_shape(x)}")


def _check_qkv(q, k, v):
    """Shapes, dtypes and chunks of q, k, v agree where the blocks need them to."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_known(name, x, (2, 3), "the token and channel axes")
    for axis, what in ((0, "batch"), (1, "heads")):
        # k and v are rechunked to q's chunks along batch and heads: unknown (NaN)
        # sizes can be neither compared nor rechunked, so they must already match.
        for name, x in (("k", k), ("v", v)):
            if (_unknown(q.chunks[axis]) or _unknown(x.chunks[axis])) and x.chunks[axis] != q.chunks[axis]:
                raise ValueError(f"{name}: expected the {what} chunks of q, {q.chunks[axis]}, as some sizes "
                                 f"are unknown (call compute_chunk_sizes() first), got {x.chunks[axis]}")
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if not _unknown(qs[:2] + ks[:2]) and ks[:2] != qs[:2]:
        raise ValueError(f"k: expected batch and heads (B, heads) = {qs[:2]} as in q, got shape {ks}")
    if ks[3] != qs[3]:
        raise ValueError(f"k: expected head_dim {qs[3]} as in q, got shape {ks}")
    if vs[2:] != ks[2:] or (not _unknown(ks[:2] + vs[:2]) and vs[:2] != ks[:2]):
        raise ValueError(f"v: expected the shape of k, {ks}, got {vs}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected q's dtype {dtype_name(q.dtype)}, got {dtype_name(x.dtype)}")
