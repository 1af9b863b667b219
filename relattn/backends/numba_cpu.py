"""Numba CPU backend: a flash-style fused kernel (see ``_numba_kernels.py``).

The ``Sq x Sk`` bias and logits are never built: memory beyond the inputs and
the output is a few tile buffers per work item, plus contiguous (and, for half
precision, float32) copies of inputs that arrive as strided views.

Threads follow numba's settings (``NUMBA_NUM_THREADS``, ``numba.set_num_threads``).
"""

from __future__ import annotations

import importlib.util
import threading

import numpy as np

NAME = "numba"
ARRAY_MODULE = "numpy"

_TQ_MAX = 64  # query tile (the vectorised axis of every inner loop)
_TK_MAX = 64  # key tile: logit tile of 64 x 64 float32 = 16 KiB, stays in L1
_TQ_MIN = 16

_import_error: str | None = None
_kernels = None


def _half_kind(dtype) -> bool:
    return dtype == np.float16 or dtype.name == "bfloat16"


def _load():
    global _kernels, _import_error
    if _kernels is None:
        try:
            from . import _numba_kernels
        except Exception as exc:  # pragma: no cover - broken installs
            _import_error = f"numba kernels failed to import: {type(exc).__name__}: {exc}"
            raise
        _kernels = _numba_kernels
    return _kernels


def unavailable_reason() -> str | None:
    """None when numba can be used, else why not.  Cheap; never raises."""
    if _import_error is not None:
        return _import_error
    try:
        if importlib.util.find_spec("numba") is None:
            return "numba is not installed"
    except Exception as exc:  # pragma: no cover
        return f"numba cannot be found: {exc}"
    return None


def not_supported_reasons(q, k, v, rel_h, rel_w, k_size) -> list[str]:
    reasons = []
    if not isinstance(q, np.ndarray):
        reasons.append(f"numba backend takes numpy arrays, got {type(q).__name__}")
        return reasons
    dt = q.dtype
    if not (dt == np.float32 or dt == np.float64 or _half_kind(dt)):
        reasons.append(f"numba backend supports float16/bfloat16/float32/float64, got {dt}")
    return reasons


def _tiles(BH: int, Sq: int, Sk: int, nthreads: int) -> tuple[int, int]:
    """Balanced query tiles (<= _TQ_MAX) with enough work items for all threads."""
    nqt = -(-Sq // _TQ_MAX)
    # Split further when there are too few (batch*head, query tile) items.
    while BH * nqt < 4 * nthreads and -(-Sq // (nqt + 1)) >= _TQ_MIN:
        nqt += 1
    tq = max(1, -(-Sq // nqt))
    if tq > 8:  # the kernel pads tiles to multiples of 8 (float64) or 16 (float32) lanes
        tq = -(-tq // 16) * 16
    tk = max(1, min(_TK_MAX, Sk))
    return tq, tk


_workqueue_lock = threading.Lock()


def _serialize(numba) -> bool:
    """numba's ``workqueue`` threading layer aborts the process when two threads
    run parallel kernels at once; calls are serialized there (omp and tbb are
    thread-safe and run concurrently)."""
    try:
        return numba.threading_layer() == "workqueue"
    except ValueError:  # no parallel region has run yet: the first one starts under the lock
        return True


def _run(numba, kern, *args):
    """Work items go to the threads one at a time (chunk size 1: dynamic
    scheduling), so a thread slowed by other load on the machine does not
    hold up the whole call; the caller's chunk size is restored after."""
    setc = getattr(numba, "set_parallel_chunksize", None)
    if setc is None:  # numba < 0.57
        kern.attention_fwd(*args)
        return
    old = setc(1)
    try:
        kern.attention_fwd(*args)
    finally:
        setc(old)


def attention(q, k, v, rel_h, rel_w, k_size, scale):
    """softmax(scale * q k^T + rel_h[..., ky] + rel_w[..., kx]) v, fused.

    See ``relattn.backends`` for the contract.  Half-precision inputs are
    computed in float32 and rounded once at the end.
    """
    kern = _load()
    import numba

    B, H, Sq, d = q.shape
    Sk = k.shape[2]
    out_dtype = q.dtype
    cdt = np.float64 if out_dtype == np.float64 else np.float32
    if B * H * Sq == 0 or d == 0:
        return np.zeros((B, H, Sq, d), dtype=out_dtype)
    BH = B * H
    q3 = np.ascontiguousarray(q, dtype=cdt).reshape(BH, Sq, d)
    k3 = np.ascontiguousarray(k, dtype=cdt).reshape(BH, Sk, d)
    v3 = np.ascontiguousarray(v, dtype=cdt).reshape(BH, Sk, d)
    k_h, k_w = int(k_size[0]), int(k_size[1])
    if rel_h is None:
        has_rel = False
        rh3 = rw3 = np.zeros((1, 1, 1), dtype=cdt)
        k_w = max(k_w, 1)
    else:
        has_rel = True
        rh3 = np.ascontiguousarray(rel_h, dtype=cdt).reshape(BH, Sq, k_h)
        rw3 = np.ascontiguousarray(rel_w, dtype=cdt).reshape(BH, Sq, k_w)
    tq, tk = _tiles(BH, Sq, Sk, numba.get_num_threads())
    out = np.empty((BH, Sq, d), dtype=cdt)
    if _serialize(numba):
        with _workqueue_lock:
            _run(numba, kern, q3, k3, v3, rh3, rw3, has_rel, k_w, cdt(scale), tq, tk, out)
    else:
        _run(numba, kern, q3, k3, v3, rh3, rw3, has_rel, k_w, cdt(scale), tq, tk, out)
    out = out.reshape(B, H, Sq, d)
    if out.dtype != out_dtype:
        out = out.astype(out_dtype)
    return out
