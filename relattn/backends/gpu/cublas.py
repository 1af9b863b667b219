"""GPU helpers for the layer's projections in half precision.

CuPy 14's bfloat16 support is minimal (``x_bf16 @ w_bf16`` raises), so the
``Attention`` layer calls cuBLAS ``gemmEx`` directly: bf16/fp16 operands,
float32 accumulation, and the product written in the half type by cuBLAS (one
rounding). A bias is the half type's, as a half-precision ``nn.Linear`` holds
it, and goes inside the product: each input row gets a tail ``[1, 0, ..., 0]``
(8 values, :data:`relattn.backends.gpu.windows.TAIL`) and the weight the
tail column ``[bias, 0, ..., 0]``, so that ``[x, 1] @ [W, b].T = x @ W.T + b``
is one float32 sum rounded once, with no output-sized bias buffer. (Adding a
bias through cuBLAS's ``beta = 1`` rounds the product to the half type before
the addition for some shapes.) In the layer, the window partition and the
merge of the attention's heads write the tail as they copy the tokens. Casts
to and from bfloat16 go through the bit patterns (round to nearest even) where
CuPy's own ``astype`` cannot do them.
"""

from __future__ import annotations

import threading

import numpy as np

from relattn._arrays import dtype_name

_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_GEMM_DEFAULT = -1
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1

_kernels: dict = {}
_ONE = np.ones((), dtype=np.float32)
_ONE_PTR = _ONE.ctypes.data    # host scalars for cuBLAS (module constants: never freed)
_ZERO = np.zeros((), dtype=np.float32)
_ZERO_PTR = _ZERO.ctypes.data


def _type_code(dtype) -> int:
    name = dtype_name(dtype)
    if name == "float16":
        return _CUDA_R_16F
    if name == "bfloat16":
        return _CUDA_R_16BF
    raise TypeError(f"expected float16 or bfloat16 operands, got {name}")


def _operands(x2d, weight):
    n, k = x2d.shape
    m = weight.shape[0]
    code = _type_code(x2d.dtype)
    if x2d.dtype != weight.dtype or weight.shape[1] != k:
        raise ValueError(f"weight: expected ({m}, {k}) {x2d.dtype}, got {weight.shape} {weight.dtype}")
    return contiguous(x2d), n, m, k, code


def linear(x2d, weight, bias=None):
    """``x2d @ weight.T + bias`` in float32 from half-precision CuPy operands.

    Parameters
    ----------
    x2d : cupy.ndarray, shape (n, k), float16 or bfloat16, C-contiguous
    weight : cupy.ndarray, shape (m, k), same dtype, C-contiguous
    bias : cupy.ndarray, shape (m,), float32, optional

    Returns
    -------
    cupy.ndarray, shape (n, m), float32
    """
    import cupy

    x2d, n, m, k, code = _operands(x2d, weight)
    out = cupy.empty((n, m), dtype=np.float32)
    if bias is not None:
        out[...] = bias
    if n == 0 or m == 0:
        return out
    _gemm(x2d, weight, out, code, n, m, k, _ZERO_PTR if bias is None else _ONE_PTR)
    return out


def linear_tn(a, b):
    """``a.T @ b`` in float32 from half-precision CuPy operands ``a`` (n, m)
    and ``b`` (n, k) of one dtype: a linear layer's weight gradient
    ``dy.T @ x``, with cuBLAS reading both operands transposed in place (no
    copy of either).

    Returns
    -------
    cupy.ndarray, shape (m, k), float32
    """
    import cupy

    n, m = (int(d) for d in a.shape)
    k = int(b.shape[1])
    code = _type_code(a.dtype)
    if b.dtype != a.dtype or int(b.shape[0]) != n:
        raise ValueError(f"b: expected ({n}, k) {a.dtype}, got {b.shape} {b.dtype}")
    a, b = contiguous(a), contiguous(b)
    out = cupy.empty((m, k), dtype=np.float32)
    if m == 0 or k == 0:
        return out
    if n == 0:
        out.fill(0)
        return out
    lib, entry = _cublas_handle()
    _set_stream(lib, entry, cupy.cuda.get_current_stream().ptr)
    # Row-major out (m, k) is column-major out^T (k, m) = b^T (k, n) @ a (n, m),
    # b^T being row-major b read column-major and a row-major a read transposed.
    _check(lib.cublasGemmEx(entry[0], _CUBLAS_OP_N, _CUBLAS_OP_T, k, m, n,
                            _ONE_PTR, b.data.ptr, code, k,
                            a.data.ptr, code, m,
                            _ZERO_PTR, out.data.ptr, _CUDA_R_32F, k,
                            _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT), "cublasGemmEx")
    return out


