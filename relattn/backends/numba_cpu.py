"""Numba CPU backend: a flash-style fused kernel (see ``_numba_kernels.py``).

The ``Sq x Sk`` bias and logits are never built: memory beyond the inputs and
the output is a few tile buffers per work item, plus contiguous (and, for half
precision, float32) copies of inputs that arrive as strided views.

Threads follow numba's settings (``NUMBA_NUM_THREADS``, ``numba.set_num_threads``).

The kernels compile on their first use (several seconds per dtype) and numba
caches them on disk: under ``NUMBA_CACHE_DIR`` when set, else in the
``__pycache__`` next to ``_numba_kernels.py``, else (not writable) in numba's
user cache directory (``~/.cache/numba`` on Linux).  Later processes load them
in a fraction of a second.  The first call that is about to compile says so,
in one line naming that directory, once per process and kernel, as a warning
of the ``relattn`` logger (on stderr unless logging is configured otherwise;
``logging.getLogger("relattn").setLevel(logging.ERROR)`` silences it).
``relattn warmup`` compiles every kernel ahead.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np

from . import BackendFailure

NAME = "numba"
ARRAY_MODULE = "numpy"
WARN_UNAVAILABLE = True  # a required dependency: "auto" says when it cannot use it

_TQ_MAX = 64  # query tile (the vectorised axis of every inner loop)
_TK_MAX = 64  # key tile: logit tile of 64 x 64 float32 = 16 KiB, stays in L1
_TQ_MIN = 16

_kernels = None
# Why numba cannot be used here, once known: an import or start-up failure
# found by unavailable_reason(), or a compile / launch failure of the first
# call.  Dispatch and explain() both read it, so they agree.
_broken: str | None = None
_checked = False
_check_lock = threading.Lock()

def _half_kind(dtype) -> bool:
    return dtype == np.float16 or dtype.name == "bfloat16"


_THREADING_LAYERS = ("default", "safe", "forksafe", "threadsafe", "tbb", "omp", "workqueue")


def _load():
    global _kernels
    if _kernels is None:
        from . import _numba_kernels

        _kernels = _numba_kernels
    return _kernels


def _probe() -> str | None:
    """Why numba cannot run here, or None: numba importable, JIT on, the
    kernels module importable, the threading layer known and able to start."""
    try:
        import numba
    except Exception as exc:  # noqa: BLE001 - any import failure means "unavailable"
        if isinstance(exc, ModuleNotFoundError) and exc.name == "numba":
            return "numba is not installed (pip install numba)"
        return f"numba failed to import ({type(exc).__name__}: {exc})"
    if numba.config.DISABLE_JIT:
        return "numba's JIT is disabled (NUMBA_DISABLE_JIT=1)"
    layer = str(numba.config.THREADING_LAYER).lower()
    if layer not in _THREADING_LAYERS:
        return (f"NUMBA_THREADING_LAYER={numba.config.THREADING_LAYER!r} is not a threading layer "
                f"numba knows (expected one of {', '.join(_THREADING_LAYERS)})")
    try:
        _load()
    except Exception as exc:  # noqa: BLE001
        return f"the numba kernels failed to import ({type(exc).__name__}: {exc})"
    try:
        from numba.np.ufunc import parallel

        parallel._launch_threads()
    except Exception as exc:  # noqa: BLE001 - e.g. a layer that is not installed
        return f"numba's threading layer {layer!r} cannot start ({type(exc).__name__}: {' '.join(str(exc).split())})"
    return None


def unavailable_reason() -> str | None:
    """None when numba can be used, else why not.  Never raises; the checks
    run once per process (about a second: importing numba and the kernels,
    starting the threading layer), then the answer is remembered."""
    global _checked, _broken
    if not _checked:
        with _check_lock:
            if not _checked:
                _broken = _probe()
                _checked = True
    return _broken


def _mark_broken(why: str) -> None:
    global _broken, _checked
    _broken, _checked = why, True


def describe() -> str:
    return ("numba fused kernel: query tiles of up to 64 x key tiles of 64, online softmax, "
            "float32 on 8-lane vectors (float64 on plain loops); no S x S buffer")


def not_supported_reasons(q, k, v, rel_pos_h, rel_pos_w, k_size) -> list[str]:
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


# A process forked after the threading layer started inherits a thread pool
# that is not there: GNU OpenMP then kills the child ("fork() called from a
# process already using GNU OpenMP") and a multiprocessing pool waits forever.
# Such a child runs the kernels compiled without threads (TBB survives a fork).
_forked_child = False


def _after_fork_in_child():
    global _forked_child
    try:
        from numba.np.ufunc import parallel

        if parallel._is_initialized and parallel.threading_layer() != "tbb":
            _forked_child = True
    except Exception:  # noqa: BLE001 - numba absent or broken: nothing to protect
        pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _launch(numba, kern, *args):
    """Work items go to the threads one at a time (chunk size 1: dynamic
    scheduling), so a thread slowed by other load on the machine does not
    hold up the whole call; the caller's chunk size is restored after."""
    if _forked_child:
        kern.attention_fwd(*args, serial=True)
        return
    setc = getattr(numba, "set_parallel_chunksize", None)
    if setc is None:  # numba < 0.57
        kern.attention_fwd(*args)
        return
    old = setc(1)
    try:
        kern.attention_fwd(*args)
    finally:
        setc(old)


