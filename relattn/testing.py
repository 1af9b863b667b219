"""Property-based testing kit for implementations of this attention.

For people who write their own kernel for SAM-style attention with 2-D
decomposed relative positions (Triton, CUDA, JAX, another port) and want to
test it the way relattn tests its own backends:

* :func:`problems` -- a hypothesis strategy of valid problems (grids, query
  grids that differ from the key grid, tables that need resizing, windows,
  masked keys, every dtype), each a :class:`Problem`;
* :func:`reference` -- the float64 result of the formulas of the reference
  semantics, computed with plain numpy, independently of relattn's backends;
* :func:`assert_matches_reference` -- dtype-aware tolerances, the same NaN and
  infinity pattern, and a failure message that names the worst element and
  says what the error looks like: which term is missing, whether the grid axes
  are swapped, whether the scale is wrong, or whether the error follows the key
  rows (the height term) or the key columns (the width term) of the bias.

Any function with the signature of :func:`relattn.rel_pos_attention`,
``fn(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale=...)``, can be
tested; its result may be a numpy, CuPy, torch or JAX array. hypothesis is
needed for :func:`problems` only (``pip install relattn[testing]``).

Examples
--------
>>> import relattn
>>> from relattn.testing import Problem, assert_matches_reference
>>> problem = Problem.random(q_size=(3, 4), head_dim=8, seed=0)
>>> assert_matches_reference(problem.call(relattn.rel_pos_attention, backend="numpy"), problem)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Sequence

import numpy as np

from relattn._arrays import BFLOAT16, dtype_name, resolve_dtype
from relattn.relpos import resize_rel_pos

__all__ = ["Problem", "problems", "reference", "assert_matches_reference", "TOLERANCES"]

#: Default ``(rtol, atol)`` per dtype of the problem: an element passes when
#: ``|out - reference| <= rtol * max|reference| + atol`` (finite entries).
#: Half-precision entries allow for one rounding of the result and a few
#: float32 roundings inside; float32 for float32 arithmetic over head_dim
#: products and a softmax.
TOLERANCES = {
    "float64": (1e-10, 1e-12),
    "float32": (1e-5, 1e-6),
    "float16": (1e-2, 1e-3),
    "bfloat16": (2e-2, 2e-3),
}

# A logit error confined to one key axis explains the output error when the
# part it leaves unexplained is at most this fraction; above the second
# threshold the axis is ruled out.
_EXPLAINED = 0.1
_RULED_OUT = 0.3


# --------------------------------------------------------------------- problems


def _size2(name, value):
    try:
        size = tuple(int(s) for s in value)
    except TypeError:
        raise TypeError(f"{name}: expected a pair of ints (h, w), got {value!r}") from None
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name}: expected a pair of positive ints (h, w), got {value!r}")
    return size


def _frozen_copy(name, array, dtype=None):
    array = np.array(array, dtype=dtype, copy=True)
    if dtype is None and dtype_name(array.dtype) not in TOLERANCES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {array.dtype}")
    array.flags.writeable = False
    return array


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Problem:
    """One attention problem: the inputs of ``rel_pos_attention`` as numpy arrays.

    Drawn by :func:`problems`, made by :meth:`Problem.random`, or built by hand
    from arrays (they are copied and made read-only). Meant for test sizes:
    :func:`reference` holds the ``Sq x Sk`` attention weights in float64.

    Parameters
    ----------
    q : numpy.ndarray, shape (B, heads, Sq, d)
    k, v : numpy.ndarray, shape (B, heads, Sk, d)
        One dtype among float16, bfloat16 (ml_dtypes), float32 and float64.
    rel_pos_h, rel_pos_w : numpy.ndarray, shape (L_h, d) and (L_w, d), or None
        The tables, cast to q's dtype; both ``None`` for plain attention. A table
        whose row count is not ``2 * max(q, k) - 1`` along its axis is resized
        by the function under test.
    q_size, k_size : (int, int)
        Query grid ``(q_h, q_w)`` and key grid ``(k_h, k_w)``; tokens are
        row-major, query ``i = y * q_w + x``.
    scale : float or None
        The logit scale passed to the function under test; ``None`` passes
        none, so its default (which must be ``d ** -0.5``) is tested.
    masked_keys : sequence of int
        Keys ``j`` whose channel 0 is ``-inf`` in ``k`` (every query's channel 0
        is positive, so they get zero weight). Informational.
    seed : int or None
        The seed of :meth:`Problem.random`; ``None`` for hand-built problems.
    table_scale : float
        The table magnitude :meth:`Problem.random` used (informational).

    Attributes
    ----------
    dtype : str
        ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``.
    batch, heads, head_dim : int
    effective_scale : float
        ``scale``, or ``head_dim ** -0.5`` when it is ``None``.
    needs_resize : (bool, bool)
        Whether ``rel_pos_h`` / ``rel_pos_w`` must be resized.
    description : str
        A one-line human summary (``repr`` shows a call that rebuilds a drawn
        problem, or the shapes of a hand-built one; never the arrays).

    Examples
    --------
    >>> import numpy as np
    >>> from relattn.testing import Problem
    >>> p = Problem.random(q_size=(4, 6), k_size=(2, 3), heads=2, head_dim=16,
    ...                    table_rows=(5, 11), seed=1)
    >>> p.q.shape, p.k.shape, p.rel_pos_h.shape, p.dtype
    ((1, 2, 24, 16), (1, 2, 6, 16), (5, 16), 'float32')
    >>> print(p.description)
    float32, batch 1, 2 heads, head_dim 16, q grid 4x6, k grid 2x3, rel_pos_h 5 rows (resized to 7), rel_pos_w 11 rows, scale d**-0.5
    >>> p
    Problem.random(q_size=(4, 6), k_size=(2, 3), batch=1, heads=2, head_dim=16, dtype='float32', table_rows=(5, 11), scale=None, masked_keys=(), table_scale=1.0, seed=1)
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    rel_pos_h: np.ndarray | None
    rel_pos_w: np.ndarray | None
    q_size: tuple
    k_size: tuple
    scale: float | None = None
    masked_keys: Sequence[int] = ()
    seed: int | None = None
    table_scale: float = 1.0
    _cache: dict = dataclasses.field(default_factory=dict, init=False, compare=False)

    def __post_init__(self):
        put = object.__setattr__
        q = _frozen_copy("q", self.q)
        put(self, "q", q)
        put(self, "k", _frozen_copy("k", self.k))
        put(self, "v", _frozen_copy("v", self.v))
        if q.ndim != 4:
            raise ValueError(f"q: expected shape (B, heads, Sq, d), got {q.shape}")
        batch, heads, q_len, head_dim = q.shape
        for name in ("k", "v"):
            a = getattr(self, name)
            if a.dtype != q.dtype:
                raise TypeError(f"{name}: expected q's dtype {dtype_name(q.dtype)}, got {dtype_name(a.dtype)}")
            if a.ndim != 4 or a.shape[:2] != (batch, heads) or a.shape[3] != head_dim or a.shape != self.k.shape:
                raise ValueError(f"{name}: expected shape ({batch}, {heads}, Sk, {head_dim}), got {a.shape}")
        q_size, k_size = _size2("q_size", self.q_size), _size2("k_size", self.k_size)
        if q_size[0] * q_size[1] != q_len or k_size[0] * k_size[1] != self.k.shape[2]:
            raise ValueError(f"q_size, k_size: expected products Sq={q_len} and Sk={self.k.shape[2]}, "
                             f"got {q_size} and {k_size}")
        put(self, "q_size", q_size)
        put(self, "k_size", k_size)
        if (self.rel_pos_h is None) != (self.rel_pos_w is None):
            raise ValueError("rel_pos_h, rel_pos_w: expected both tables or neither")
        for name in ("rel_pos_h", "rel_pos_w"):
            table = getattr(self, name)
            if table is None:
                continue
            table = _frozen_copy(name, table, q.dtype)
            if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] != head_dim:
                raise ValueError(f"{name}: expected shape (L, {head_dim}) with L >= 1, got {table.shape}")
            put(self, name, table)
        if self.scale is not None:
            put(self, "scale", float(self.scale))
        if not isinstance(self.masked_keys, range):
            put(self, "masked_keys", tuple(int(j) for j in self.masked_keys))

    # -------------------------------------------------------------- making one

    @classmethod
    def random(cls, q_size, k_size=None, *, batch=1, heads=1, head_dim=8, dtype="float32",
               table_rows=None, tables=True, scale=None, masked_keys=(), table_scale=1.0,
               seed=0) -> "Problem":
        """A problem with random normal inputs, reproducible from its arguments.

        Parameters
        ----------
        q_size : (int, int)
            Query grid.
        k_size : (int, int), optional
            Key grid; defaults to ``q_size``.
        batch, heads, head_dim : int
            ``batch`` may be 0 (empty inputs).
        dtype : str or numpy dtype
            ``"float16"``, ``"bfloat16"`` (needs ml_dtypes), ``"float32"`` or ``"float64"``.
        table_rows : (int, int), optional
            Rows of ``rel_pos_h`` and ``rel_pos_w``; default
            ``2 * max(q, k) - 1`` per axis (no resize).
        tables : bool
            ``False`` gives plain attention (both tables ``None``).
        scale : float, optional
            Explicit logit scale; default ``None`` (the function's default).
        masked_keys : sequence of int
            Keys masked with ``-inf`` in channel 0 of ``k``; every query's
            channel 0 is then made positive (``|q| + 0.5``). At least one key
            must stay unmasked.
        table_scale : float
            Tables are normal with standard deviation ``table_scale / sqrt(d)``,
            so each bias term ``q_i . R`` is of order ``table_scale``.
        seed : int
            Seed of ``numpy.random.default_rng``.

        Returns
        -------
        Problem
            Arrays in ``dtype`` (values drawn in float64, then rounded).

        Examples
        --------
        >>> from relattn.testing import Problem
        >>> p = Problem.random((14, 14), heads=2, head_dim=16, dtype="float16", masked_keys=range(0, 196, 7))
        >>> p.q.dtype, p.rel_pos_w.shape, len(p.masked_keys)
        (dtype('float16'), (27, 16), 28)
        """
        q_size = _size2("q_size", q_size)
        k_size = q_size if k_size is None else _size2("k_size", k_size)
        dt = resolve_dtype("dtype", dtype)
        for name, value, low in (("batch", batch, 0), ("heads", heads, 1), ("head_dim", head_dim, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        rng = np.random.default_rng(seed)
        q_len, k_len = q_size[0] * q_size[1], k_size[0] * k_size[1]
        q = rng.standard_normal((batch, heads, q_len, head_dim))
        k = rng.standard_normal((batch, heads, k_len, head_dim))
        v = rng.standard_normal((batch, heads, k_len, head_dim))
        if table_rows is None:
            table_rows = tuple(2 * max(a, b) - 1 for a, b in zip(q_size, k_size))
        table_rows = _size2("table_rows", table_rows)
        rel_pos_h = rng.standard_normal((table_rows[0], head_dim)) * (table_scale / math.sqrt(head_dim))
        rel_pos_w = rng.standard_normal((table_rows[1], head_dim)) * (table_scale / math.sqrt(head_dim))
        masked = masked_keys if isinstance(masked_keys, range) else tuple(int(j) for j in masked_keys)
        if len(masked):
            index = np.asarray(list(masked), dtype=np.int64)
            if index.min() < 0 or index.max() >= k_len:
                raise ValueError(f"masked_keys: expected key indices in 0..{k_len - 1}, got {masked!r}")
            if len(np.unique(index)) >= k_len:
                raise ValueError(f"masked_keys: expected at least one of the {k_len} keys unmasked, got {masked!r}")
            q[..., 0] = np.abs(q[..., 0]) + 0.5
            k[..., index, 0] = -np.inf
        problem = cls(q.astype(dt), k.astype(dt), v.astype(dt),
                      rel_pos_h.astype(dt) if tables else None,
                      rel_pos_w.astype(dt) if tables else None,
                      q_size, k_size, scale=scale, masked_keys=masked, seed=seed,
                      table_scale=float(table_scale))
        return problem

    # ------------------------------------------------------------ reading one

    @property
    def dtype(self) -> str:
        return dtype_name(self.q.dtype)

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def effective_scale(self) -> float:
        return self.head_dim ** -0.5 if self.scale is None else self.scale

    @property
    def needs_resize(self) -> tuple:
        """``(height, width)``: whether each table's row count differs from ``2 * max(q, k) - 1``."""
        if self.rel_pos_h is None:
            return (False, False)
        return tuple(t.shape[0] != 2 * max(a, b) - 1
                     for t, a, b in zip((self.rel_pos_h, self.rel_pos_w), self.q_size, self.k_size))

    @property
    def description(self) -> str:
        (q_h, q_w), (k_h, k_w) = self.q_size, self.k_size
        grids = (f"grid {q_h}x{q_w}" if self.q_size == self.k_size
                 else f"q grid {q_h}x{q_w}, k grid {k_h}x{k_w}")
        parts = [self.dtype, f"batch {self.batch}", f"{self.heads} head{'s' * (self.heads != 1)}",
                 f"head_dim {self.head_dim}", grids]
        if self.rel_pos_h is None:
            parts.append("no tables")
        else:
            for name, table, a, b in (("rel_pos_h", self.rel_pos_h, q_h, k_h),
                                      ("rel_pos_w", self.rel_pos_w, q_w, k_w)):
                wanted = 2 * max(a, b) - 1
                rows = table.shape[0]
                parts.append(f"{name} {rows} row{'s' * (rows != 1)}"
                             + (f" (resized to {wanted})" if rows != wanted else ""))
        parts.append("scale d**-0.5" if self.scale is None else f"scale {self.scale:.6g}")
        if len(self.masked_keys):
            parts.append(f"{len(self.masked_keys)} of {k_h * k_w} keys masked")
        return ", ".join(parts)

    def __repr__(self) -> str:
        if self.seed is None:
            shapes = ", ".join(f"{n}={None if a is None else a.shape}" for n, a in (
                ("q", self.q), ("k", self.k), ("v", self.v), ("rel_pos_h", self.rel_pos_h),
                ("rel_pos_w", self.rel_pos_w)))
            return (f"Problem({shapes}, q_size={self.q_size}, k_size={self.k_size}, "
                    f"scale={self.scale!r}, dtype={self.dtype!r})")
        rows = None if self.rel_pos_h is None else (self.rel_pos_h.shape[0], self.rel_pos_w.shape[0])
        tables = "" if rows is not None else ", tables=False"
        return (f"Problem.random(q_size={self.q_size}, k_size={self.k_size}, batch={self.batch}, "
                f"heads={self.heads}, head_dim={self.head_dim}, dtype={self.dtype!r}, "
                f"table_rows={rows}{tables}, scale={self.scale!r}, masked_keys={self.masked_keys!r}, "
                f"table_scale={self.table_scale!r}, seed={self.seed!r})")

    # ------------------------------------------------------------- using one

    def arrays(self, to=None) -> tuple:
        """``(q, k, v, rel_pos_h, rel_pos_w)``, fresh writable copies.

        Parameters
        ----------
        to : module or callable, optional
            Where the arrays go: a module with ``asarray`` (``cupy``,
            ``jax.numpy``, ``torch``) or any callable taking a numpy array
            (``torch.from_numpy``, ``cupy.asarray``). ``None`` keeps numpy.
            bfloat16 arrays are ml_dtypes arrays; a framework that cannot read
            them (torch) needs a callable that views the bits, e.g.
            ``lambda a: torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)``.
            Missing tables stay ``None``.

        Returns
        -------
        tuple of five arrays (the tables may be ``None``)

        Examples
        --------
        >>> from relattn.testing import Problem
        >>> q, k, v, rel_pos_h, rel_pos_w = Problem.random((2, 3)).arrays()
        >>> q.shape, q.flags.writeable
        ((1, 1, 6, 8), True)
        """
        convert = None
        if to is not None:
            convert = to.asarray if hasattr(to, "asarray") and not callable(to) else to
            if not callable(convert):
                raise TypeError(f"to: expected a module with asarray or a callable, got {type(to).__name__}")
        out = []
        for a in (self.q, self.k, self.v, self.rel_pos_h, self.rel_pos_w):
            if a is not None:
                a = a.copy()
                if convert is not None:
                    a = convert(a)
            out.append(a)
        return tuple(out)

    def call(self, fn: Callable, *, to=None, **kwargs) -> np.ndarray:
        """``fn(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale=scale, **kwargs)`` as numpy.

        Parameters
        ----------
        fn : callable
            Anything with the signature of :func:`relattn.rel_pos_attention`.
            ``scale=`` is passed only when the problem has an explicit scale.
        to : module or callable, optional
            Converts the input arrays first (see :meth:`arrays`).
        **kwargs
            Passed on to ``fn`` (``backend="numba"``, a block size, ...).

        Returns
        -------
        numpy.ndarray
            ``fn``'s result brought to numpy: numpy arrays as they are, CuPy
            arrays with ``.get()``, torch tensors (CPU or CUDA, bfloat16
            included) through DLPack (``numpy.from_dlpack``) after ``.cpu()``,
            other DLPack producers (JAX CPU arrays) with ``numpy.from_dlpack``,
            anything else with ``numpy.asarray``.

        Examples
        --------
        >>> import relattn
        >>> from relattn.testing import Problem
        >>> p = Problem.random((3, 3), scale=0.5)
        >>> p.call(relattn.rel_pos_attention, backend="numpy").shape
        (1, 1, 9, 8)
        """
        if self.scale is not None:
            kwargs.setdefault("scale", self.scale)
        return _as_numpy(fn(*self.arrays(to), self.q_size, self.k_size, **kwargs))


def _as_numpy(out):
    if isinstance(out, np.ndarray):
        return out
    framework = type(out).__module__.split(".")[0]
    if framework == "cupy":
        return out.get()
    if framework == "torch":
        out = out.detach().cpu()
        if str(out.dtype) == "torch.bfloat16" and BFLOAT16 is not None:
            import torch

            return np.from_dlpack(out.contiguous().view(torch.int16)).view(BFLOAT16)
        return np.from_dlpack(out)
    if hasattr(out, "__dlpack__"):
        try:
            return np.from_dlpack(out)
        except (TypeError, ValueError, RuntimeError, BufferError):  # a device or dtype numpy lacks
            pass
    return np.asarray(out)


def _available_dtypes():
    return ("float64", "float32", "float16") + (("bfloat16",) if BFLOAT16 is not None else ())


def _positive_ints(name, values):
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of positive ints, got {values!r}") from None
    if not values or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in values):
        raise ValueError(f"{name}: expected a non-empty sequence of positive ints, got {values!r}")
    return tuple(int(n) for n in values)


def problems(*, dtypes=None, min_batch=1, max_batch=2, max_heads=2, min_grid=1, max_grid=8,
             head_dims=(1, 8, 16, 17, 64, 80), q_grid_differs=True, resize_tables=True,
             tables=True, windows=False, window_sizes=(14,), masked=False, explicit_scale=True):
    """A hypothesis strategy of valid :class:`Problem` values.

    Every drawn problem is a valid input of :func:`relattn.rel_pos_attention`;
    the keyword arguments bound its sizes and choose what varies. hypothesis
    shrinks a failing problem towards small grids, one head and batch 1.

    Parameters
    ----------
    dtypes : sequence of str, optional
        Dtypes to draw from, among ``"float64"``, ``"float32"``, ``"float16"``
        and ``"bfloat16"`` (numpy arrays of ml_dtypes' bfloat16). Default: all
        four, bfloat16 only when ml_dtypes is installed.
    min_batch, max_batch : int
        Bounds of the batch size (``min_batch=0`` draws empty inputs too).
    max_heads : int
        Heads are drawn from 1 to ``max_heads``.
    min_grid, max_grid : int
        Bounds of each side of the query and key grids (windows excepted).
    head_dims : sequence of int
        head_dim is drawn from these (a kernel for head_dim 64 and 80 only
        passes ``(64, 80)``).
    q_grid_differs : bool
        Also draw key grids other than the query grid: independent sides, and
        pooled ones (each side divided by 2 to 4, rounded up, as MViTv2 pools
        keys). ``False``: the key grid is always the query grid.
    resize_tables : bool
        Also draw tables whose row count is not ``2 * max(q, k) - 1`` (from 1
        to twice that plus 4), which the function must resize linearly.
        ``False``: every table has the exact row count.
    tables : bool
        ``False`` draws plain attention (both tables ``None``).
    windows : bool
        Also draw window-like problems: the query and key grid a square
        ``ws x ws`` with ``ws`` from ``window_sizes`` whatever ``max_grid``,
        exact tables (SAM's windowed blocks never resize), as a windowed
        block's attention sees them.
    window_sizes : sequence of int
        Window sides for ``windows`` (SAM: 14).
    masked : bool
        Also draw problems with masked keys: ``-inf`` in channel 0 of some
        keys (a whole key row, a whole key column, a leading block or every
        n-th key), every query weighting channel 0 positively. At least one
        key always stays unmasked: a row with every key masked is NaN by the
        formula, a convention kernels differ on, so it is never drawn.
    explicit_scale : bool
        Also draw an explicit ``scale`` (``d ** -0.5`` times a factor in
        [0.25, 2]); otherwise ``scale`` is ``None`` and the function's default
        is tested.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of :class:`Problem`. Inputs are standard normal in float64 rounded
        to the dtype; each bias term ``q_i . R`` is of order 0.5 to 2.

    Examples
    --------
    >>> import relattn
    >>> from hypothesis import given, settings
    >>> from relattn.testing import problems, assert_matches_reference
    >>> @settings(max_examples=5, deadline=None)
    ... @given(problem=problems(dtypes=("float32",), max_grid=4, head_dims=(8,)))
    ... def test_numpy_backend(problem):
    ...     out = problem.call(relattn.rel_pos_attention, backend="numpy")
    ...     assert_matches_reference(out, problem)
    >>> test_numpy_backend()
    """
    try:
        from hypothesis import strategies as st
    except ImportError:
        raise ImportError("relattn.testing.problems needs the hypothesis package "
                          "(pip install relattn[testing])") from None

    names = _available_dtypes() if dtypes is None else tuple(dtypes)
    if not names:
        raise ValueError("dtypes: expected at least one dtype, got none")
    names = tuple(dtype_name(resolve_dtype("dtypes", d)) for d in names)
    for name, value, low in (("min_batch", min_batch, 0), ("max_batch", max_batch, min_batch),
                             ("max_heads", max_heads, 1), ("min_grid", min_grid, 1),
                             ("max_grid", max_grid, min_grid)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    head_dims = _positive_ints("head_dims", head_dims)
    window_sizes = _positive_ints("window_sizes", window_sizes)
    side = st.integers(min_grid, max_grid)

    @st.composite
    def draw_problem(draw):
        dtype = draw(st.sampled_from(names))
        batch = draw(st.integers(min_batch, max_batch))
        heads = draw(st.integers(1, max_heads))
        head_dim = draw(st.sampled_from(head_dims))
        window = windows and draw(st.booleans())
        if window:
            ws = draw(st.sampled_from(window_sizes))
            q_size = k_size = (ws, ws)
        else:
            q_size = (draw(side), draw(side))
            kind = draw(st.sampled_from(("same", "other", "pooled"))) if q_grid_differs else "same"
            if kind == "other":
                k_size = (draw(side), draw(side))
            elif kind == "pooled":
                k_size = tuple(max(min_grid, -(-s // draw(st.integers(2, 4)))) for s in q_size)
            else:
                k_size = q_size
        rows = []
        for a, b in zip(q_size, k_size):
            wanted = 2 * max(a, b) - 1
            if resize_tables and not window and draw(st.booleans()):
                other = draw(st.integers(1, 2 * wanted + 3))
                rows.append(other + (other >= wanted))   # any count but the exact one
            else:
                rows.append(wanted)
        scale = None
        if explicit_scale and draw(st.booleans()):
            scale = head_dim ** -0.5 * draw(st.floats(0.25, 2.0))
        masked_keys = ()
        k_h, k_w = k_size
        k_len = k_h * k_w
        if masked and k_len > 1 and draw(st.booleans()):
            pattern = draw(st.sampled_from(("key row", "key column", "leading", "strided")))
            if pattern == "key row" and k_h > 1:
                ky = draw(st.integers(0, k_h - 1))
                masked_keys = range(ky * k_w, (ky + 1) * k_w)
            elif pattern == "key column" and k_w > 1:
                masked_keys = range(draw(st.integers(0, k_w - 1)), k_len, k_w)
            elif pattern == "strided":
                masked_keys = range(draw(st.integers(0, k_len - 1)), k_len, draw(st.integers(2, 5)))
            else:
                masked_keys = range(0, draw(st.integers(1, k_len - 1)))
        return Problem.random(
            q_size, k_size, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype,
            table_rows=tuple(rows), tables=tables, scale=scale, masked_keys=masked_keys,
            table_scale=draw(st.sampled_from((1.0, 0.5, 2.0))),
            seed=draw(st.integers(0, 2**32 - 1)))

    return draw_problem()


# -------------------------------------------------------------------- reference


def _relative_index(q_len, k_len):
    """Table row for each (query, key) coordinate pair along one axis: float32
    coordinates and truncation toward zero, as SAM computes them."""
    q_ratio = np.float32(max(k_len / q_len, 1.0))
    k_ratio = np.float32(max(q_len / k_len, 1.0))
    q_coords = np.arange(q_len, dtype=np.float32)[:, None] * q_ratio
    k_coords = np.arange(k_len, dtype=np.float32)[None, :] * k_ratio
    offset = np.float32((k_len - 1) * max(q_len / k_len, 1.0))
    return ((q_coords - k_coords) + offset).astype(np.int64)


def _embeddings(q_len, k_len, table, negate_offsets=False):
    """``R[y, ky]`` (q_len, k_len, d) in float64. A table of another row count
    is resized in float32 and rounded back to its dtype, as the reference does."""
    rows = 2 * max(q_len, k_len) - 1
    if table.shape[0] != rows:
        table = resize_rel_pos(table, rows)
    index = _relative_index(q_len, k_len)
    if negate_offsets:
        index = rows - 1 - index
    return np.asarray(table, dtype=np.float64)[index]


def _attention64(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, *, height=True,
                 width=True, rel_scale=1.0, negate_offsets=False, weights=False):
    """``softmax_j(scale q_i.k_j + q_i.Rh[y, ky] + q_i.Rw[x, kx]) v`` in float64
    (and the weights when asked); keyword switches give the diagnosis variants."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    batch, heads, q_len, head_dim = q.shape
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    logits = scale * (q @ np.swapaxes(k, -1, -2))
    if rel_pos_h is not None and (height or width):
        grid = q.reshape(batch, heads, q_h, q_w, head_dim) * rel_scale
        bias = np.zeros((batch, heads, q_h, q_w, k_h, k_w))
        if height:
            rel_h = np.einsum("bhyxc,ykc->bhyxk", grid, _embeddings(q_h, k_h, rel_pos_h, negate_offsets))
            bias += rel_h[..., :, None]
        if width:
            rel_w = np.einsum("bhyxc,xkc->bhyxk", grid, _embeddings(q_w, k_w, rel_pos_w, negate_offsets))
            bias += rel_w[..., None, :]
        logits = logits + bias.reshape(batch, heads, q_len, k_h * k_w)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        # a row whose keys are all -inf is NaN, as the formula is
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out = p @ v
    return (out, p) if weights else out


def reference(problem: Problem) -> np.ndarray:
    """The float64 result of the reference formulas for ``problem``.

    ``out_i = sum_j softmax_j(scale * q_i.k_j + q_i.Rh[y, ky] + q_i.Rw[x, kx]) v_j``
    with query ``i = (y, x)`` and key ``j = (ky, kx)`` row-major on their grids,
    ``Rh``/``Rw`` gathered at row ``(y * max(k/q, 1) - ky * max(q/k, 1)) +
    (k - 1) * max(q/k, 1)`` (float32 coordinates, truncated), the relative
    terms from the unscaled ``q``. Everything is float64 numpy: half-precision
    inputs are their values widened to float64. Only a table that needs
    resizing goes through :func:`relattn.resize_rel_pos` (the specified
    float32 linear resize, rounded back to the table's dtype); the attention
    itself shares no code with relattn's backends.

    Parameters
    ----------
    problem : Problem

    Returns
    -------
    numpy.ndarray, float64, shape (B, heads, Sq, d)
        NaN in query rows whose keys are all masked (never drawn by :func:`problems`).

    Examples
    --------
    >>> import numpy as np
    >>> from relattn.testing import Problem, reference
    >>> p = Problem.random((2, 2), head_dim=4, dtype="float16", seed=3)
    >>> ref = reference(p)
    >>> ref.dtype, ref.shape
    (dtype('float64'), (1, 1, 4, 4))
    >>> bool(np.all(np.abs(ref) <= np.abs(p.v.astype(np.float64)).max()))   # weighted means of v
    True
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem: expected a relattn.testing.Problem, got {type(problem).__name__}")
    found = problem._cache.get("reference")
    if found is None:
        found = _attention64(problem.q, problem.k, problem.v, problem.rel_pos_h, problem.rel_pos_w,
                             problem.q_size, problem.k_size, problem.effective_scale, weights=True)
        for a in found:
            a.flags.writeable = False
        problem._cache["reference"] = found
    return found[0].copy()


# ------------------------------------------------------------------ comparison


def _tolerance(problem, rtol, atol):
    default_rtol, default_atol = TOLERANCES[problem.dtype]
    return (default_rtol if rtol is None else float(rtol)), (default_atol if atol is None else float(atol))


def _allowed(ref, rtol, atol):
    finite = np.isfinite(ref)
    top = float(np.max(np.abs(ref[finite]))) if finite.any() else 0.0
    return rtol * top + atol, top


def _finite_error(got, want):
    """max |got - want| over entries finite in both; inf if the NaN/inf patterns differ."""
    if not (np.array_equal(np.isnan(got), np.isnan(want))
            and np.array_equal(np.where(np.isinf(want), want, 0), np.where(np.isinf(got), got, 0))):
        return math.inf
    both = np.isfinite(got) & np.isfinite(want)
    return float(np.max(np.abs(got[both] - want[both]), initial=0.0))


def _variants(problem):
    """``(message, float64 output)`` for the classic mistakes, those that apply."""
    p = problem
    args = (p.q, p.k, p.v)
    s = p.effective_scale
    swapped = (p.q_size[::-1], p.k_size[::-1])
    out = []
    if p.rel_pos_h is not None:
        out += [
            ("the reference without rel_w: the width term q_i.Rw[x, kx] is missing",
             lambda: _attention64(*args, p.rel_pos_h, p.rel_pos_w, p.q_size, p.k_size, s, width=False)),
            ("the reference without rel_h: the height term q_i.Rh[y, ky] is missing",
             lambda: _attention64(*args, p.rel_pos_h, p.rel_pos_w, p.q_size, p.k_size, s, height=False)),
            ("the reference without rel_h and rel_w: no relative-position bias is added",
             lambda: _attention64(*args, None, None, p.q_size, p.k_size, s)),
            ("the reference with the grid axes swapped (q_size and k_size transposed, rel_pos_h and "
             "rel_pos_w exchanged): tokens are read column-major, but query i is (y, x) = "
             "(i // q_w, i % q_w)",
             lambda: _attention64(*args, p.rel_pos_w, p.rel_pos_h, *swapped, s)),
            ("the reference with q_size and k_size transposed, tables in place: (h, w) is read as (w, h)",
             lambda: _attention64(*args, p.rel_pos_h, p.rel_pos_w, *swapped, s)),
            ("the reference with rel_pos_h and rel_pos_w exchanged: the height table is used for "
             "the width term and the other way round",
             lambda: _attention64(*args, p.rel_pos_w, p.rel_pos_h, p.q_size, p.k_size, s)),
            ("the reference with the relative offsets negated (table row of ky - y instead of y - ky): "
             "the tables are read backwards",
             lambda: _attention64(*args, p.rel_pos_h, p.rel_pos_w, p.q_size, p.k_size, s,
                                  negate_offsets=True)),
            (f"the reference with rel_h and rel_w computed from the scaled q (scale * q_i, scale {s:.6g}): "
             "the relative-position terms must use the unscaled q",
             lambda: _attention64(*args, p.rel_pos_h, p.rel_pos_w, p.q_size, p.k_size, s, rel_scale=s)),
        ]
    out.append(("the reference with scale = 1: the q.k logits are not scaled",
                lambda: _attention64(*args, p.rel_pos_h, p.rel_pos_w, p.q_size, p.k_size, 1.0)))
    default = p.head_dim ** -0.5
    if p.scale is not None and p.scale != default:
        out.append((f"the reference with the default scale d**-0.5 = {default:.6g} instead of the given "
                     f"scale {p.scale:.6g}: the scale argument is ignored",
                     lambda: _attention64(*args, p.rel_pos_h, p.rel_pos_w, p.q_size, p.k_size, default)))
    return out


def _axis_fraction(got, ref, weights, v, k_size, failing, axis):
    """The part of the error (a fraction) that no logit error depending only on
    the query and the key row (``axis`` 0) or key column (1) can explain; None
    when head_dim is too small to tell.

    Such an error reweights whole key rows (columns): it moves ``out_i`` inside
    the affine hull of the per-row attention means ``m_r = sum_(j in r) p_ij v_j
    / sum_(j in r) p_ij`` of the reference weights. The fraction is the
    distance of ``out_i`` from that hull over the error's size.
    """
    batch, heads, q_len, head_dim = got.shape
    k_h, k_w = k_size
    groups = (k_h, k_w)[axis]
    if head_dim - (groups - 1) < 2:
        return None
    p = weights.reshape(batch, heads, q_len, k_h, k_w)
    values = v.reshape(batch, heads, k_h, k_w, head_dim)
    if axis == 1:
        p, values = np.swapaxes(p, -1, -2), np.swapaxes(values, 2, 3)
    unexplained = total = 0.0
    for b, h in zip(*np.nonzero(failing.any(axis=2))):
        rows = np.nonzero(failing[b, h])[0]
        pr = p[b, h, rows]                                          # (n, groups, members)
        mass = pr.sum(-1)                                           # (n, groups)
        sums = np.einsum("ngm,gmd->ngd", pr, values[b, h])
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums / mass[..., None]
        usable = mass > 0                                           # groups with weight
        first = np.argmax(usable, axis=1)
        anchor = means[np.arange(len(rows)), first]                 # (n, d)
        means = np.where(usable[..., None], means, anchor[:, None, :])
        target = got[b, h, rows] - anchor
        if groups > 1:
            span = means[:, 1:] - means[:, :1]                      # (n, groups-1, d)
            coef = np.einsum("nd,ndg->ng", target, np.linalg.pinv(span, rcond=1e-12))
            target = target - np.einsum("ng,ngd->nd", coef, span)
        unexplained += float(np.sum(target ** 2))
        total += float(np.sum((got[b, h, rows] - ref[b, h, rows]) ** 2))
    return math.sqrt(unexplained / total) if total > 0 else None


def _set_text(values, count, name):
    values = sorted(set(int(x) for x in values))
    if len(values) == count:
        return f"every {name} (0..{count - 1})"
    shown = ", ".join(str(x) for x in values[:10]) + (", ..." if len(values) > 10 else "")
    return f"{name} {shown} (of 0..{count - 1})"


def _shape_hint(got_shape, want_shape):
    batch, heads, q_len, head_dim = want_shape
    if tuple(got_shape) == (batch, q_len, heads, head_dim):
        return " (looks like (B, Sq, heads, d): the heads and tokens axes are exchanged)"
    if tuple(got_shape) == (batch, q_len, heads * head_dim):
        return " (looks like (B, Sq, heads * d): the heads are merged)"
    return ""


def assert_matches_reference(out, problem: Problem, *, rtol=None, atol=None, check_dtype=True) -> None:
    """Check ``out`` against :func:`reference` and explain a mismatch.

    Passes when ``out`` has the shape of ``q`` (and its dtype, with
    ``check_dtype``), NaN exactly where the reference is NaN, the same
    infinities with the same signs, and every finite entry within
    ``rtol * max|reference| + atol``.

    Parameters
    ----------
    out : array, shape (B, heads, Sq, d)
        The result to check: numpy, CuPy, torch or JAX (converted as
        :meth:`Problem.call` converts).
    problem : Problem
        The inputs ``out`` was computed from.
    rtol, atol : float, optional
        Default per the problem's dtype, from :data:`TOLERANCES`: float64
        1e-10 / 1e-12, float32 1e-5 / 1e-6, float16 1e-2 / 1e-3, bfloat16
        2e-2 / 2e-3.
    check_dtype : bool
        Require ``out.dtype`` to be the problem's dtype.

    Returns
    -------
    None

    Raises
    ------
    AssertionError
        With the problem, the worst element (batch, head, query ``i = (y,
        x)``, channel), its error and the tolerance, the query positions that
        fail, and a diagnosis: whether ``out`` matches a variant of the
        reference (without rel_w, without rel_h, grid axes swapped, tables
        exchanged, offsets negated, no scale, default scale instead of the
        given one, relative terms from the scaled q) and whether the error is
        explained by a logit error that varies only with the key row ``ky``
        (the height term) or only with the key column ``kx`` (the width term).

    Examples
    --------
    >>> import numpy as np, relattn
    >>> from relattn.testing import Problem, assert_matches_reference
    >>> p = Problem.random((3, 4), head_dim=16, seed=0)
    >>> def no_rel_w(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale=None):
    ...     return relattn.rel_pos_attention(q, k, v, rel_pos_h, 0 * rel_pos_w, q_size, k_size,
    ...                                      scale=scale, backend="numpy")
    >>> try:
    ...     assert_matches_reference(p.call(no_rel_w), p)
    ... except AssertionError as failure:
    ...     message = str(failure)
    >>> "out matches the reference without rel_w" in message
    True
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem: expected a relattn.testing.Problem, got {type(problem).__name__}")
    got_raw = _as_numpy(out)
    want_shape = problem.q.shape
    header = f"output does not match the float64 reference\n  problem: {problem.description}\n  {problem!r}"
    if got_raw.shape != want_shape:
        raise AssertionError(f"{header}\n  shape: got {got_raw.shape}, expected {want_shape} (B, heads, Sq, d)"
                             f"{_shape_hint(got_raw.shape, want_shape)}")
    if check_dtype and dtype_name(got_raw.dtype) != problem.dtype:
        raise AssertionError(f"{header}\n  dtype: got {dtype_name(got_raw.dtype)}, expected {problem.dtype} "
                             "(q's dtype; pass check_dtype=False to compare the values only)")
    got = np.asarray(got_raw, dtype=np.float64)
    reference(problem)
    ref, weights = problem._cache["reference"]
    rtol, atol = _tolerance(problem, rtol, atol)
    tol, top = _allowed(ref, rtol, atol)
    q_w = problem.q_size[1]

    def where(index):
        b, h, i, c = (int(x) for x in index)
        return f"batch {b}, head {h}, query {i} = (y={i // q_w}, x={i % q_w}), channel {c}"

    lines = []
    nan_diff = np.isnan(got) != np.isnan(ref)
    if nan_diff.any():
        first = np.argwhere(nan_diff)[0]
        lines.append(f"NaN pattern: {int(nan_diff.sum())} entries differ, first at {where(first)}: "
                     f"got {float(got[tuple(first)])}, expected {float(ref[tuple(first)])}")
    inf_diff = (np.isinf(ref) | np.isinf(got)) & ~(np.isnan(got) | np.isnan(ref)) & (got != ref)
    if inf_diff.any():
        first = np.argwhere(inf_diff)[0]
        lines.append(f"infinities: {int(inf_diff.sum())} entries differ, first at {where(first)}: "
                     f"got {float(got[tuple(first)])}, expected {float(ref[tuple(first)])}")
    both = np.isfinite(got) & np.isfinite(ref)
    error = np.where(both, np.abs(got - ref), 0.0)
    bad = error > tol
    if not lines and not bad.any():
        return
    if bad.any():
        worst = np.unravel_index(np.argmax(error), error.shape)
        lines.append(f"worst element: {where(worst)}: got {got[worst]:.6g}, expected {ref[worst]:.6g}, "
                     f"error {error[worst]:.3g} > tolerance {tol:.3g} "
                     f"(rtol {rtol:.3g} x max|ref| {top:.3g} + atol {atol:.3g})")
        failing = bad.any(axis=-1)                                  # (B, heads, Sq)
        positions = failing.any(axis=(0, 1)).reshape(problem.q_size)
        ys, xs = np.nonzero(positions)
        lines.append(f"failing: {int(bad.sum())} of {bad.size} elements; query positions "
                     f"{int(positions.sum())} of {positions.size}: {_set_text(ys, problem.q_size[0], 'row y')}, "
                     f"{_set_text(xs, q_w, 'column x')}")
    else:
        failing = np.zeros(ref.shape[:3], dtype=bool)
    lines.append("diagnosis:")
    matched = []
    for message, compute in _variants(problem):
        variant = compute()
        if _finite_error(variant, ref) <= _allowed(variant, rtol, atol)[0]:
            continue   # indistinguishable from the reference on this problem
        err = _finite_error(got, variant)
        if err <= _allowed(variant, rtol, atol)[0]:
            matched.append(f"out matches {message} (max error {err:.2g})")
    lines += [f"  {m}" for m in matched]
    if len(matched) > 1:
        lines.append("  these variants coincide on a problem this small; a larger, non-square grid tells them apart")
    if failing.any():
        v = np.asarray(problem.v, dtype=np.float64)
        fractions = [_axis_fraction(got, ref, weights, v, problem.k_size, failing, axis) for axis in (0, 1)]
        lines += [f"  {line}" for line in _axis_lines(fractions, problem, bool(matched))]
    elif not matched:
        lines.append("  the finite entries agree; only the NaN / infinity pattern differs")
    raise AssertionError(header + "\n  " + "\n  ".join(lines))


def _axis_lines(fractions, problem, matched):
    (k_h, k_w), d = problem.k_size, problem.head_dim
    row, column = fractions
    if row is None and column is None:
        return [f"head_dim {d} is too small to tell key rows from key columns "
                f"(needs head_dim >= k_h + 1 = {k_h + 1} or k_w + 1 = {k_w + 1})"]
    term = {0: ("key row ky", "height term q_i.Rh[y, ky] (rel_pos_h, its index or its resize)"),
            1: ("key column kx", "width term q_i.Rw[x, kx] (rel_pos_w, its index or its resize)")}
    explained = [a for a, f in enumerate(fractions) if f is not None and f <= _EXPLAINED]
    text = {a: ("under 0.1%" if f < 1e-3 else f"{f:.0%}") + " unexplained"
            for a, f in enumerate(fractions) if f is not None}
    if len(explained) == 1:
        a = explained[0]
        other = 1 - a
        lines = [f"the error follows the {term[a][0]}: a logit error that varies only with the query "
                 f"and the {term[a][0]} explains it ({text[a]}); look at the {term[a][1]}"]
        if fractions[other] is not None:
            lines.append(f"one that varies only with the {term[other][0]} does not ({text[other]})")
        return lines
    if len(explained) == 2:
        return [f"a logit error varying only with the key row ky ({text[0]}) and one varying only "
                f"with the key column kx ({text[1]}) both explain it: this problem cannot tell them apart"]
    known = [f"the {term[a][0]} ({text[a]})" for a in (0, 1) if a in text]
    ruled = not matched and all(f is None or f > _RULED_OUT for f in fractions)
    return [f"the error does not follow one key axis: a logit error varying only with "
            f"{' or only with '.join(known)} does not explain it"
            + ("; look at q.k, the scale, the softmax, p.v, or both relative terms at once" if ruled else "")]