_ONES_MAX = 16
_ones: dict = {}


def ones_column(n, dtype):
    """An (n, 8) array of ``dtype`` (float16 / bfloat16) whose rows are [1, 0,
    ..., 0], kept per (device, n, dtype): :func:`column_sums`' operand. A
    caller that captures a graph reading it keeps a reference."""
    import cupy

    from relattn.backends.gpu.windows import _one_bits

    key = (cupy.cuda.runtime.getDevice(), int(n), np.dtype(dtype).str)
    ones = _ones.get(key)
    if ones is None:
        bits = cupy.zeros((int(n), 8), dtype=cupy.uint16)
        bits[:, 0] = _one_bits(dtype)
        if len(_ones) >= _ONES_MAX:
            _ones.clear()
        ones = _ones.setdefault(key, bits.view(dtype))
    return ones


def column_sums(a, ones):
    """``a.sum(axis=0)`` in float32 of a half-precision (n, m) CuPy array, as
    cuBLAS's product ``a^T ones`` with ``ones`` from :func:`ones_column` (one
    read of ``a``, float32 accumulation): a linear layer's bias gradient.
    Returns a contiguous (m,) float32 array."""
    return linear_tn(a, ones)[:, 0].copy()


def linear_half(x2d, weight, bias, dtype):
    """``x2d @ weight.T + bias`` rounded once to ``dtype`` (float16 / bfloat16).

    The arithmetic of a half-precision ``nn.Linear``: float32 accumulation,
    the bias rounded to ``dtype`` and added inside the float32 sum, one
    rounding, written by cuBLAS. ``bias`` may be float32 (it is rounded) or of
    ``dtype``.
    """
    x2d, n, m, k, code = _operands(x2d, weight)
    return linear_half_plan(n, weight, bias, dtype)(x2d)


def linear_half_plan(n, weight, bias, dtype):
    """``run(x2d) -> x2d @ weight.T + bias`` as :func:`linear_half` does it
    (a :class:`HalfLinear`)."""
    return HalfLinear(n, weight, bias, dtype)


class HalfLinear:
    """``run(x2d) -> x2d @ weight.T + bias`` as :func:`linear_half` does it, for
    C-contiguous ``x2d`` of shape ``(n, k)`` and weight's dtype: the weight
    with its bias column and the cuBLAS operation decided once.

    With a bias, ``run.tail`` is True and ``run.tailed(xt)`` takes rows that
    already carry the tail (``(n, k + TAIL)``, as the window partition's
    ``tail=True`` writes them); ``run(x2d)`` appends it by one copy first.
    """

    def __init__(self, n, weight, bias, dtype):
        import cupy

        from relattn.backends.gpu.windows import TAIL

        self.n = int(n)
        self.m, self.k = (int(d) for d in weight.shape)
        self.code = _type_code(weight.dtype)
        self.dtype = dtype
        self.tail = bias is not None
        self.weight = weight
        self._tail_copy = None
        if self.tail and self.n and self.m:
            self.weight = cupy.zeros((self.m, self.k + TAIL), dtype=np.uint16).view(dtype)
            self.load(weight, bias)

    def load(self, weight, bias):
        """Write ``weight`` and ``bias`` (their values; the shapes and dtypes of
        the construction's) into the operand the product reads, in place (a
        captured graph's launches keep reading it). Without a bias the operand
        is ``weight`` itself: nothing to copy."""
        if self.weight is weight:
            return
        wt = self.weight.view(np.uint16)
        wt[:, :self.k] = contiguous(weight).view(np.uint16)
        wt[:, self.k] = contiguous(bias if bias.dtype == self.dtype else from_float32(bias, self.dtype)).view(np.uint16)

    def __call__(self, x2d):
        if self.tail and self.n and self.m:
            if self._tail_copy is None:
                from relattn.backends.gpu.windows import tail_plan

                self._tail_copy = tail_plan(x2d)
            return self.tailed(self._tail_copy(x2d).reshape(self.n, int(self.weight.shape[1])))
        return self._product(x2d, self.k)

    def tailed(self, xt):
        return self._product(xt, int(self.weight.shape[1]))

    def _product(self, x2d, k):
        import cupy

        out = cupy.empty((self.n, self.m), dtype=np.uint16)
        if self.n and self.m:
            _gemm(x2d, self.weight, out, self.code, self.n, self.m, k, _ZERO_PTR, self.code)
        return out.view(self.dtype)


