"""GPU helpers for the layer's projections in half precision.

CuPy 14's bfloat16 support is minimal (``x_bf16 @ w_bf16`` raises), so the
``Attention`` layer calls cuBLAS ``gemmEx`` directly: bf16/fp16 operands,
float32 accumulation and output (bias folded in through ``beta = 1``), then one
rounding to the half type, as PyTorch's half-precision ``nn.Linear`` does.
Casts to and from bfloat16 go through the bit patterns (round to nearest even)
where CuPy's own ``astype`` cannot do them.
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

# float32 (+ bias per column) -> one rounding to float16 / bfloat16, in one pass
_ROUND_SRC = r"""
extern "C" __global__ void relattn_bias_round(const float* __restrict__ x, const float* __restrict__ bias,
                                              unsigned short* __restrict__ y, long long n, int m,
                                              int has_bias, int to_bf16) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float f = x[i];
        if (has_bias) f += bias[(int)(i % m)];
        unsigned short h;
        if (to_bf16) {
            const unsigned int u = __float_as_uint(f);
            h = ((u & 0x7fffffffu) > 0x7f800000u) ? (unsigned short)((u >> 16) | 0x40u)
                                                  : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        } else {
            asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        }
        y[i] = h;
    }
}
"""


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


def linear_half(x2d, weight, bias, dtype):
    """``x2d @ weight.T + bias`` rounded once to ``dtype`` (float16 / bfloat16).

    Same arithmetic as ``from_float32(linear(x2d, weight, bias), dtype)`` (float32
    accumulation, float32 bias add, one rounding) with two launches: the
    cuBLAS product and one pass that adds the bias and rounds.
    """
    x2d, n, m, k, code = _operands(x2d, weight)
    return linear_half_plan(n, weight, bias, dtype)(x2d)


def linear_half_plan(n, weight, bias, dtype):
    """``run(x2d) -> x2d @ weight.T + bias`` as :func:`linear_half` does it, for
    C-contiguous ``x2d`` of shape ``(n, k)`` and weight's dtype: the kernel, its
    grid and scalar arguments and the cuBLAS operation decided once."""
    import cupy

    m, k = (int(d) for d in weight.shape)
    code = _type_code(weight.dtype)
    if n == 0 or m == 0:
        return lambda x2d: cupy.empty((n, m), dtype=np.uint16).view(dtype)
    fn = _kernels.get("bias_round")
    if fn is None:
        fn = _kernels.setdefault("bias_round", cupy.RawKernel(_ROUND_SRC, "relattn_bias_round"))
    total = n * m
    grid = (int(min((total + 255) // 256, 65536)),)
    has_bias = bias is not None
    tail = (np.int64(total), np.int32(m), np.int32(has_bias), np.int32(dtype_name(dtype) == "bfloat16"))
    f32, u16 = np.float32, np.uint16

    def run(x2d):
        acc = cupy.empty((n, m), dtype=f32)
        out = cupy.empty((n, m), dtype=u16)
        _gemm(x2d, weight, acc, code, n, m, k, _ZERO_PTR)
        fn(grid, (256,), (acc, bias if has_bias else acc, out) + tail)
        return out.view(dtype)

    return run


def _gemm(x2d, weight, out, code, n, m, k, beta):
    """out = x2d @ weight.T (+ out when beta points at 1), float32 accumulation."""
    import cupy

    lib, entry = _cublas_handle()
    _set_stream(lib, entry, cupy.cuda.get_current_stream().ptr)
    handle = entry[0]
    # Row-major Y (n, m) is column-major Y^T (m, n) = W (m, k) @ X^T (k, n).
    _check(lib.cublasGemmEx(handle, _CUBLAS_OP_T, _CUBLAS_OP_N, m, n, k,
                            _ONE_PTR, weight.data.ptr, code, k,
                            x2d.data.ptr, code, k,
                            beta, out.data.ptr, _CUDA_R_32F, m,
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
