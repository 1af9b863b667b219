"""``rel_pos_attention``: validation, the rel_h / rel_w terms, and backend dispatch."""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

from relattn import backends
from relattn._cache import BoundedCache
from relattn._interop import accepts_dlpack
from relattn._arrays import (
    array_module,
    as_array,
    check_float_array,
    check_size2,
    dtype_name,
    same_array_type,
    to_module,
)
from relattn.relpos import _check_resize_dtype, _check_table, decomposed_rel_pos_rows, resize_ahead, terms_bytes
from relattn.relpos import terms as relpos_terms

__all__ = ["rel_pos_attention", "explain", "plan", "AttentionPlan", "BackendError"]


class BackendError(ValueError):
    """No backend (or not the requested one) can take these inputs."""


def _check_qkv(q, k, v):
    q = check_float_array("q", q, ndim=4)
    k = check_float_array("k", k, ndim=4)
    v = check_float_array("v", v, ndim=4)
    same_array_type({"q": q, "k": k, "v": v})
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            "q, k, v: expected one dtype, got "
            f"q={dtype_name(q.dtype)}, k={dtype_name(k.dtype)}, v={dtype_name(v.dtype)}"
        )
    batch, heads, _, head_dim = q.shape
    if k.shape[:2] != (batch, heads) or k.shape[3] != head_dim:
        raise ValueError(
            f"k: expected shape ({batch}, {heads}, Sk, {head_dim}) to match q {tuple(q.shape)}, "
            f"got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise ValueError(
            f"q, k: expected at least one query and one key, got Sq={q.shape[2]}, Sk={k.shape[2]}"
        )
    if head_dim < 1:
        raise ValueError(f"q: expected head_dim >= 1, got shape {tuple(q.shape)}")
    return q, k, v


def _check_scale(scale, head_dim):
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a real number or None, got {type(scale).__name__}")
    try:
        scale = float(scale)
    except (OverflowError, ValueError, TypeError):  # e.g. an int beyond the float range
        from relattn._arrays import describe

        raise ValueError(f"scale: expected a finite number within the float64 range, got {describe(scale)}") from None
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return scale


def _prepare_sizes(q_size, k_size, q_len, k_len):
    """Check the query/key grids against Sq/Sk; ``k_size`` defaults to ``q_size`` when Sk == Sq."""
    if q_size is None:
        raise ValueError("q_size: required with relative-position tables, got None")
    q_size = check_size2("q_size", q_size)
    if q_size[0] * q_size[1] != q_len:
        raise ValueError(
            f"q_size: expected q_h * q_w == Sq = {q_len}, got {q_size} with product {q_size[0] * q_size[1]}"
        )
    if k_size is None:
        if k_len != q_len:
            raise ValueError(f"k_size: required when Sk={k_len} differs from Sq={q_len}, got None")
        return q_size, q_size
    k_size = check_size2("k_size", k_size)
    if k_size[0] * k_size[1] != k_len:
        raise ValueError(
            f"k_size: expected k_h * k_w == Sk = {k_len}, got {k_size} with product {k_size[0] * k_size[1]}"
        )
    return q_size, k_size


def _prepare(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, resize_dtype="float32"):
    """Validate everything; return the arrays (tables converted and checked), scale and sizes."""
    _check_resize_dtype(resize_dtype)
    q, k, v = _check_qkv(q, k, v)
    scale = _check_scale(scale, q.shape[3])
    if q.dtype.itemsize < 8 and abs(scale) > 3.4028234663852886e38:  # computed in float32
        raise ValueError(f"scale: expected a value representable in float32 for {dtype_name(q.dtype)} inputs, got {scale}")
    if (rel_pos_h is None) != (rel_pos_w is None):
        missing = "rel_pos_w" if rel_pos_w is None else "rel_pos_h"
        raise ValueError(f"{missing}: expected both tables or neither, got only one")
    use_rel_pos = rel_pos_h is not None
    if q_size is not None or use_rel_pos:
        q_size, k_size = _prepare_sizes(q_size, k_size, q.shape[2], k.shape[2])
    if use_rel_pos:
        # DLPack tables (a CUDA torch tensor) become CuPy / numpy arrays first
        rel_pos_h, rel_pos_w = as_array("rel_pos_h", rel_pos_h), as_array("rel_pos_w", rel_pos_w)
        same_array_type({"q": q, "rel_pos_h": rel_pos_h, "rel_pos_w": rel_pos_w})
        rel_pos_h = _check_table("rel_pos_h", rel_pos_h, q.shape[-1])
        rel_pos_w = _check_table("rel_pos_w", rel_pos_w, q.shape[-1])
    if k_size is None:  # plain attention: backends still get a key grid
        k_size = (1, k.shape[2])
    return q, k, v, rel_pos_h, rel_pos_w, scale, q_size, k_size


