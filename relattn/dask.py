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

from relattn.functional import rel_pos_attention as _rel_pos_attention

__all__ = ["rel_pos_attention", "attention"]


def _da():
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("relattn.dask needs dask (pip install 'dask[array]')") from None
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

    Examples
    --------
    >>> import numpy as np, dask.array as da, relattn, relattn.dask
    >>> layer = relattn.Attention(32, 4, use_rel_pos=True, input_size=(6, 6), rng=0)
    >>> x = da.from_array(np.ones((3, 6, 6, 32), np.float32), chunks=(1, 6, 6, 32))
    >>> relattn.dask.attention(layer, x).compute().shape
    (3, 6, 6, 32)
    """
    da = _da()
    if not isinstance(x, da.Array):
        raise TypeError(f"x: expected a dask array, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x: expected a 4-D (B, H, W, dim) array, got shape {x.shape}")
    x = x.rechunk({1: -1, 2: -1, 3: -1})
    return x.map_blocks(lambda block: layer(block, window_size=window_size), dtype=x.dtype, meta=x._meta)