def _gemm(x2d, weight, out, code, n, m, k, beta, out_code=_CUDA_R_32F):
    """out = x2d @ weight.T (+ out when beta points at 1), float32 accumulation;
    x2d (n, k), weight (m, k) C-contiguous;
    out float32 (``out_code``: that of x2d's half type for a half out, one rounding)."""
    import cupy

    lib, entry = _cublas_handle()
    _set_stream(lib, entry, cupy.cuda.get_current_stream().ptr)
    handle = entry[0]
    # Row-major Y (n, m) is column-major Y^T (m, n) = W (m, k) @ X^T (k, n).
    _check(lib.cublasGemmEx(handle, _CUBLAS_OP_T, _CUBLAS_OP_N, m, n, k,
                            _ONE_PTR, weight.data.ptr, code, k,
                            x2d.data.ptr, code, k,
                            beta, out.data.ptr, out_code, m,
                            _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT), "cublasGemmEx")


# cuBLAS through ctypes, on a handle of relattn's own per thread and device,
# with a workspace of its own: CuPy refuses its cuBLAS calls while a stream is
# being captured into a CUDA graph (Attention.capture), and cuBLAS itself
# captures only with a user workspace (no allocation inside the graph).
_WORKSPACE_BYTES = 32 * 2**20
_lib: list = []
_local = threading.local()
_workspaces: list = []   # kept for the life of the process: handles point at them


def _cublas_library():
    if not _lib:
        import ctypes
        import ctypes.util

        import cupy

        cupy.cuda.device.get_cublas_handle()   # CuPy loads cuBLAS: use the same library
        path = None
        try:
            with open("/proc/self/maps") as fh:
                for line in fh:
                    if "libcublas.so" in line and "libcublasLt" not in line:
                        path = line.split()[-1]
                        break
        except OSError:
            pass
        lib = ctypes.CDLL(path or ctypes.util.find_library("cublas"))
        vp, i = ctypes.c_void_p, ctypes.c_int
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
        lib.cublasSetStream_v2.argtypes = [vp, vp]
        lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
        lib.cublasSetPointerMode_v2.argtypes = [vp, i]
        lib.cublasGemmEx.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
        _lib.append(lib)
    return _lib[0]


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"relattn: {what} failed (cuBLAS status {status})")


def _cublas_handle():
    import ctypes

    import cupy

    lib = _cublas_library()
    dev = cupy.cuda.runtime.getDevice()
    handles = getattr(_local, "handles", None)
    if handles is None:
        handles = _local.handles = {}
    entry = handles.get(dev)
    if entry is None:
        h = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(h)), "cublasCreate")
        _check(lib.cublasSetPointerMode_v2(h, 0), "cublasSetPointerMode")   # host scalars
        ws = cupy.empty((_WORKSPACE_BYTES,), dtype=cupy.uint8)
        _workspaces.append(ws)
        entry = handles[dev] = [h, None, ws]
    return lib, entry


def _set_stream(lib, entry, stream_ptr):
    """Bind the handle to the stream; cuBLAS resets the workspace on a stream
    change, so it is set again."""
    if entry[1] != stream_ptr:
        _check(lib.cublasSetStream_v2(entry[0], stream_ptr), "cublasSetStream")
        _check(lib.cublasSetWorkspace_v2(entry[0], entry[2].data.ptr, _WORKSPACE_BYTES), "cublasSetWorkspace")
        entry[1] = stream_ptr


def contiguous(x):
    """x itself when C-contiguous, else a C-contiguous copy of the CuPy array,
    moving raw bits (any dtype, bfloat16 too)."""
    import cupy

    if x.flags.c_contiguous:
        return x
    if 1 <= x.ndim <= 4 and x.strides[-1] == x.itemsize and x.size:   # rows: whole words at a time
        from relattn.backends.gpu.windows import copy_rows

        return copy_rows(x)
    bits = {1: cupy.uint8, 2: cupy.uint16, 4: cupy.uint32, 8: cupy.uint64}.get(x.dtype.itemsize)
    if bits is None:
        return cupy.ascontiguousarray(x)
    return cupy.ascontiguousarray(x.view(bits)).view(x.dtype)


