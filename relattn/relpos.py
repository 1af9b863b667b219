"""Relative-position tables: resize, gather, and the decomposed rel_h / rel_w terms.

This is the one place the index and interpolation maths of
``spec/REFERENCE.md`` is written; every backend uses it.
"""

from __future__ import annotations

import functools

import numpy as np

from relattn._interop import accepts_dlpack
from relattn._arrays import (
    astype,
    array_module,
    check_alloc,
    check_float_array,
    check_positive_int,
    check_size2,
    compute_dtype,
    describe,
)

__all__ = ["resize_rel_pos", "get_rel_pos", "decomposed_rel_pos"]


RESIZE_DTYPES = ("float32", "table")


def _check_resize_dtype(resize_dtype):
    """``resize_dtype`` checked: ``"float32"`` or ``"table"``."""
    if isinstance(resize_dtype, str) and resize_dtype in RESIZE_DTYPES:
        return str(resize_dtype)
    raise ValueError(f"resize_dtype: expected 'float32' or 'table', got {describe(resize_dtype)}")


def _resize_arithmetic(dtype, resize_dtype: str) -> str:
    """The arithmetic a resize of a ``dtype`` table runs in: ``"float64"`` for
    float64 tables in ``"table"`` mode, else ``"float32"``."""
    return "float64" if resize_dtype == "table" and dtype == np.float64 else "float32"


@accepts_dlpack("rel_pos")
def resize_rel_pos(rel_pos, length, *, resize_dtype="float32"):
    """Linearly resize a relative-position table along its first axis.

    Reproduces ``torch.nn.functional.interpolate(rel_pos.T[None], size=length,
    mode="linear", align_corners=False)`` as SAM's ``get_rel_pos`` calls it,
    bit for bit with PyTorch's x86-64 CPU build (the two fused multiply-adds
    it compiles to included). Endpoints are not preserved (that is PyTorch's
    behaviour too).

    Parameters
    ----------
    rel_pos : array, shape (L, C)
        The stored table (numpy or CuPy; float16, bfloat16, float32 or float64).
    length : int
        Number of rows wanted, ``>= 1``.
    resize_dtype : {"float32", "table"}
        The arithmetic of the resize.

        ``"float32"`` (default): float32 arithmetic for every table, the
        result cast back to the table's dtype. Bit-identical to PyTorch's
        float32 interpolate of ``rel_pos`` cast to float32, which is what
        SAM, timm and HF compute for their float32 checkpoints and what
        DeepSeek-OCR's encoder computes for any table (it casts to float32
        first).

        ``"table"``: float64 tables are resized in float64, bit-identical to
        PyTorch's float64 interpolate (what SAM's, timm's and HF's code
        compute for a float64 table, as PyTorch interpolates in the
        tensor's dtype). It differs from ``"float32"`` by the float32
        rounding of the source positions and values: up to about 1e-5 of
        the table's largest magnitude for a random table, less for a smooth
        one. float32, float16 and bfloat16 tables are resized as in
        ``"float32"``. (PyTorch's own float16 / bfloat16 CPU interpolate
        rounds its weights to the half type, so it can differ from both
        modes by one unit in the last place of the half-precision result.)

    Returns
    -------
    array, shape (length, C)
        Same array type and dtype as ``rel_pos``. When ``length == L`` a copy of
        the input is returned (bit-identical).

    Raises
    ------
    ValueError
        For a ``resize_dtype`` other than ``"float32"`` or ``"table"`` (naming it).

    Examples
    --------
    >>> import numpy as np, relattn
    >>> table = np.arange(6, dtype=np.float32).reshape(3, 2)
    >>> [round(float(r), 4) for r in relattn.resize_rel_pos(table, 5)[:, 0]]
    [0.0, 0.8, 2.0, 3.2, 4.0]
    """
    resize_dtype = _check_resize_dtype(resize_dtype)
    rel_pos = check_float_array("rel_pos", rel_pos, ndim=2)
    length = check_positive_int("length", length)
    in_rows = rel_pos.shape[0]
    if in_rows < 1:
        raise ValueError(f"rel_pos: expected at least one row, got shape {tuple(rel_pos.shape)}")
    if length == in_rows:
        return rel_pos.copy()
    check_alloc("length", (length, rel_pos.shape[1]), 8, "the resized table")
    xp = array_module(rel_pos)
    arithmetic = _resize_arithmetic(rel_pos.dtype, resize_dtype)
    table = astype(rel_pos, np.dtype(arithmetic))
    tag = "resize" if arithmetic == "float32" else "resize64"
    i0, i1, lambda0, lambda1 = (_on_device(xp, (tag, in_rows, length, n), a)
                                for n, a in enumerate(_resize_plan(in_rows, length, arithmetic)))
    if xp is not np:  # one fused kernel on the GPU, same arithmetic
        return astype(_resize_gpu(xp, table, i0, i1, lambda0, lambda1, length), rel_pos.dtype)
    if arithmetic == "float64":  # out = fma(x[i0], lambda0, x[i1] * lambda1) in float64
        return _fma64(table[i0], lambda0, table[i1] * lambda1)
    # out = fma(x[i0], lambda0, x[i1] * lambda1): one rounding to float32, emulated
    # by an exact float64 product.
    upper = table[i1] * lambda1
    out = (table[i0].astype(np.float64) * lambda0 + upper).astype(np.float32)
    return astype(out, rel_pos.dtype)


