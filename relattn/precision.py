"""How float32 attention runs on the GPU: exact FMA or TF32 tensor cores.

Half-precision inputs always run on tensor cores with float32 accumulation;
float64 always runs exact FMA. For float32 CuPy inputs there are three modes:

``"fma"`` (default)
    Plain float32 fused multiply-adds on the CUDA cores: the exact float32 path.
``"3xtf32"``
    Tensor cores, each operand split as ``x = x_big + x_small`` (both TF32) and
    every product taken as ``a_big b_big + a_big b_small + a_small b_big``:
    float32-level error (measured on the device; see docs/benchmarks.md) at a
    fraction of the FMA path's time.
``"tf32"``
    Opt-in plain TF32 (10-bit mantissa operands, float32 accumulation), like
    PyTorch's ``allow_tf32``: the fastest, with relative errors around 1e-3.

The mode is per thread and per asyncio task (a :mod:`contextvars` variable).
"""

from __future__ import annotations

import contextlib
import contextvars

__all__ = ["GPU_FLOAT32_MODES", "get_gpu_float32_mode", "set_gpu_float32_mode", "gpu_float32_mode"]

GPU_FLOAT32_MODES = ("fma", "3xtf32", "tf32")
_mode = contextvars.ContextVar("relattn_gpu_float32_mode", default="fma")


def _check(mode):
    if not isinstance(mode, str):
        raise TypeError(f"mode: expected one of {GPU_FLOAT32_MODES}, got {type(mode).__name__}")
    if mode not in GPU_FLOAT32_MODES:
        raise ValueError(f"mode: expected one of {GPU_FLOAT32_MODES}, got {mode!r}")
    return mode


def get_gpu_float32_mode() -> str:
    """The current float32 GPU mode.

    Returns
    -------
    str
        ``"fma"``, ``"3xtf32"`` or ``"tf32"``.

    Examples
    --------
    >>> import relattn
    >>> relattn.get_gpu_float32_mode()
    'fma'
    """
    return _mode.get()


def set_gpu_float32_mode(mode: str) -> None:
    """Set how float32 CuPy inputs run (see :mod:`relattn.precision`).

    Parameters
    ----------
    mode : {"fma", "3xtf32", "tf32"}

    Returns
    -------
    None

    Raises
    ------
    ValueError, TypeError
        For any other value.

    Examples
    --------
    >>> import relattn
    >>> relattn.set_gpu_float32_mode("3xtf32")
    >>> relattn.get_gpu_float32_mode()
    '3xtf32'
    >>> relattn.set_gpu_float32_mode("fma")
    """
    _mode.set(_check(mode))


@contextlib.contextmanager
def gpu_float32_mode(mode: str):
    """Run a block with another float32 GPU mode, then restore the previous one.

    Parameters
    ----------
    mode : {"fma", "3xtf32", "tf32"}

    Returns
    -------
    context manager
        Yields ``mode``; the previous mode is restored on exit, also on error.

    Examples
    --------
    >>> import relattn
    >>> with relattn.gpu_float32_mode("tf32"):
    ...     relattn.get_gpu_float32_mode()
    'tf32'
    >>> relattn.get_gpu_float32_mode()
    'fma'
    """
    token = _mode.set(_check(mode))
    try:
        yield mode
    finally:
        _mode.reset(token)
