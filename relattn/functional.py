"""``rel_pos_attention``: validation, the rel_h / rel_w terms, and backend dispatch."""

from __future__ import annotations

import math
import numbers
import threading

import numpy as np

from relattn import backends
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
from relattn.relpos import _check_table, decomposed_rel_pos

__all__ = ["rel_pos_attention", "explain", "BackendError"]


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
    scale = float(scale)
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


def _prepare(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale):
    """Validate everything; return the arrays (tables converted and checked), scale and sizes."""
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


def _terms_plan(q, rel_pos_h, rel_pos_w, q_size, k_size):
    """``run(q, rel_pos_h, rel_pos_w) -> (rel_h, rel_w)`` for validated inputs of
    the signature of these (tables present)."""
    if array_module(q).__name__ == "cupy" and "float64" not in (
        dtype_name(q.dtype), dtype_name(rel_pos_h.dtype), dtype_name(rel_pos_w.dtype)
    ):
        gpu = backends.get("cupy")
        if gpu.unavailable_reason() is None:
            # One small kernel reading q in its own dtype (no bf16 matmul in CuPy).
            return gpu.terms_plan(q, rel_pos_h, rel_pos_w, q_size, k_size)
    return lambda q, th, tw: decomposed_rel_pos(q, th, tw, q_size, k_size)


def _terms(q, rel_pos_h, rel_pos_w, q_size, k_size):
    if rel_pos_h is None:
        return None, None
    return _terms_plan(q, rel_pos_h, rel_pos_w, q_size, k_size)(q, rel_pos_h, rel_pos_w)


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


def _select(backend, q, k, v, rel_h, rel_w, k_size):
    """The backend to run, the arrays as it takes them, and why others were refused."""
    xp_name = array_module(q).__name__
    refused = {}
    for name in _candidates(backend, xp_name):
        reasons, arrays = _reasons(name, (q, k, v, rel_h, rel_w), k_size)
        if not reasons:
            return name, arrays, refused
        refused[name] = reasons
    lines = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in refused.items())
    wanted = "no backend" if backend == "auto" else f"backend {backend!r}"
    raise BackendError(f"backend: {wanted} can take these inputs:\n{lines}")