_resize_kernel: dict = {}

# The CuPy kernels of the resize, by the arithmetic of the table they take.
# Every operation is explicitly rounded, so no contraction changes a bit.
_RESIZE_SOURCES = {
    # float32: fma(x[i0], w0, x[i1] * w1) with the fma emulated by an exact
    # float64 product and one rounding to float32, as on the host.
    "float32": (
        "raw float32 x, raw int64 i0, raw int64 i1, raw float64 w0, raw float32 w1, int64 C",
        "float32 out",
        """
        const long long r = i / C, c = i - r * C;
        const float upper = __fmul_rn(x[i1[r] * C + c], w1[r]);
        out = __double2float_rn(__dadd_rn(__dmul_rn((double)x[i0[r] * C + c], w0[r]), (double)upper));
        """,
        "relattn_resize_rel_pos",
    ),
    # float64 ("table" mode): the same two roundings, with a real float64 fma.
    "float64": (
        "raw float64 x, raw int64 i0, raw int64 i1, raw float64 w0, raw float64 w1, int64 C",
        "float64 out",
        """
        const long long r = i / C, c = i - r * C;
        const double upper = __dmul_rn(x[i1[r] * C + c], w1[r]);
        out = __fma_rn(x[i0[r] * C + c], w0[r], upper);
        """,
        "relattn_resize_rel_pos_f64",
    ),
}


def _resize_gpu(cupy, table, i0, i1, lambda0, lambda1, length):
    """The resize above as one CuPy elementwise kernel: a float64 ``table``
    with the float64 plan (``"table"`` mode), else a float32 ``table`` with
    the float32 plan; the result has the table's dtype."""
    arithmetic = "float64" if table.dtype == cupy.float64 else "float32"
    kernel = _resize_kernel.get(arithmetic)
    if kernel is None:
        kernel = _resize_kernel.setdefault(arithmetic, cupy.ElementwiseKernel(*_RESIZE_SOURCES[arithmetic]))
    table = cupy.ascontiguousarray(table)
    channels = table.shape[1]
    out = cupy.empty((length, channels), dtype=table.dtype)
    if out.size:
        kernel(table, i0, i1, lambda0, lambda1, channels, out)
    return out


_SPLIT = 134217729.0   # 2**27 + 1: Veltkamp's split of a float64 into two halves