# -- first-call compile notice ----------------------------------------------------

_log = logging.getLogger("relattn")
_noticed: set = set()  # (compute dtype, serial) already looked at in this process
_notice_lock = threading.Lock()


def _dispatcher(kern, dtype, serial):
    """The numba dispatcher ``kern.attention_fwd`` calls for ``dtype`` (and ``serial``)."""
    kernel = kern._attention_fwd_f32 if dtype == np.float32 else kern._attention_fwd_generic
    if serial:
        kernel = kern._serial_kernels.get(kernel) or kern._serial_kernels.setdefault(kernel, kern._serial(kernel))
    return kernel


def _will_compile(dispatcher, args) -> bool:
    """Whether calling ``dispatcher`` with ``args`` compiles: nothing compiled for
    these argument types in this process, nor in numba's on-disk cache (the
    index entry numba itself would look up, which a changed source voids)."""
    try:
        argtypes = tuple(dispatcher.typeof_pyval(a) for a in args)
        if argtypes in dispatcher.overloads:
            return False
        cache = dispatcher._cache
        if cache.cache_path is None:  # no cache here: every process compiles
            return True
        key = cache._index_key(argtypes, dispatcher.targetctx.codegen())
        return key not in cache._cache_file._load_index()
    except Exception:  # noqa: BLE001 - numba's internals moved: judge by this process alone
        return not dispatcher.signatures


def _compile_notice(kern, args, serial) -> None:
    """One line on stderr before the first call that compiles, per process and kernel."""
    dtype = args[0].dtype
    if (dtype.name, serial) in _noticed:
        return
    with _notice_lock:
        if (dtype.name, serial) in _noticed:
            return
        _noticed.add((dtype.name, serial))
        if not _log.isEnabledFor(logging.WARNING):
            return
        try:
            dispatcher = _dispatcher(kern, dtype, serial)
            if not _will_compile(dispatcher, args):
                return
            where = dispatcher.stats.cache_path
        except Exception:  # noqa: BLE001 - a notice never stops a call
            return
        what = f"the numba kernels for {dtype.name}{' (single-threaded variant)' if serial else ''}"
        if where:
            message = (f"relattn: compiling {what}, a few seconds (first use; cached in {where} for later runs; "
                       f"'relattn warmup' compiles them ahead)")
        else:
            message = (f"relattn: compiling {what}, a few seconds (numba cannot cache them here, so every "
                       f"process compiles them again: set NUMBA_CACHE_DIR to a writable directory)")
        _log.warning(message)


def _run(numba, kern, *args):
    """The kernel; a failure to compile or launch it marks the backend
    unavailable for the rest of the process and raises BackendFailure."""
    _compile_notice(kern, args, _forked_child)
    try:
        if _serialize(numba):
            with _workqueue_lock:
                _launch(numba, kern, *args)
        else:
            _launch(numba, kern, *args)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - inputs are validated: this is the environment
        why = f"the numba kernels failed to compile or run ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
        _mark_broken(why)
        raise BackendFailure(why) from exc


def attention(q, k, v, rel_h, rel_w, k_size, scale):
    """softmax(scale * q k^T + rel_h[..., ky] + rel_w[..., kx]) v, fused.

    See ``relattn.backends`` for the contract.  Half-precision inputs are
    computed in float32 and rounded once at the end.  Output rows that come
    out NaN or infinite (only non-finite inputs, masked rows or overflow make
    them) are recomputed with the reference formula, so that they carry its
    exact IEEE result: the kernel normalises once at the end, the formula
    normalises each weight first, and the two differ where a weight x inf
    meets a weight that underflows.
    """
    if _broken is not None:
        raise BackendFailure(_broken)
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
    nonfinite = np.zeros((BH, Sq), dtype=np.bool_)
    _run(numba, kern, q3, k3, v3, rh3, rw3, has_rel, k_w, cdt(scale), tq, tk, out, nonfinite)
    if nonfinite.any():
        _formula_rows(out, nonfinite, q3, k3, v3, rh3 if has_rel else None, rw3 if has_rel else None,
                      (k_h, k_w), scale)
    out = out.reshape(B, H, Sq, d)
    if out.dtype != out_dtype:
        out = out.astype(out_dtype)
    return out


def _formula_rows(out, rows, q3, k3, v3, rh3, rw3, k_size, scale):
    """out[bh, i] = the reference backend's result, for each flagged row."""
    from . import reference

    for bh in np.flatnonzero(rows.any(axis=1)):
        idx = np.flatnonzero(rows[bh])
        terms = (None, None) if rh3 is None else (rh3[bh, idx][None, None], rw3[bh, idx][None, None])
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            out[bh, idx] = reference.attention(q3[bh, idx][None, None], k3[bh][None, None], v3[bh][None, None],
                                               *terms, k_size, scale)[0, 0]