def _candidates(backend: str, xp_name: str):
    if backend == "auto":
        names = backends.names()
        # Backends of the caller's array type first, then the rest (with a copy).
        return [n for n in names if backends.get(n).ARRAY_MODULE == xp_name] + [
            n for n in names if backends.get(n).ARRAY_MODULE != xp_name
        ]
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
    backends.get(backend)  # raises ValueError naming the known backends
    return [backend]


def _on_backend(name, arrays):
    """``arrays`` moved to the array library of backend ``name`` (no-op when they are there)."""
    import importlib

    target = backends.get(name).ARRAY_MODULE
    if target is None or all(a is None or array_module(a).__name__ == target for a in arrays):
        return arrays
    xp = importlib.import_module(target)
    return tuple(to_module(a, xp) for a in arrays)


def _reasons(name, arrays, k_size):
    mod = backends.get(name)
    why = mod.unavailable_reason()
    if why is not None:
        return [why], arrays
    arrays = _on_backend(name, arrays)
    return list(mod.not_supported_reasons(*arrays, k_size)), arrays


_warned: set = set()


def _warn_passed_over(chosen, xp_name):
    """One warning per process and reason when ``"auto"`` passes over a
    backend that should have run here (``WARN_UNAVAILABLE``: a broken numba)."""
    for name in backends.names():
        if name == chosen:
            return
        mod = backends.get(name)
        if not getattr(mod, "WARN_UNAVAILABLE", False) or mod.ARRAY_MODULE != xp_name:
            continue
        why = mod.unavailable_reason()
        if why is not None and (name, why) not in _warned:
            _warned.add((name, why))
            warnings.warn(f"relattn: backend {name!r} cannot run here: {why}; "
                          f"using backend {chosen!r} instead", RuntimeWarning, stacklevel=4)


def _select(backend, q, k, v, rel_pos_h, rel_pos_w, k_size):
    """The backend to run, the arrays (q, k, v and the tables) as it takes
    them, and why others were refused."""
    xp_name = array_module(q).__name__
    refused = {}
    for name in _candidates(backend, xp_name):
        reasons, arrays = _reasons(name, (q, k, v, rel_pos_h, rel_pos_w), k_size)
        if not reasons:
            if backend == "auto":
                _warn_passed_over(name, xp_name)
            return name, arrays, refused
        refused[name] = reasons
    lines = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in refused.items())
    wanted = "no backend" if backend == "auto" else f"backend {backend!r}"
    raise BackendError(f"backend: {wanted} cannot take these inputs:\n{lines}")


# The rel_h / rel_w terms of numpy inputs are computed whole while they (and
# the gathered tables) fit this budget, else by chunks of query rows: their
# size grows with a grid side (Sq * (k_h + k_w)), which a thin grid such as
# 1 x 16384 makes as large as the logits.
TERMS_BUDGET = 64 * 2**20


