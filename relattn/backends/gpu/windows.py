"""CuPy window partition and unpartition: one copy kernel each; and rows
copied between strided layouts (:func:`copy_rows`).

The kernels (``cuda/relattn_window.cu``) move whole words of up to 16 bytes:
the largest size dividing a token's bytes and both base addresses. Used by
:mod:`relattn.window` for CuPy arrays after its argument checks; any dtype.
The partition, and the merge of the attention's heads before the output
projection, can also append a tail of 8 values ``[1, 0, ..., 0]`` to every
16-bit token (:data:`TAIL`): the layer's projections take the bias as the
weight's tail column (:mod:`relattn.backends.gpu.cublas`).
"""

from __future__ import annotations

import threading

from relattn._cache import BoundedCache

# (bytes, C++ word type), largest first
_WORDS = ((16, "ra_w16"), (8, "unsigned long long"), (4, "unsigned int"), (2, "unsigned short"),
          (1, "unsigned char"))
# the kernel template of each direction (cuda/relattn_window.cu)
_KERNELS = {"partition": "relattn_window_partition", "unpartition": "relattn_window_unpartition",
            "merge_heads": "relattn_window_merge_heads", "copy_rows": "relattn_copy_rows"}
TAIL = 8   # values of a tail: 16 bytes of a 16-bit type
_lock = threading.Lock()
_functions: dict = {}   # (device, direction, word) -> kernel
_modules: list = []     # the modules behind them, kept loaded


def _kernel(direction: str, word: str):
    import cupy

    from relattn.backends.gpu._build import read_cuda

    dev = cupy.cuda.runtime.getDevice()
    fn = _functions.get((dev, direction, word))
    if fn is None:
        with _lock:
            if (dev, direction, word) not in _functions:
                names = {(d, w): f"{k}<{w}>" for d, k in _KERNELS.items() for _, w in _WORDS}
                mod = cupy.RawModule(code=read_cuda("relattn_window.cu"), options=("-std=c++17",),
                                     name_expressions=list(names.values()))
                _modules.append(mod)
                for (d, w), name in names.items():
                    _functions[(dev, d, w)] = mod.get_function(name)
            fn = _functions[(dev, direction, word)]
    return fn