def _elementwise(name, in_params, out_params, body):
    import cupy

    key = name
    if key not in _kernels:
        _kernels[key] = cupy.ElementwiseKernel(in_params, out_params, body, name)
    return _kernels[key]


def to_float32(x):
    """float32 copy of a half-precision CuPy array (bfloat16 through its bits)."""
    import cupy

    if x.dtype == np.float32:
        return x
    if np.dtype(x.dtype).name == "bfloat16":
        widen = _elementwise("relattn_bf16_to_f32", "uint16 h", "uint32 f", "f = ((unsigned int)h) << 16")
        return widen(x.view(cupy.uint16)).view(cupy.float32)
    return x.astype(cupy.float32)


def cast_into(src, dst):
    """``dst[...] = src`` rounded once to dst's dtype (nearest even), as numpy
    casts on the host (some ml_dtypes releases round float64 -> bfloat16 twice,
    through float32); float64, float32, float16 and bfloat16. A
    16-bit destination from float64 goes through float32 rounded to odd (from
    the float64 bits, in integer arithmetic), which keeps the one rounding
    exact. float64 -> float32 and float16 -> float32 are PTX conversions of
    their own: CuPy compiles its kernels to flush float32 subnormals to zero."""
    if src.dtype == dst.dtype:
        if dst.dtype.itemsize == 2:
            dst.view(np.uint16)[...] = src.view(np.uint16)
        else:
            dst[...] = src
        return
    if src.dtype == np.float64:
        if dst.dtype == np.float32:
            _elementwise("relattn_f64_to_f32", "float64 d", "uint32 f",
                         "float r; asm(\"cvt.rn.f32.f64 %0, %1;\" : \"=f\"(r) : \"d\"(d)); f = __float_as_uint(r);",
                         )(src, dst.view(np.uint32))
            return
        # float32 rounded to odd from the float64 bits, in integers: the truncated
        # value with its last bit set where bits were dropped (subnormal results
        # and overflow too: past the float32 range the largest float32, odd)
        wide = _elementwise(
            "relattn_f64_to_f32_odd", "uint64 b", "uint32 f",
            "unsigned long long e = (b >> 52) & 0x7ffull, m = b & 0xfffffffffffffull; unsigned int r;"
            " long long e32 = (long long)e - 896;"
            " if (e == 0x7ffull) r = m ? 0x7fc00000u : 0x7f800000u;"
            " else if (e == 0ull) r = m ? 1u : 0u;"
            " else if (e32 >= 255) r = 0x7f7fffffu;"
            " else if (e32 >= 1) r = ((unsigned int)e32 << 23) | (unsigned int)(m >> 29) | ((m & 0x1fffffffull) ? 1u : 0u);"
            " else { long long sh = 30 - e32; unsigned long long M = m | (1ull << 52);"
            "        r = sh >= 64 ? 1u : (unsigned int)(M >> sh) | ((M & ((1ull << sh) - 1ull)) ? 1u : 0u); }"
            " f = r | ((unsigned int)(b >> 63) << 31);",
        )(src.view(np.uint64)).view(np.float32)
    elif src.dtype == np.float16:   # exact, subnormals too
        wide = _elementwise("relattn_f16_to_f32", "uint16 h", "uint32 f",
                            "float r; asm(\"cvt.f32.f16 %0, %1;\" : \"=f\"(r) : \"h\"(h)); f = __float_as_uint(r);",
                            )(src.view(np.uint16)).view(np.float32)
    else:
        wide = to_float32(src)   # bfloat16: exact, through its bits
    if dst.dtype == np.float32:
        dst[...] = wide
    else:
        dst.view(np.uint16)[...] = from_float32(wide, dst.dtype).view(np.uint16)


def from_float32(x, dtype):
    """Round a float32 CuPy array once to ``dtype`` (bfloat16: nearest even, NaN kept)."""
    import cupy

    if np.dtype(dtype).name != "bfloat16":
        return x.astype(dtype)
    narrow = _elementwise(
        "relattn_f32_to_bf16", "uint32 f", "uint16 h",
        "if ((f & 0x7fffffffu) > 0x7f800000u) { h = (unsigned short)((f >> 16) | 0x40u); }"
        " else { h = (unsigned short)((f + 0x7fffu + ((f >> 16) & 1u)) >> 16); }",
    )
    return narrow(cupy.ascontiguousarray(x).view(cupy.uint32)).view(dtype)
