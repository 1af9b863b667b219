"""CuPy window partition and unpartition: one copy kernel each.

The kernels (``cuda/relattn_window.cu``) move whole words of up to 16 bytes:
the largest size dividing a token's bytes and both base addresses. Used by
:mod:`relattn.window` for CuPy arrays after its argument checks; any dtype.
"""

from __future__ import annotations

import threading

# (bytes, C++ word type), largest first
_WORDS = ((16, "ra_w16"), (8, "unsigned long long"), (4, "unsigned int"), (2, "unsigned short"),
          (1, "unsigned char"))
_DIRECTIONS = ("partition", "unpartition")
_lock = threading.Lock()
_functions: dict = {}   # (device, direction, word) -> kernel
_modules: list = []     # the modules behind them, kept loaded


def _kernel(direction: str, word: str):
    import cupy

    from relattn.backends.cupy_gpu import read_cuda

    dev = cupy.cuda.runtime.getDevice()
    fn = _functions.get((dev, direction, word))
    if fn is None:
        with _lock:
            if (dev, direction, word) not in _functions:
                names = {(d, w): f"relattn_window_{d}<{w}>" for d in _DIRECTIONS for _, w in _WORDS}
                mod = cupy.RawModule(code=read_cuda("relattn_window.cu"), options=("-std=c++17",),
                                     name_expressions=list(names.values()))
                _modules.append(mod)
                for (d, w), name in names.items():
                    _functions[(dev, d, w)] = mod.get_function(name)
            fn = _functions[(dev, direction, word)]
    return fn


def _copy(direction, src, out, H, W, ws, nh, nw):
    """Launch one kernel moving ``src`` (contiguous) into ``out`` (new)."""
    import cupy
    import numpy as np

    token = int(src.shape[-1]) * src.dtype.itemsize
    total_bytes = out.size * out.dtype.itemsize
    if total_bytes == 0:
        return out
    size, word = next((n, w) for n, w in _WORDS
                      if token % n == 0 and src.data.ptr % n == 0 and out.data.ptr % n == 0)
    total = total_bytes // size
    blocks = int(min((total + 255) // 256, 1 << 20))
    _kernel(direction, word)((blocks,), (256,), (
        src.view(cupy.uint8), out.view(cupy.uint8), np.int64(total),
        np.int32(H), np.int32(W), np.int32(ws), np.int32(nh), np.int32(nw), np.int32(token // size)))
    return out


def _dense(x):
    """x as a C-contiguous array, copied as raw bits (any dtype, bfloat16 too)."""
    import cupy

    if x.flags.c_contiguous:
        return x
    bits = {1: cupy.uint8, 2: cupy.uint16, 4: cupy.uint32, 8: cupy.uint64}.get(x.dtype.itemsize)
    if bits is None:
        return cupy.ascontiguousarray(x)
    return cupy.ascontiguousarray(x.view(bits)).view(x.dtype)


def partition(x, ws: int, hp: int, wp: int):
    """Windows (B * hp / ws * wp / ws, ws, ws, C) of x (B, H, W, C), zero-padded to (hp, wp)."""
    import cupy

    B, H, W, C = (int(n) for n in x.shape)
    nh, nw = hp // ws, wp // ws
    out = cupy.empty((B * nh * nw, ws, ws, C), dtype=x.dtype)
    return _copy("partition", _dense(x), out, H, W, ws, nh, nw)


def unpartition(windows, ws: int, hp: int, wp: int, H: int, W: int):
    """(B, H, W, C) from the windows of a (B, hp, wp, C) map, the padding cropped."""
    import cupy

    nh, nw = hp // ws, wp // ws
    B, C = int(windows.shape[0]) // (nh * nw), int(windows.shape[3])
    out = cupy.empty((B, H, W, C), dtype=windows.dtype)
    return _copy("unpartition", _dense(windows), out, H, W, ws, nh, nw)