def _copy_plan(direction, src, out_shape, H, W, ws, nh, nw, one=None):
    """``run(src) -> out``: one kernel moving ``src`` (any layout; made
    contiguous first when it is not) into a new array of ``out_shape``,
    decided from src's shape, dtype, contiguity and alignment; ``run`` takes
    arrays of src's memory layout (its shape may differ: only the address is
    read). ``one`` (partition and heads' merge, 16-bit src): the bits of 1 in
    src's type; each out token is followed by the tail [1, 0, ..., 0]
    (out_shape's last axis TAIL values longer). The launch's argument block is
    built here: a call allocates the output and writes two pointers."""
    import cupy
    import numpy as np

    from relattn.backends.gpu._build import RawLaunch
    from relattn.backends.gpu.cublas import contiguous

    dtype = src.dtype
    token = int(src.shape[-1]) * dtype.itemsize
    out_token = int(out_shape[-1]) * dtype.itemsize
    dense = src.flags.c_contiguous
    align = src.data.ptr if dense else 0   # a contiguous copy starts on 256 bytes
    total_bytes = out_token
    for n in out_shape[:-1]:
        total_bytes *= int(n)
    if total_bytes == 0:
        return lambda a: cupy.empty(out_shape, dtype=dtype)
    size, word = next((n, w) for n, w in _WORDS
                      if token % n == 0 and out_token % n == 0 and align % n == 0)
    total = total_bytes // size
    grid = (int(min((total + 255) // 256, 1 << 20)),)
    spec = ["ptr", "ptr", np.int64(total), np.int32(H), np.int32(W), np.int32(ws), np.int32(nh), np.int32(nw),
            np.int32(token // size)]
    if direction in ("partition", "merge_heads"):
        spec += [np.int32(out_token // size), np.uint32(0 if one is None else one)]
    launch = RawLaunch(_kernel(direction, word), grid, (256,), 0, spec)
    get_stream, empty = cupy.cuda.get_current_stream, cupy.empty

    def run(a):
        out = empty(out_shape, dtype=dtype)
        if not dense:
            a = contiguous(a)
        launch((a.data.ptr, out.data.ptr), (), get_stream().ptr)
        return out

    return run


def partition_plan(x, ws: int, hp: int, wp: int, tail: bool = False):
    """``run(x) -> windows`` (B * hp / ws * wp / ws, ws, ws, C) of arrays with
    x's signature (B, H, W, C), zero-padded to (hp, wp). ``tail`` (x float16 /
    bfloat16): each token (padding tokens too) followed by [1, 0, ..., 0],
    windows of C + TAIL values."""
    B, H, W, C = (int(n) for n in x.shape)
    nh, nw = hp // ws, wp // ws
    one = _one_bits(x.dtype) if tail else None
    return _copy_plan("partition", x, (B * nh * nw, ws, ws, C + (TAIL if tail else 0)), H, W, ws, nh, nw, one)


def tail_plan(x2d):
    """``run(x2d) -> (n, k + TAIL)``: rows of arrays with the signature of
    ``x2d`` (n, k), float16 / bfloat16, each followed by [1, 0, ..., 0]."""
    n, k = (int(d) for d in x2d.shape)
    # the partition's map with windows of one token over a 1 x n map is the identity
    return _copy_plan("partition", x2d, (n, 1, 1, k + TAIL), 1, n, 1, 1, n, _one_bits(x2d.dtype))


def merge_heads_plan(a, tail: bool = False):
    """``run(a) -> (B, S, heads * D)`` for arrays with the signature of the
    attention's ``a`` (B, heads, S, D): the heads side by side per token, as
    the output projection takes them; ``tail`` (16-bit a): each token followed
    by [1, 0, ..., 0]."""
    B, heads, S, D = (int(n) for n in a.shape)
    one = _one_bits(a.dtype) if tail else None
    # the kernel reads (H, W) as (heads, S); a token of the source is one head's row
    return _copy_plan("merge_heads", a, (B, S, heads * D + (TAIL if tail else 0)), heads, S, 1, 1, 1, one)


def _one_bits(dtype) -> int:
    from relattn._arrays import dtype_name

    bits = {"float16": 0x3C00, "bfloat16": 0x3F80}.get(dtype_name(dtype))
    if bits is None:
        raise TypeError(f"expected float16 or bfloat16 tokens, got {dtype_name(dtype)}")
    return bits


def unpartition_plan(windows, ws: int, hp: int, wp: int, H: int, W: int):
    """``run(windows) -> (B, H, W, C)`` for windows of a (B, hp, wp, C) map, the padding cropped."""
    nh, nw = hp // ws, wp // ws
    B, C = int(windows.shape[0]) // (nh * nw), int(windows.shape[3])
    return _copy_plan("unpartition", windows, (B, H, W, C), H, W, ws, nh, nw)


# The plans of the one-shot calls below, per signature of their source (a
# plan builds its launch's argument block once: the repeated calls of a
# training loop only allocate and launch).
_plans = BoundedCache(64)


def _signature(a):
    import cupy

    return (cupy.cuda.runtime.getDevice(), a.shape, a.strides, a.dtype.str, a.data.ptr & 15)


def partition(x, ws: int, hp: int, wp: int):
    """Windows of x (B, H, W, C), zero-padded to (hp, wp)."""
    key = ("partition", _signature(x), ws, hp, wp)
    return _plans.get_or_make(key, lambda: partition_plan(x, ws, hp, wp))(x)


def unpartition(windows, ws: int, hp: int, wp: int, H: int, W: int):
    """(B, H, W, C) from the windows of a (B, hp, wp, C) map, the padding cropped."""
    key = ("unpartition", _signature(windows), ws, hp, wp, H, W)
    return _plans.get_or_make(key, lambda: unpartition_plan(windows, ws, hp, wp, H, W))(windows)


def copy_rows(src, dst=None):
    """``dst[...] = src`` for CuPy arrays of one shape and dtype, at most 4
    axes, the last contiguous (unit stride) on both sides; ``dst`` None: a
    new C-contiguous array. One kernel moving words of up to 16 bytes (the
    largest dividing a row's bytes, every stride and both addresses), where
    CuPy's strided copy moves single elements: the heads' splits and merges
    of the layer's backward. Returns ``dst``."""
    import cupy

    if dst is None:
        dst = cupy.empty(src.shape, dtype=src.dtype)
    if dst.shape != src.shape or dst.dtype != src.dtype or src.ndim > 4 or src.ndim == 0 \
            or src.strides[-1] != src.itemsize or dst.strides[-1] != dst.itemsize:
        raise ValueError(f"copy_rows: src {src.shape} {src.strides} {src.dtype} and dst {dst.shape} {dst.strides} "
                         f"{dst.dtype}: same shape and dtype, at most 4 axes, the last contiguous")
    if src.size == 0:
        return dst
    key = ("copy_rows", _signature(src), _signature(dst))
    _plans.get_or_make(key, lambda: _rows_plan(src, dst))(src, dst)
    return dst


def _rows_plan(src, dst):
    import cupy
    import numpy as np

    from relattn.backends.gpu._build import RawLaunch

    shape = (1,) * (4 - src.ndim) + tuple(int(n) for n in src.shape)
    ss = (0,) * (4 - src.ndim) + tuple(int(n) for n in src.strides)
    ds = (0,) * (4 - dst.ndim) + tuple(int(n) for n in dst.strides)
    row = shape[3] * src.itemsize
    size, word = next((n, w) for n, w in _WORDS
                      if row % n == 0 and all(x % n == 0 for x in ss[:3] + ds[:3])
                      and src.data.ptr % n == 0 and dst.data.ptr % n == 0)
    total = shape[0] * shape[1] * shape[2] * (row // size)
    grid = (int(min((total + 255) // 256, 1 << 20)),)
    spec = ["ptr", "ptr", np.int64(total), np.int32(shape[1]), np.int32(shape[2]), np.int32(row // size),
            *(np.int64(x // size) for x in ss[:3] + ds[:3])]
    launch = RawLaunch(_kernel("copy_rows", word), grid, (256,), 0, spec)
    get_stream = cupy.cuda.get_current_stream

    def run(a, out):
        launch((a.data.ptr, out.data.ptr), (), get_stream().ptr)

    return run