def _fma64(a, b, c):
    """``fma(a, b, c)`` in float64, correctly rounded (one rounding), elementwise.

    numpy has no fma: the exact product comes from Dekker's two-product, the
    exact sum from two-sums, and the final rounding from Boldo and
    Melquiond's round-to-odd emulation of the fma. Exact while the operands
    stay clear of overflow and underflow; the rare elements that do not
    (magnitudes beyond 2**400 or below 2**-400) are computed exactly with
    fractions, and non-finite ones as ``a * b + c`` (which has the fma's
    IEEE result there).
    """
    a, b, c = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                  np.asarray(c, np.float64))
    with np.errstate(over="ignore", invalid="ignore"):
        p = a * b
        t = _SPLIT * a
        ah = t - (t - a)
        al = a - ah
        t = _SPLIT * b
        bh = t - (t - b)
        bl = b - bh
        e = ((ah * bh - p) + ah * bl + al * bh) + al * bl    # a * b == p + e exactly
        th = c + p
        z = th - c
        tl = (c - (th - z)) + (p - z)                       # c + p == th + tl exactly
        s = tl + e
        z = s - tl
        err = (tl - (s - z)) + (e - z)                      # tl + e == s + err exactly
        # s rounded to odd instead of to nearest: then th + s rounds once
        even = (s.view(np.int64) & 1) == 0
        s = np.where((err != 0) & even, np.nextafter(s, np.copysign(np.inf, err)), s)
        out = np.where(s == 0, th, th + s)                  # th itself keeps a zero's sign
        safe = np.ones(out.shape, dtype=bool)
        for x in (a, b):
            mag = np.abs(x)
            safe &= (x == 0) | ((mag >= 2.0 ** -400) & (mag <= 2.0 ** 400))
        safe &= np.abs(c) <= 2.0 ** 400
    if safe.all():
        return out
    from fractions import Fraction

    out = np.array(out, copy=True)
    for idx in zip(*np.nonzero(~safe)):
        x, y, w = float(a[idx]), float(b[idx]), float(c[idx])
        if not (np.isfinite(x) and np.isfinite(y) and np.isfinite(w)):
            out[idx] = x * y + w
            continue
        exact = Fraction(x) * Fraction(y) + Fraction(w)
        if exact == 0:   # IEEE: -0 only for (-0) + (-0)
            out[idx] = -0.0 if (x == 0 or y == 0) and np.signbit(x) != np.signbit(y) and np.signbit(w) else 0.0
            continue
        try:
            out[idx] = float(exact)   # correctly rounded
        except OverflowError:
            out[idx] = np.inf if exact > 0 else -np.inf
    return out


@functools.lru_cache(maxsize=256)
def _resize_plan(in_rows: int, length: int, arithmetic: str = "float32"):
    """Source rows and weights of PyTorch's linear resize from ``in_rows`` to
    ``length``, as PyTorch computes them for a table of dtype ``arithmetic``
    (``"float32"``, or ``"float64"`` for the ``"table"`` mode of float64 tables)."""
    if arithmetic == "float64":
        return _resize_plan64(in_rows, length)
    # PyTorch: scale = float(L) / M in float32, src = fma(scale, i + 0.5, -0.5); a
    # float32 fma is emulated by an exact float64 product and one rounding.
    scale = np.float32(in_rows) / np.float32(length)
    dst = np.arange(length, dtype=np.float64) + 0.5
    src = np.maximum((np.float64(scale) * dst - 0.5).astype(np.float32), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_rows - 1)
    i1 = np.where(i0 < in_rows - 1, i0 + 1, i0)
    lambda1 = (src - i0.astype(np.float32))[:, None]
    lambda0 = (np.float32(1.0) - lambda1).astype(np.float64)
    plan = (i0, i1, lambda0, lambda1)
    for a in plan:
        a.flags.writeable = False
    return plan


def _resize_plan64(in_rows: int, length: int):
    """:func:`_resize_plan` for a float64 table, as PyTorch's CPU kernel
    computes it in double: ``scale = double(L) / M``, ``src = fma(scale, i +
    0.5, -0.5)`` clamped at 0, ``i0 = min(floorf(src), L - 1)`` (``floorf``:
    the double is rounded to float before the floor, so a source index a few
    ulp below an integer takes that integer as ``i0``), ``lambda1 =
    clamp(src - i0, 0, 1)``, ``lambda0 = 1 - lambda1``; all four float64."""
    scale = np.float64(in_rows) / np.float64(length)
    src = np.maximum(_fma64(scale, np.arange(length, dtype=np.float64) + 0.5, -0.5), 0.0)
    i0 = np.minimum(np.floor(src.astype(np.float32)).astype(np.int64), in_rows - 1)
    i1 = np.where(i0 < in_rows - 1, i0 + 1, i0)
    lambda1 = np.clip(src - i0, 0.0, 1.0)[:, None]
    lambda0 = 1.0 - lambda1
    plan = (i0, i1, lambda0, lambda1)
    for a in plan:
        a.flags.writeable = False
    return plan


_device_cache: dict = {}


def _on_device(xp, key, host_array):
    """``host_array`` on ``xp``'s current device, copied once per (key, device)."""
    if xp is np:
        return host_array
    key = (*key, xp.cuda.Device().id)
    found = _device_cache.get(key)
    if found is None:
        found = _device_cache.setdefault(key, xp.asarray(host_array))
    return found