def _row_chunk(q, rel_pos_h, q_size, k_size):
    """Query rows per chunk when the terms of numpy inputs exceed TERMS_BUDGET, else None."""
    if rel_pos_h is None or type(q) is not np.ndarray:
        return None
    lead, head_dim = q.shape[0] * q.shape[1], q.shape[3]
    itemsize = 8 if "float64" in (q.dtype.name, rel_pos_h.dtype.name) else 4
    if terms_bytes(lead, q_size, k_size, head_dim, itemsize) <= TERMS_BUDGET:
        return None
    per_row = itemsize * (k_size[0] + k_size[1]) * (lead + head_dim)
    return max(1, TERMS_BUDGET // per_row)


def _cpu_run(mod, q, rel_pos_h, q_size, k_size, scale):
    """``run(q, k, v, rel_pos_h, rel_pos_w)`` of a backend that takes the terms
    computed (``attention(q, k, v, rel_h, rel_w, k_size, scale)``): the terms
    whole, or with chunks of query rows when they exceed TERMS_BUDGET."""
    rows = _row_chunk(q, rel_pos_h, q_size, k_size)
    if rel_pos_h is None:
        return lambda q, k, v, th, tw: mod.attention(q, k, v, None, None, k_size, scale)
    if rows is None:
        def run(q, k, v, th, tw):
            rel_h, rel_w = relpos_terms(q, th, tw, q_size, k_size)   # checked when planned
            return mod.attention(q, k, v, rel_h, rel_w, k_size, scale)

        return run

    def run_by_rows(q, k, v, th, tw):
        out = np.empty(q.shape, dtype=q.dtype)
        for start in range(0, q.shape[2], rows):
            q_rows = q[:, :, start:start + rows]
            rel_h, rel_w = decomposed_rel_pos_rows(q_rows, th, tw, q_size, k_size, start)
            out[:, :, start:start + rows] = mod.attention(q_rows, k, v, rel_h, rel_w, k_size, scale)
        return out

    return run_by_rows


def _make_plan(name, arrays, q_size, k_size, scale, kernel=None, kernel_options=None):
    """``(run, description)`` of backend ``name`` for validated arrays (q, k,
    v, rel_pos_h, rel_pos_w) on its array library: ``run(q, k, v, rel_pos_h,
    rel_pos_w)`` computes the terms (unless the kernel does) and the core, for
    every call whose arrays have the signature of these."""
    mod = backends.get(name)
    if hasattr(mod, "plan"):   # the GPU backend plans terms and core in one pass
        try:
            p = mod.plan(*arrays, q_size, k_size, scale, kernel, kernel_options)
        except ValueError as exc:   # no kernel family serves it (or not the forced one)
            raise BackendError(f"backend: {name!r} cannot take these inputs: {exc}") from None
        return p.run, p.describe()
    if kernel is not None or kernel_options is not None:
        raise ValueError(f"kernel: only the GPU backend has kernel families, got kernel={kernel!r} "
                         f"for backend {name!r}")
    describe = getattr(mod, "describe", None)
    return _cpu_run(mod, arrays[0], arrays[3], q_size, k_size, scale), (describe() if describe else name)


def _planned_run(backend, q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, kernel=None, kernel_options=None):
    """``(name, arrays, run, out, description, refused)``: select a backend,
    plan, and run the plan once on ``arrays`` (the inputs as that backend
    takes them), giving ``out``. A backend whose kernels fail in this process
    is passed over from then on ("auto") or named in a BackendError (forced)."""
    while True:
        name, arrays, refused = _select(backend, q, k, v, rel_pos_h, rel_pos_w, k_size)
        run, description = _make_plan(name, arrays, q_size, k_size, scale, kernel, kernel_options)
        try:
            return name, arrays, run, run(*arrays), description, refused
        except backends.BackendFailure as exc:
            if backend != "auto" or backends.get(name).unavailable_reason() is None:
                raise BackendError(f"backend: {name!r} cannot run: {exc}") from None


@accepts_dlpack("q")
def rel_pos_attention(
    q, k, v, rel_pos_h=None, rel_pos_w=None, q_size=None, k_size=None, *, scale=None, backend="auto",
    resize_dtype="float32",
):
    """Multi-head attention with SAM's 2-D decomposed relative-position bias.

    ``out_i = sum_j softmax_j(scale * q_i.k_j + q_i.Rh[y, ky] + q_i.Rw[x, kx]) v_j``
    for query ``i = (y, x)`` on the ``q_size`` grid and key ``j = (ky, kx)`` on the
    ``k_size`` grid, with ``Rh``/``Rw`` from :func:`relattn.get_rel_pos` (tables
    resized when the grid differs from the one they were trained for). The
    relative-position terms use the unscaled ``q``. Without tables this is plain
    scaled dot-product attention.

    Parameters
    ----------
    q : array, shape (B, heads, Sq, d)
    k, v : array, shape (B, heads, Sk, d)
        numpy or CuPy arrays (or DLPack tensors), one dtype among float16,
        bfloat16, float32 and float64. Non-contiguous views are fine.
    rel_pos_h, rel_pos_w : array, shape (L_h, d) and (L_w, d), optional
        One table pair shared by all heads; both or neither.
    q_size : (int, int), optional
        Query grid ``(q_h, q_w)`` with ``q_h * q_w == Sq``; required with tables.
    k_size : (int, int), optional
        Key grid; defaults to ``q_size`` when ``Sk == Sq``.
    scale : float, optional
        Logit scale, default ``d ** -0.5``.
    backend : {"auto", "numpy", "numba", "cupy"}
        ``"auto"`` takes the fastest backend that accepts the inputs for their
        array type (see :func:`explain`); naming one forces it, copying between
        host and device if it works on the other array type.
    resize_dtype : {"float32", "table"}
        Arithmetic of the table resize (see :func:`relattn.resize_rel_pos`):
        ``"float32"`` (default) is PyTorch's float32 interpolate, bit for bit
        (float32 SAM / timm / HF checkpoints, and DeepSeek-OCR's encoder for
        any table); ``"table"`` resizes float64 tables in float64, bit for bit
        as PyTorch's float64 interpolate (SAM's code run on float64 tables).
        Other tables resize the same way in both modes.

    Returns
    -------
    array, shape (B, heads, Sq, d)
        Same array type and dtype as ``q``. Half-precision inputs are computed
        in float32 and rounded once.

    Examples
    --------
    >>> import numpy as np, relattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 12, 8), dtype=np.float32) for _ in range(3))
    >>> table_h = rng.standard_normal((5, 8), dtype=np.float32)  # 2*3-1 rows
    >>> table_w = rng.standard_normal((7, 8), dtype=np.float32)  # 2*4-1 rows
    >>> out = relattn.rel_pos_attention(q, k, v, table_h, table_w, q_size=(3, 4))
    >>> out.shape, out.dtype
    ((1, 2, 12, 8), dtype('float32'))
    """
    key = _call_key(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, backend, resize_dtype)
    if key is not None:
        run = _plans.get(key)
        if run is not None:
            try:
                return run(q, k, v, rel_pos_h, rel_pos_w)
            except backends.BackendFailure:  # its backend just broke: plan again
                _plans.clear()
    q, k, v, rel_pos_h, rel_pos_w, scale, q_size, k_size = _prepare(
        q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, resize_dtype)
    prep = resize_ahead(resize_dtype, rel_pos_h, rel_pos_w, q_size, k_size)
    tables = (rel_pos_h, rel_pos_w) if prep is None else prep(rel_pos_h, rel_pos_w)
    _, arrays, run, out, _, _ = _planned_run(backend, q, k, v, *tables, q_size, k_size, scale)
    if key is not None and arrays[0] is q:  # not moved to another array library
        _plans.keep(key, _resizing(run, prep))
    return to_module(out, array_module(q))  # back to the caller's array type if it moved


# ------------------------------------------------------------- call plans
# A repeated call (same array types, shapes, strides, dtypes, alignment and
# device, same sizes, scale and backend) skips validation and dispatch: its
# first run left its plan here (terms and core). Keys hold no arrays, only
# their signatures.
_plans = BoundedCache(256)


def _array_key(a):
    t = type(a)
    if t is np.ndarray:
        return (a.shape, a.strides, a.dtype)
    if a is None:
        return None
    if t.__module__.startswith("cupy") and t.__name__ == "ndarray":
        mem = a.data
        return (a.shape, a.strides, a.dtype, mem.device_id, mem.ptr & 15)
    raise TypeError  # anything else (DLPack tensors, lists) takes the full path


def _resizing(run, prep):
    """``run`` taking the stored tables: ``prep`` (from
    :func:`relattn.relpos.resize_ahead`) resizes them first, when given."""
    if prep is None:
        return run
    return lambda q, k, v, th, tw: run(q, k, v, *prep(th, tw))


def _call_key(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, backend, resize_dtype="float32"):
    """The plan-cache key of a call, or None when it takes the full path."""
    try:
        arrays = tuple(_array_key(a) for a in (q, k, v, rel_pos_h, rel_pos_w))
    except (TypeError, AttributeError):
        return None
    kinds = {type(a) for a in (q, k, v, rel_pos_h, rel_pos_w) if a is not None}
    if None in arrays[:3] or len(kinds) != 1 or type(backend) is not str:
        return None
    for size in (q_size, k_size):  # exact types only: (True, 2) must still be refused
        if size is not None and not (type(size) is tuple and len(size) == 2
                                     and type(size[0]) is int and type(size[1]) is int):
            return None
    if scale is not None and type(scale) not in (float, int):
        return None
    if type(resize_dtype) is not str:   # checked (and refused) on the full path
        return None
    extra = _gpu_key() if type(q) is not np.ndarray else None
    return (arrays, type(q), q_size, k_size, type(scale), scale, backend, extra, resize_dtype)


def planned(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, backend):
    """The plan a previous ``rel_pos_attention`` call with arrays of these
    signatures left, as ``run(q, k, v, rel_pos_h, rel_pos_w)``, or None."""
    key = _call_key(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, backend)
    return None if key is None else _plans.get(key)


def _gpu_key():
    return backends.get("cupy").plan_key()


def explain(q, k, v, rel_pos_h=None, rel_pos_w=None, q_size=None, k_size=None, *, scale=None, backend="auto",
            resize_dtype="float32"):
    """Say which backend and kernel :func:`rel_pos_attention` would run for these inputs, and why.

    Takes the same arguments as :func:`rel_pos_attention`. It plans the call
    (on the GPU that compiles the chosen kernel, as the first call would) but
    computes no attention.

    Returns
    -------
    str
        A line naming the chosen backend, a line naming its kernel (on the GPU:
        the family, its configuration and how the terms are computed), then
        one line per backend (and GPU kernel family) passed over, with the
        reasons (unavailable on this machine, wrong array type, unsupported
        dtype or size, ...).

    Raises
    ------
    BackendError
        If no backend can take the inputs (the message lists every reason).

    Examples
    --------
    >>> import numpy as np, relattn
    >>> q = np.zeros((1, 1, 4, 8), np.float32)
    >>> print(relattn.explain(q, q, q, backend="numpy"))
    backend 'numpy' runs these inputs
      kernel: the formula, materialized (logits in chunks of at most 256 MiB)
    """
    q, k, v, rel_pos_h, rel_pos_w, scale, q_size, k_size = _prepare(
        q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, resize_dtype)
    prep = resize_ahead(resize_dtype, rel_pos_h, rel_pos_w, q_size, k_size)
    if prep is not None:  # as the call runs: the backend gets the tables resized in float64
        rel_pos_h, rel_pos_w = prep(rel_pos_h, rel_pos_w)
    rows = _row_chunk(q, rel_pos_h, q_size, k_size)
    if rows is not None:  # as the call runs: one chunk of query rows at a time
        q = q[:, :, :rows]
    name, arrays, refused = _select(backend, q, k, v, rel_pos_h, rel_pos_w, k_size)
    mod = backends.get(name)
    lines = [f"backend {name!r} runs these inputs"]
    if hasattr(mod, "plan"):
        try:
            p = mod.plan(*arrays, q_size, k_size, scale)
        except ValueError as exc:
            raise BackendError(f"backend: {name!r} cannot take these inputs: {exc}") from None
        lines.append(f"  kernel: {p.describe()}")
        lines += [f"  passed over kernel {fam!r}: {'; '.join(why)}" for fam, why in p.passed_over]
    else:
        describe = getattr(mod, "describe", None)
        lines.append(f"  kernel: {describe() if describe else name}")
    if prep is not None:
        lines.append("  tables: resized in float64 before the backend runs (resize_dtype='table')")
    if backend == "auto":
        xp_name = array_module(q).__name__
        for other in backends.names():
            if other == name:
                continue
            reasons = refused.get(other) or _reasons(other, (q, k, v, rel_pos_h, rel_pos_w), k_size)[0]
            if reasons:
                lines.append(f"  passed over {other!r}: {'; '.join(reasons)}")
            elif backends.get(other).ARRAY_MODULE != xp_name:
                lines.append(f"  {other!r} could run them after a host/device copy (lower priority)")
            else:
                lines.append(f"  {other!r} could also run them (lower priority)")
    return "\n".join(lines)


# ------------------------------------------------------------- public plans
class AttentionPlan:
    """A planned :func:`rel_pos_attention` for repeated calls on arrays of one
    signature; made by :func:`plan`.

    Calling it, ``p(q, k, v, rel_pos_h, rel_pos_w)``, checks only what memory
    safety needs (array type, shape, dtype, strides, and on the GPU the
    device and 16-byte alignment, each against the planned arrays) and
    launches: no validation of values, no dispatch, no planning. Arrays of
    another signature raise ``ValueError`` / ``TypeError`` naming the argument.

    Attributes
    ----------
    backend : str
        The backend the plan runs on.
    kernel : str
        What runs: on the GPU the kernel family, its configuration and how the
        relative-position terms are computed.

    Examples
    --------
    >>> import numpy as np, relattn
    >>> q = np.ones((1, 1, 6, 4), np.float32)
    >>> p = relattn.plan(q, q, q)
    >>> p.backend in relattn.backends.available(), p(q, q, q).shape
    (True, (1, 1, 6, 4))
    """

    __slots__ = ("backend", "kernel", "_run", "_signature")

    def __init__(self, backend, kernel, run, signature):
        self.backend = backend
        self.kernel = kernel
        self._run = run
        self._signature = signature

    def __call__(self, q, k, v, rel_pos_h=None, rel_pos_w=None):
        arrays = (q, k, v, rel_pos_h, rel_pos_w)
        for name, a, want in zip(_PLAN_NAMES, arrays, self._signature):
            if want is None:
                if a is not None:
                    raise ValueError(f"{name}: the plan was made without it, got an array")
                continue
            try:
                got = _array_key(a)
            except (TypeError, AttributeError):
                raise TypeError(f"{name}: expected {want[0]}, got {type(a).__name__}") from None
            if got != want[1]:
                raise ValueError(f"{name}: expected an array of the planned signature "
                                 f"{_describe_signature(want[1])}, got {_describe_signature(got)}")
        return self._run(q, k, v, rel_pos_h, rel_pos_w)

    def __repr__(self):
        return f"<relattn.AttentionPlan backend={self.backend!r} kernel={self.kernel!r}>"


_PLAN_NAMES = ("q", "k", "v", "rel_pos_h", "rel_pos_w")


def _describe_signature(key):
    if key is None:
        return "None"
    shape, strides, dtype = key[:3]
    text = f"shape {tuple(shape)}, dtype {dtype_name(dtype)}, strides {tuple(strides)}"
    if len(key) > 3:
        text += f", device {key[3]}, base address {key[4]} mod 16"
    return text


def plan(q, k, v, rel_pos_h=None, rel_pos_w=None, q_size=None, k_size=None, *, scale=None, backend="auto",
         kernel=None, kernel_options=None, dtype=None, array_type="numpy", resize_dtype="float32"):
    """Plan :func:`rel_pos_attention` once for many calls on arrays of one signature.

    The pattern of cuFFT plans: everything a call decides from its arrays'
    signature (validation, backend, kernel family and configuration, array
    preparation, compilation) is done here, once; the returned
    :class:`AttentionPlan` then launches with the checks memory safety needs.

    Parameters
    ----------
    q, k, v, rel_pos_h, rel_pos_w
        Example arrays of the calls to come (numpy or CuPy), or their shapes
        (tuples): then ``dtype`` and ``array_type`` say what the arrays will
        be, and C-contiguous arrays are planned for.
    q_size, k_size, scale, backend, resize_dtype
        As for :func:`rel_pos_attention`.
    kernel : str, optional
        GPU only: force a kernel family (``"ws"``, ``"win"``, ``"wg"``,
        ``"mma"``, ``"wgt"``, ``"tf32"``, ``"simt"``; see docs/kernels.md)
        instead of the planner's choice; ``BackendError`` if it cannot serve
        the problem.
    kernel_options : dict, optional
        With ``kernel``: fields of the family's configuration to override
        (e.g. ``{"bn": 32}``), and ``fused`` (bool): whether the kernel
        computes the relative-position terms itself. For tests and benchmarks.
    dtype, array_type
        With shapes: the dtype (default float32) and ``"numpy"`` or ``"cupy"``.

    Returns
    -------
    AttentionPlan
        ``p(q, k, v, rel_pos_h, rel_pos_w)`` returns what
        ``rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size,
        scale=scale, backend=backend, resize_dtype=resize_dtype)`` returns
        (the same bits).

    Examples
    --------
    >>> import numpy as np, relattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 12, 8), dtype=np.float32) for _ in range(3))
    >>> th, tw = rng.standard_normal((5, 8), dtype=np.float32), rng.standard_normal((7, 8), dtype=np.float32)
    >>> p = relattn.plan(q, k, v, th, tw, q_size=(3, 4))
    >>> out = p(q, k, v, th, tw)
    >>> bool(np.array_equal(out, relattn.rel_pos_attention(q, k, v, th, tw, q_size=(3, 4))))
    True
    >>> p(q[:, :1], k, v, th, tw)
    Traceback (most recent call last):
    ...
    ValueError: q: expected an array of the planned signature shape (1, 2, 12, 8), ...
    """
    arrays = _example_arrays((q, k, v, rel_pos_h, rel_pos_w), dtype, array_type)
    q, k, v, rel_pos_h, rel_pos_w = arrays
    if kernel_options is not None and not isinstance(kernel_options, dict):
        raise TypeError(f"kernel_options: expected a dict, got {type(kernel_options).__name__}")
    if kernel is not None and not isinstance(kernel, str):
        raise TypeError(f"kernel: expected a string, got {type(kernel).__name__}")
    q, k, v, rel_pos_h, rel_pos_w, scale, q_size, k_size = _prepare(
        q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, resize_dtype)
    prep = resize_ahead(resize_dtype, rel_pos_h, rel_pos_w, q_size, k_size)
    tables = (rel_pos_h, rel_pos_w) if prep is None else prep(rel_pos_h, rel_pos_w)
    name, moved, run, _, description, _ = _planned_run(
        backend, q, k, v, *tables, q_size, k_size, scale, kernel, kernel_options)
    run = _resizing(run, prep)
    signature = tuple(None if a is None else (type(a).__name__, _array_key(a)) for a in (q, k, v, rel_pos_h, rel_pos_w))
    if moved[0] is not q:   # planned on the other array library: move per call
        target = array_module(moved[0])
        back = array_module(q)

        def run_moved(q, k, v, th, tw, run=run):
            args = tuple(None if a is None else to_module(a, target) for a in (q, k, v, th, tw))
            return to_module(run(*args), back)

        return AttentionPlan(name, description, run_moved, signature)
    return AttentionPlan(name, description, run, signature)


def _example_arrays(arrays, dtype, array_type):
    """Arrays as given, or zeros of the given shapes (tuples)."""
    if not any(isinstance(a, tuple) for a in arrays):
        if dtype is not None:
            raise ValueError("dtype: given with arrays; it is for planning from shapes only")
        return arrays
    if array_type not in ("numpy", "cupy"):
        raise ValueError(f"array_type: expected 'numpy' or 'cupy', got {array_type!r}")
    import importlib

    try:
        xp = importlib.import_module(array_type)
    except ImportError:
        hint = "relattn[gpu] for CUDA 13, or relattn[gpu-cuda12] for CUDA 12" if array_type == "cupy" else "numpy"
        raise ImportError(f"array_type: {array_type!r} needs the {array_type} package (pip install {hint})") from None
    dt = np.dtype(np.float32 if dtype is None else dtype)
    out = []
    for name, a in zip(_PLAN_NAMES, arrays):
        if a is None or not isinstance(a, tuple):
            if a is not None:
                raise TypeError(f"{name}: expected a shape (tuple) like the other arguments, got {type(a).__name__}")
            out.append(None)
            continue
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in a):
            raise ValueError(f"{name}: expected a shape of non-negative ints, got {a}")
        out.append(xp.zeros(a, dtype=dt))
    return tuple(out)