@accepts_dlpack("q")
def rel_pos_attention(
    q, k, v, rel_pos_h=None, rel_pos_w=None, q_size=None, k_size=None, *, scale=None, backend="auto"
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
    key = _call_key(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, backend)
    if key is not None:
        run = _plans.get(key)
        if run is not None:
            return run(q, k, v, rel_pos_h, rel_pos_w)
    q, k, v, rel_pos_h, rel_pos_w, scale, q_size, k_size = _prepare(
        q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale)
    fused = _fused_first(backend, q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale)
    if fused is not None:  # the kernel computes the terms: none computed here
        if key is not None:
            _remember(key, fused)
        return fused(q, k, v, rel_pos_h, rel_pos_w)   # the same kernel as the planned calls: the same bits
    rel_h, rel_w = _terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
    name, arrays, _ = _select(backend, q, k, v, rel_h, rel_w, k_size)
    out = backends.get(name).attention(*arrays, k_size, scale)
    if key is not None and arrays[0] is q:  # not moved to another array library
        _remember(key, _plan(name, q, k, v, rel_pos_h, rel_pos_w, rel_h, rel_w, q_size, k_size, scale))
    return to_module(out, array_module(q))  # back to the caller's array type if it moved


# ------------------------------------------------------------- call plans
# A repeated call (same array types, shapes, strides, dtypes, alignment and
# device, same sizes, scale and backend) skips validation and dispatch: its
# first run left a plan here that only computes the terms and launches the
# core. Keys hold no arrays, only their signatures.
_plans: dict = {}
_PLANS_MAX = 256
_plans_lock = threading.Lock()


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


def _call_key(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, backend):
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
    extra = _gpu_key() if type(q) is not np.ndarray else None
    return (arrays, type(q), q_size, k_size, type(scale), scale, backend, extra)


def planned(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, backend):
    """The plan a previous ``rel_pos_attention`` call with arrays of these
    signatures left, as ``run(q, k, v, rel_pos_h, rel_pos_w)``, or None."""
    key = _call_key(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, backend)
    return None if key is None else _plans.get(key)


def _gpu_key():
    return backends.get("cupy").plan_key()


def _remember(key, run):
    with _plans_lock:
        if len(_plans) >= _PLANS_MAX:
            del _plans[next(iter(_plans))]  # the oldest
        _plans[key] = run


def _fused_first(backend, q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale):
    """The plan ``run(q, k, v, rel_pos_h, rel_pos_w)`` when the backend this
    call selects computes the terms inside its attention kernel (``fused_plan``:
    the CuPy backend for SAM's global grids, see cupy_gpu.fused_plan), else
    None. Asked before any terms are computed, so such a call (and every call
    that cannot be planned) runs no separate terms kernel. Tables: checked."""
    if rel_pos_h is None or backend not in ("auto", "cupy") or array_module(q).__name__ != "cupy":
        return None
    mod = backends.get("cupy")
    make = getattr(mod, "fused_plan", None)
    # "auto" takes the CuPy backend first for CuPy arrays: when it accepts them
    if make is None or mod.unavailable_reason() is not None or \
            mod.not_supported_reasons(q, k, v, rel_pos_h, rel_pos_w, k_size):
        return None
    return make(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale)


def _plan(name, q, k, v, rel_pos_h, rel_pos_w, rel_h, rel_w, q_size, k_size, scale):
    """``run(q, k, v, rel_pos_h, rel_pos_w) -> out``: the terms and the core of
    backend ``name`` for validated inputs of the signature of these."""
    mod = backends.get(name)
    make_core = getattr(mod, "core_plan", None)
    if make_core is not None:
        core = make_core(q, k, v, rel_h, rel_w, k_size, scale)
    else:
        def core(q, k, v, rel_h, rel_w):
            return mod.attention(q, k, v, rel_h, rel_w, k_size, scale)
    if rel_pos_h is None:
        return lambda q, k, v, th, tw: core(q, k, v, None, None)
    terms = _terms_plan(q, rel_pos_h, rel_pos_w, q_size, k_size)

    def run(q, k, v, th, tw):
        return core(q, k, v, *terms(q, th, tw))

    return run


def explain(q, k, v, rel_pos_h=None, rel_pos_w=None, q_size=None, k_size=None, *, scale=None, backend="auto"):
    """Say which backend :func:`rel_pos_attention` would run for these inputs, and why.

    Takes the same arguments as :func:`rel_pos_attention` and computes nothing
    but the cheap relative-position terms.

    Returns
    -------
    str
        One line naming the chosen backend, then one line per backend that was
        passed over with the reasons (unavailable on this machine, wrong array
        type, unsupported dtype or size, ...).

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
    """
    q, k, v, rel_pos_h, rel_pos_w, scale, q_size, k_size = _prepare(
        q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale)
    rel_h, rel_w = _terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
    name, _, refused = _select(backend, q, k, v, rel_h, rel_w, k_size)
    lines = [f"backend {name!r} runs these inputs"]
    if backend == "auto":
        xp_name = array_module(q).__name__
        for other in backends.names():
            if other == name:
                continue
            reasons = refused.get(other) or _reasons(other, (q, k, v, rel_h, rel_w), k_size)[0]
            if reasons:
                lines.append(f"  passed over {other!r}: {'; '.join(reasons)}")
            elif backends.get(other).ARRAY_MODULE != xp_name:
                lines.append(f"  {other!r} could run them after a host/device copy (lower priority)")
            else:
                lines.append(f"  {other!r} could also run them (lower priority)")
    return "\n".join(lines)