def _device_index(xp, q_size: int, k_size: int):
    """The index table on ``xp``'s current device: a synchronous host-to-device
    copy on every call would stall the stream, so it is made once."""
    return _on_device(xp, ("index", q_size, k_size), _relative_index(q_size, k_size))


def _device_index32(xp, q_size: int, k_size: int):
    """int32 copy of the index table on ``xp``'s current device (for kernels)."""
    return _on_device(xp, ("index32", q_size, k_size), _relative_index(q_size, k_size).astype(np.int32))


@functools.lru_cache(maxsize=256)
def _relative_index(q_size: int, k_size: int):
    """Row of the (2*max-1)-row table for each (query, key) coordinate pair."""
    index = _relative_index_rows(q_size, k_size, np.arange(q_size))
    index.flags.writeable = False  # shared by every call through the cache
    return index


def _relative_index_rows(q_size: int, k_size: int, q_coords):
    """The rows ``q_coords`` of the index table: shape (len(q_coords), k_size).

    float32 coordinates and truncation toward zero, as SAM computes them with
    PyTorch's default dtype; for ``q_size == k_size`` this is ``q - k + k_size - 1``.
    """
    q_ratio = np.float32(max(k_size / q_size, 1.0))
    k_ratio = np.float32(max(q_size / k_size, 1.0))
    q_coords = np.asarray(q_coords).astype(np.float32)[:, None] * q_ratio
    k_coords = np.arange(k_size, dtype=np.float32)[None, :] * k_ratio
    offset = np.float32((k_size - 1) * max(q_size / k_size, 1.0))
    return ((q_coords - k_coords) + offset).astype(np.int64)


@accepts_dlpack("rel_pos")
def get_rel_pos(q_size, k_size, rel_pos, *, resize_dtype="float32"):
    """Relative-position embeddings for every (query, key) coordinate pair.

    SAM's ``get_rel_pos``: the table is linearly resized (see
    :func:`resize_rel_pos`) only when its row count differs from
    ``2 * max(q_size, k_size) - 1``; when ``q_size != k_size`` the shorter side's
    coordinates are stretched (MViTv2 pooled attention).

    Parameters
    ----------
    q_size, k_size : int
        Query and key extent along one axis (``>= 1``).
    rel_pos : array, shape (L, C)
        Relative-position table (numpy or CuPy, floating point).
    resize_dtype : {"float32", "table"}
        Arithmetic of the resize, as for :func:`resize_rel_pos`: ``"float32"``
        (default; PyTorch's float32 interpolate, as DeepSeek-OCR and float32
        SAM checkpoints compute it) or ``"table"`` (float64 tables resized in
        float64, as SAM's code computes it for a float64 table).

    Returns
    -------
    array, shape (q_size, k_size, C)
        Same array type and dtype as ``rel_pos``.

    Examples
    --------
    >>> import numpy as np, relattn
    >>> table = np.arange(5, dtype=np.float32)[:, None]        # 2*3-1 rows
    >>> relattn.get_rel_pos(3, 3, table)[..., 0]
    array([[2., 1., 0.],
           [3., 2., 1.],
           [4., 3., 2.]], dtype=float32)
    """
    resize_dtype = _check_resize_dtype(resize_dtype)
    q_size = check_positive_int("q_size", q_size)
    k_size = check_positive_int("k_size", k_size)
    rel_pos = check_float_array("rel_pos", rel_pos, ndim=2)
    rows = 2 * max(q_size, k_size) - 1
    check_alloc("q_size, k_size", (rows, rel_pos.shape[1]), 8, "the resized table")
    check_alloc("q_size, k_size", (q_size, k_size, rel_pos.shape[1]), 8, "the gathered embeddings")
    return _gathered(q_size, k_size, rel_pos, resize_dtype)


def _gathered(q_size: int, k_size: int, rel_pos, resize_dtype="float32"):
    """:func:`get_rel_pos` for checked arguments: resize when the row count
    is not ``2 * max - 1``, then gather."""
    rows = 2 * max(q_size, k_size) - 1
    table = rel_pos if rel_pos.shape[0] == rows else resize_rel_pos(rel_pos, rows, resize_dtype=resize_dtype)
    xp = array_module(table)
    index = _device_index(xp, q_size, k_size)
    if xp is not np and table.dtype.itemsize == 2:  # gather half-precision rows as raw bits
        return table.view(xp.uint16)[index].view(table.dtype)
    return table[index]


