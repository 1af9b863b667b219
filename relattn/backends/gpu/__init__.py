"""The GPU backend (``backend="cupy"``): fused CUDA kernels through CuPy.

The S x S bias is never built: the kernels add ``rel_h[i, ky] + rel_w[i, kx]``
per key tile, or compute those terms themselves from the tables. Layout:

``families/``
    one module per kernel family (what it supports, its configuration, its
    launch) and the priority list per dtype;
``planner``
    one planning pass: problem -> family, configuration, terms -> a plan;
``tuning``
    every tile and configuration choice, a one-line reason each;
``terms``
    the terms kernels; ``_operands``, ``_build``, ``_device``, ``options``:
    array preparation, compilation, device queries, the two settings.

The CUDA sources live in ``relattn/backends/cuda``. Importing this package
does not import CuPy.
"""

from __future__ import annotations

from relattn._arrays import dtype_name

from . import _build
from .planner import NoKernel, Plan, make_plan
from .terms import rel_terms, rel_terms_from_tables

__all__ = ["NAME", "ARRAY_MODULE", "Plan", "NoKernel", "make_plan", "rel_terms", "rel_terms_from_tables"]

NAME = "cupy"
ARRAY_MODULE = "cupy"
MAX_HEAD_DIM = 128
MAX_KEYS = 1 << 22   # keys are split into (row, column) with float arithmetic exact below this

_avail: list = []


def unavailable_reason():
    """None when CuPy and a CUDA device are usable, else a one-line reason
    (probed once per process: it is asked on every unplanned call)."""
    if not _avail:
        _avail.append(_probe())
    return _avail[0]


def _probe():
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken install
        return (f"cupy is not importable ({type(exc).__name__}: {exc}); "
                "pip install relattn[gpu] (CUDA 13) or relattn[gpu-cuda12]").splitlines()[0]
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
    except Exception as exc:
        return f"no usable CUDA device ({type(exc).__name__}: {exc})".splitlines()[0]
    return _build.sources_present()


def _dtype(a) -> str:
    try:
        return dtype_name(a.dtype)
    except Exception:
        return str(getattr(a, "dtype", "?"))


def not_supported_reasons(q, k, v, rel_a, rel_b, k_size):
    """Reasons this backend cannot take these arrays (empty list: it can).
    ``rel_a`` / ``rel_b``: the tables or the terms, or None."""
    try:
        import cupy
    except Exception:
        return ["the cupy backend needs the cupy package (pip install relattn[gpu] or relattn[gpu-cuda12])"]
    reasons = []
    for name, a in (("q", q), ("k", k), ("v", v), ("rel_pos_h", rel_a), ("rel_pos_w", rel_b)):
        if a is not None and not isinstance(a, cupy.ndarray):
            reasons.append(f"{name} is not a cupy.ndarray (got {type(a).__name__})")
    if reasons:
        return reasons
    dt = _dtype(q)
    if dt not in ("float16", "bfloat16", "float32", "float64"):
        reasons.append(f"dtype {dt} is not supported (float16, bfloat16, float32, float64)")
    d = int(q.shape[-1])
    if d > MAX_HEAD_DIM:
        reasons.append(f"head_dim {d} > {MAX_HEAD_DIM} is not supported by the GPU kernels")
    elif dt == "float64" and max(16, (d + 15) // 16 * 16) > 112:
        reasons.append(f"float64 with head_dim {d} > 112 does not fit the kernel's shared memory")
    dev = q.device.id
    for name, a in (("k", k), ("v", v), ("rel_pos_h", rel_a), ("rel_pos_w", rel_b)):
        if a is not None and a.device.id != dev:
            reasons.append(f"{name} is on device {a.device.id}, q on device {dev}")
    if int(k.shape[2]) >= MAX_KEYS:
        reasons.append(f"{int(k.shape[2])} keys exceed the kernels' limit of 2**22")
    return reasons


def plan(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, kernel=None, kernel_options=None) -> Plan:
    """The plan of a validated call: terms (when the kernel does not compute
    them) and core; see :mod:`.planner`."""
    return make_plan(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, kernel, kernel_options)


def attention(q, k, v, rel_h, rel_w, k_size, scale):
    """The backend contract of ``relattn.backends``: the terms given."""
    return core_plan(q, k, v, rel_h, rel_w, k_size, scale)(q, k, v, rel_h, rel_w)


def core_plan(q, k, v, rel_h, rel_w, k_size, scale, kernel=None, kernel_options=None):
    """``run(q, k, v, rel_h, rel_w)`` of :func:`attention` for arrays of the signature of these."""
    return make_plan(q, k, v, rel_h, rel_w, None, k_size, scale, kernel, kernel_options, terms_given=True).run


def plan_key():
    """What besides the arrays' signature a plan depends on: the current
    device and the float32 mode."""
    import cupy

    from relattn.precision import get_gpu_float32_mode

    return (cupy.cuda.runtime.getDevice(), get_gpu_float32_mode())
