"""DLPack interop: other frameworks' tensors in, the same kind of tensor out.

CPU tensors become numpy arrays and CUDA tensors CuPy arrays, without copies
where the producer allows it; results go back through the caller's own
``from_dlpack``. No framework is imported unless the caller's tensor came from it.
"""

from __future__ import annotations

import importlib

import numpy as np

from relattn._arrays import is_array

_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13

# Install hints of the optional packages this module may need: "<what> needs ...".
_INSTALL_CUPY = ("needs the cupy package (pip install relattn[gpu] for CUDA 13, "
                 "or relattn[gpu-cuda12] for CUDA 12)")
_INSTALL_BF16 = "needs the ml_dtypes package (pip install relattn[bf16])"


def _framework(x) -> str:
    return type(x).__module__.split(".")[0]


def from_dlpack(name: str, x):
    """A numpy (CPU) or CuPy (CUDA) view of a DLPack-capable object."""
    if _framework(x) == "torch" and getattr(x, "requires_grad", False):
        x = x.detach()
    try:
        device_type, _ = x.__dlpack_device__()
    except Exception as exc:  # noqa: BLE001
        raise TypeError(f"{name}: could not read the DLPack device of {type(x).__name__} ({exc})") from None
    if device_type in (_DL_CPU, _DL_CUDA_HOST) and _is_torch_bfloat16(x):
        from relattn._arrays import BFLOAT16

        if BFLOAT16 is None:
            raise TypeError(f"{name}: a bfloat16 tensor {_INSTALL_BF16}")
    try:
        if device_type in (_DL_CPU, _DL_CUDA_HOST):
            return _host_from_dlpack(x)
        if device_type in (_DL_CUDA, _DL_CUDA_MANAGED):
            import cupy

            return cupy.from_dlpack(x)
    except ImportError:
        raise TypeError(f"{name}: a CUDA tensor {_INSTALL_CUPY}") from None
    except Exception as exc:  # noqa: BLE001
        raise TypeError(f"{name}: could not import {type(x).__name__} through DLPack ({exc})") from None
    raise TypeError(f"{name}: DLPack device type {device_type} is not supported (CPU and CUDA are)")


def _is_torch_bfloat16(x) -> bool:
    return _framework(x) == "torch" and str(getattr(x, "dtype", "")) == "torch.bfloat16"


def _host_from_dlpack(x):
    if _is_torch_bfloat16(x):
        # numpy has no bfloat16 DLPack code: share the bits as int16, view as ml_dtypes
        # (present: from_dlpack checked it).
        from relattn._arrays import BFLOAT16
        import torch

        return np.from_dlpack(x.view(torch.int16)).view(BFLOAT16)
    return np.from_dlpack(x)


def _to_torch(out):
    import torch

    from relattn._arrays import BFLOAT16

    if isinstance(out, np.ndarray) and BFLOAT16 is not None and out.dtype == BFLOAT16:
        return torch.from_dlpack(np.ascontiguousarray(out).view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(out)


def _converter(x):
    framework = _framework(x)
    if framework == "torch":
        return _to_torch
    if framework in ("jax", "jaxlib"):
        jnp = importlib.import_module("jax.numpy")
        return jnp.from_dlpack
    namespace = getattr(x, "__array_namespace__", None)
    if namespace is not None:
        return namespace().from_dlpack
    return lambda out: out


def wrap_result(name: str, x):
    """``(array, restore)``: ``x`` as numpy/CuPy, and a function that turns a
    result back into the caller's tensor type (identity for numpy/CuPy input)."""
    if is_array(x) or not (hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")):
        return x, _identity
    return from_dlpack(name, x), _converter(x)


def _identity(out):
    return out


def accepts_dlpack(arg_name: str):
    """Decorator: the argument ``arg_name`` (positional or keyword) decides the
    result type. DLPack tensors there are converted on the way in, and every
    array in the result (a single array or a tuple) is converted back."""

    def decorate(fn):
        import functools
        import inspect

        position = list(inspect.signature(fn).parameters).index(arg_name)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if position < len(args):
                value, restore = wrap_result(arg_name, args[position])
                args = (*args[:position], value, *args[position + 1 :])
            elif arg_name in kwargs:
                kwargs[arg_name], restore = wrap_result(arg_name, kwargs[arg_name])
            else:
                restore = _identity
            out = fn(*args, **kwargs)
            if restore is _identity:
                return out
            if isinstance(out, tuple):
                return tuple(restore(o) if is_array(o) else o for o in out)
            return restore(out)

        return wrapper

    return decorate