def _check_table(name: str, table, head_dim: int):
    table = check_float_array(name, table, ndim=2)
    if table.shape[1] != head_dim:
        raise ValueError(
            f"{name}: expected shape (L, {head_dim}) to match q's head_dim {head_dim}, "
            f"got {tuple(table.shape)}"
        )
    if table.shape[0] < 1:
        raise ValueError(f"{name}: expected at least one row, got shape {tuple(table.shape)}")
    return table


@accepts_dlpack("q")
def decomposed_rel_pos(q, rel_pos_h, rel_pos_w, q_size, k_size, *, resize_dtype="float32"):
    """The decomposed relative-position terms ``rel_h`` and ``rel_w``.

    ``rel_h[..., i, ky] = q_i . Rh[y, ky]`` and ``rel_w[..., i, kx] = q_i . Rw[x, kx]``
    for query ``i = y * q_w + x``, where ``Rh = get_rel_pos(q_h, k_h, rel_pos_h)``
    and ``Rw = get_rel_pos(q_w, k_w, rel_pos_w)``. ``q`` is used UNSCALED, as in
    SAM. The attention bias is ``rel_h[..., i, ky] + rel_w[..., i, kx]`` for key
    ``j = ky * k_w + kx``; it is never formed here.

    Parameters
    ----------
    q : array, shape (..., q_h * q_w, C)
        Queries (numpy or CuPy; float16, bfloat16, float32 or float64).
    rel_pos_h : array, shape (L_h, C)
        Height table; resized when ``L_h != 2 * max(q_h, k_h) - 1``.
    rel_pos_w : array, shape (L_w, C)
        Width table; resized when ``L_w != 2 * max(q_w, k_w) - 1``.
    q_size, k_size : (int, int)
        Query grid ``(q_h, q_w)`` and key grid ``(k_h, k_w)``.
    resize_dtype : {"float32", "table"}
        Arithmetic of the table resize, as for :func:`resize_rel_pos`
        (``"table"`` resizes float64 tables in float64).

    Returns
    -------
    rel_h : array, shape (..., q_h * q_w, k_h)
    rel_w : array, shape (..., q_h * q_w, k_w)
        Computed and returned in float64 if any input is float64, otherwise in
        float32 (half-precision inputs are widened, never rounded midway).

    Examples
    --------
    >>> import numpy as np, relattn
    >>> q = np.ones((2, 6, 4), np.float32)                    # (batch*heads, 2*3, C)
    >>> table_h, table_w = np.ones((3, 4), np.float32), np.ones((5, 4), np.float32)
    >>> rel_h, rel_w = relattn.decomposed_rel_pos(q, table_h, table_w, (2, 3), (2, 3))
    >>> rel_h.shape, rel_w.shape, float(rel_h[0, 0, 0])
    ((2, 6, 2), (2, 6, 3), 4.0)
    """
    resize_dtype = _check_resize_dtype(resize_dtype)
    q = check_float_array("q", q, min_ndim=2)
    q_h, q_w = check_size2("q_size", q_size)
    k_h, k_w = check_size2("k_size", k_size)
    head_dim = q.shape[-1]
    if q.shape[-2] != q_h * q_w:
        raise ValueError(
            f"q_size: expected q_h * q_w == q.shape[-2] = {q.shape[-2]}, "
            f"got q_size=({q_h}, {q_w}) with product {q_h * q_w}"
        )
    rel_pos_h = _check_table("rel_pos_h", rel_pos_h, head_dim)
    rel_pos_w = _check_table("rel_pos_w", rel_pos_w, head_dim)
    work = compute_dtype(q.dtype, rel_pos_h.dtype, rel_pos_w.dtype)
    for side, (qs, ks) in enumerate(((q_h, k_h), (q_w, k_w))):
        check_alloc("k_size", (2 * max(qs, ks) - 1, head_dim), 8, "the resized table")
        check_alloc("k_size", (qs, ks, head_dim), 8, "the gathered embeddings")
    check_alloc("k_size", (*q.shape[:-1], k_h + k_w), work.itemsize, "rel_h and rel_w")
    return terms(q, rel_pos_h, rel_pos_w, (q_h, q_w), (k_h, k_w), resize_dtype)


