"""How arrays reach the kernels: views, copies and scalar arguments.

A plan decides from the first call's arrays (shape, strides, dtype, 16-byte
alignment) which of these ``prep`` functions each operand needs; a planned
call then only applies them, so no decision is made per call.
"""

from __future__ import annotations

from relattn._arrays import dtype_name

LOG2E = 1.4426950408889634


def dtype_of(a) -> str:
    try:
        return dtype_name(a.dtype)   # cached: numpy's dtype.name is slow Python
    except Exception:
        return str(getattr(a, "dtype", "?"))


def pad16(d: int) -> int:
    return max(16, (d + 15) // 16 * 16)


def same(x):
    return x


def u16(x):
    import cupy

    return x.view(cupy.uint16)


def u16_copy(x):
    import cupy

    return x.view(cupy.uint16).copy()


def copy(x):
    return x.copy()  # C order, a fresh (aligned) allocation


def contiguous(x):
    import cupy

    return cupy.ascontiguousarray(x)


def padded(x, width):
    """x with its last axis zero-padded to ``width``."""
    import cupy

    p = cupy.zeros(x.shape[:-1] + (width,), dtype=x.dtype)
    p[..., : x.shape[-1]] = x
    return p


def operand_prep(x, width, align):
    """How the tensor-core kernels get x: ``(prep, strides)``, where prep(x) is
    a view or copy with last stride 1, the first three strides multiples of
    ``align`` elements, a 16-byte aligned base and the last axis ``width`` long
    (zero-padded), and strides are prep(x)'s element strides (axes 0-2). 16-bit
    dtypes are read as uint16."""
    half = x.dtype.itemsize == 2
    d = int(x.shape[-1])
    B, H, S = (int(n) for n in x.shape[:3])
    dense = [H * S * width, S * width, width]
    if d != width:
        prep = (lambda a: padded(u16(a), width)) if half else (lambda a: padded(a, width))
        return prep, dense
    st = elem_strides(x)[:3]
    ok = (x.strides[-1] == x.dtype.itemsize or d == 1) and all(s % align == 0 for s in st) \
        and x.data.ptr % 16 == 0
    if ok:
        return (u16 if half else same), st
    return (u16_copy if half else copy), dense


def dense_prep(x, dtype=None):
    """prep(a) -> a as a C-contiguous array of ``dtype`` (x's own when None),
    decided from x: a no-op when x is one."""
    import cupy
    import numpy as np

    dtype = x.dtype if dtype is None else np.dtype(dtype)
    if x.dtype == dtype:
        return same if x.flags.c_contiguous else contiguous
    if dtype_of(x) == "bfloat16" and dtype == np.float32:
        return bf16_to_f32
    return lambda a: cupy.ascontiguousarray(a, dtype=dtype)


def table_prep(x):
    """prep(a) -> a 16-bit table as a C-contiguous uint16 view with a 16-byte
    aligned base (the fused kernels copy its rows with 16-byte cp.async),
    decided from x: a copy when x is not one already."""
    if x.flags.c_contiguous and x.data.ptr % 16 == 0:
        return u16
    return lambda a: u16(a.copy())


def bf16_to_f32(t):
    import cupy

    return (cupy.ascontiguousarray(t).view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32)


def elem_strides(x):
    isz = x.dtype.itemsize
    return [s // isz for s in x.strides]


def i64(x):
    import numpy as np

    return np.int64(x)


def ints(*values):
    """Scalar kernel arguments: int32 sizes."""
    import numpy as np

    return tuple(np.int32(x) for x in values)




def core_tail(H, Sq, Sk, D, kh, kw, strides):
    """The scalar arguments every attention kernel takes after its pointers."""
    return ints(H, Sq, Sk, D, kh, kw) + tuple(i64(s) for s in strides)


def terms_prep(has_terms: bool, dtype):
    """``prep(rel_h, rel_w) -> (rel_h, rel_w)`` as a kernel reads the terms:
    C-contiguous arrays of ``dtype``, how decided from the first call's terms
    (a plan's terms step makes them alike on every call); without terms, a
    one-element array in their place."""
    import cupy

    if not has_terms:
        dummy = cupy.zeros((1,), dtype=dtype)
        return lambda rel_h, rel_w: (dummy, dummy)
    preps = []

    def prep(rel_h, rel_w):
        if not preps:
            preps.extend((dense_prep(rel_h, dtype), dense_prep(rel_w, dtype)))
        return preps[0](rel_h), preps[1](rel_w)

    return prep
