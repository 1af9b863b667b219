"""How float32 attention runs on the GPU: float32-accurate or plain TF32.

Half-precision inputs always run on tensor cores with float32 accumulation;
float64 always runs exact FMA. For float32 CuPy inputs there are three modes:

``"3xtf32"`` (default)
    Tensor cores, each operand split as ``x = x_big + x_small`` (``x_big`` is
    ``x`` rounded to TF32, ``x_small = x - x_big``) and every product taken as
    ``a_big b_big + a_big b_small + a_small b_big``, summed in float32, each key
    tile's ``P V`` added to the output with a float32 FMA: float32-level error
    (H100, SAM-B global: 2.0e-6 relative to a float64 evaluation, the FMA
    path 3.2e-6; see docs/benchmarks.md) at about half the FMA path's time.
    GPUs without TF32 tensor cores (compute capability below 8.0) run ``"fma"``.
``"fma"``
    Plain float32 fused multiply-adds on the CUDA cores: every product and sum
    an IEEE float32 operation.
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
_mode = contextvars.ContextVar("relattn_gpu_float32_mode", default="3xtf32")


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
    '3xtf32'
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
    >>> relattn.set_gpu_float32_mode("fma")
    >>> relattn.get_gpu_float32_mode()
    'fma'
    >>> relattn.set_gpu_float32_mode("3xtf32")
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
    '3xtf32'
    """
    token = _mode.set(_check(mode))
    try:
        yield mode
    finally:
        _mode.reset(token)