def terms(q, rel_pos_h, rel_pos_w, q_size, k_size, resize_dtype="float32"):
    """:func:`decomposed_rel_pos` without the argument checks: for a caller
    that validated these arguments (a plan, on every call after its first)."""
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    head_dim = q.shape[-1]
    work = compute_dtype(q.dtype, rel_pos_h.dtype, rel_pos_w.dtype)
    table_h = astype(_gathered(q_h, k_h, rel_pos_h, resize_dtype), work)   # (q_h, k_h, C)
    table_w = astype(_gathered(q_w, k_w, rel_pos_w, resize_dtype), work)   # (q_w, k_w, C)
    xp = array_module(q)
    lead = q.shape[:-2]
    grid_q = astype(q, work).reshape(*lead, q_h, q_w, head_dim)
    # Batched over the query row y: (..., q_h, q_w, C) @ (q_h, C, k_h).
    rel_h = xp.matmul(grid_q, xp.swapaxes(table_h, -1, -2))
    # Batched over the query column x: (..., q_w, q_h, C) @ (q_w, C, k_w).
    rel_w = xp.swapaxes(xp.matmul(xp.swapaxes(grid_q, -3, -2), xp.swapaxes(table_w, -1, -2)), -3, -2)
    return rel_h.reshape(*lead, q_h * q_w, k_h), rel_w.reshape(*lead, q_h * q_w, k_w)



def terms_bytes(lead: int, q_size, k_size, head_dim: int, itemsize: int) -> int:
    """Bytes :func:`decomposed_rel_pos` needs for ``lead`` (batch x heads)
    query grids: the terms and the two gathered tables."""
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    return itemsize * (lead * q_h * q_w * (k_h + k_w) + (q_h * k_h + q_w * k_w) * head_dim)


def decomposed_rel_pos_rows(q, rel_pos_h, rel_pos_w, q_size, k_size, start: int, resize_dtype="float32"):
    """:func:`decomposed_rel_pos` for the query rows ``start .. start + n`` only.

    ``q`` (..., n, C) holds those rows of the flattened ``q_size`` grid. Only
    their rows of the index tables are gathered, so the memory is
    ``n * (k_h + k_w)`` per leading index plus ``n * (k_h + k_w) * C`` for the
    gathered embeddings, whatever the grid's sides (a 1 x 16384 grid gathers
    16384 x 16384 rows in full). The terms agree with the whole-grid ones to
    rounding (the products run in another order). Arguments are validated by
    the caller: tables of q's width, ``start + n <= q_h * q_w``.
    """
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    work = compute_dtype(q.dtype, rel_pos_h.dtype, rel_pos_w.dtype)
    rows = np.arange(start, start + q.shape[-2])
    terms = []
    for table, qs, ks, coords in ((rel_pos_h, q_h, k_h, rows // q_w), (rel_pos_w, q_w, k_w, rows % q_w)):
        wanted = 2 * max(qs, ks) - 1
        table = table if table.shape[0] == wanted else resize_rel_pos(table, wanted, resize_dtype=resize_dtype)
        gathered = astype(table, work)[_relative_index_rows(qs, ks, coords)]   # (n, ks, C)
        # (..., n, 1, C) @ (n, C, ks) -> (..., n, 1, ks)
        terms.append(np.matmul(astype(q, work)[..., None, :], np.swapaxes(gathered, -1, -2))[..., 0, :])
    return terms[0], terms[1]


def resize_ahead(resize_dtype, rel_pos_h, rel_pos_w, q_size, k_size):
    """``prep(th, tw) -> (th, tw)`` that resizes ahead, to SAM's row counts,
    the tables whose resize ``resize_dtype`` changes (``"table"`` mode:
    float64 tables, resized in float64), so that a backend, which resizes in
    the default arithmetic, finds them sized; None when there is none. Valid
    for tables of the dtypes and shapes of these (a plan's signature)."""
    if resize_dtype != "table" or rel_pos_h is None:
        return None
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    rows = (2 * max(q_h, k_h) - 1, 2 * max(q_w, k_w) - 1)
    todo = tuple(n if t.dtype == np.float64 and t.shape[0] != n else None
                 for n, t in zip(rows, (rel_pos_h, rel_pos_w)))
    if todo == (None, None):
        return None
    rows_h, rows_w = todo

    def prep(th, tw):
        if rows_h is not None:
            th = resize_rel_pos(th, rows_h, resize_dtype="table")
        if rows_w is not None:
            tw = resize_rel_pos(tw, rows_w, resize_dtype="table")
        return th, tw

    return prep
