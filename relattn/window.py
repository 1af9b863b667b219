"""SAM's window partition and its inverse."""

from __future__ import annotations

import numpy as np

from relattn._interop import accepts_dlpack
from relattn._arrays import array_module, as_array, check_alloc, check_positive_int, check_size2

__all__ = ["window_partition", "window_unpartition"]


def _check_channels_last(name: str, x):
    x = as_array(name, x)
    if x.ndim != 4:
        raise ValueError(f"{name}: expected a 4-D (B, H, W, C) array, got shape {tuple(x.shape)} ({x.ndim}-D)")
    return x


@accepts_dlpack("x")
def window_partition(x, window_size):
    """Split a channels-last feature map into non-overlapping square windows.

    As in SAM: zeros are padded at the bottom and right up to a multiple of
    ``window_size``, and windows come out in (batch, window row, window column)
    order. Padded tokens are not masked by anything downstream; they take part
    in the attention of border windows exactly as in SAM.

    Parameters
    ----------
    x : array, shape (B, H, W, C)
        numpy or CuPy array, any dtype.
    window_size : int
        Window side ``ws >= 1``.

    Returns
    -------
    windows : array, shape (B * Hp // ws * Wp // ws, ws, ws, C)
        A new array of ``x``'s type and dtype.
    pad_hw : (int, int)
        The padded size ``(Hp, Wp)``.

    Examples
    --------
    >>> import numpy as np, relattn
    >>> x = np.ones((1, 5, 6, 2), np.float32)
    >>> windows, pad_hw = relattn.window_partition(x, 4)
    >>> windows.shape, pad_hw
    ((4, 4, 4, 2), (8, 8))
    """
    x = _check_channels_last("x", x)
    ws = check_positive_int("window_size", window_size)
    xp = array_module(x)
    batch, height, width, channels = x.shape
    if height < 1 or width < 1:
        raise ValueError(f"x: expected H, W >= 1, got shape {tuple(x.shape)}")
    hp, wp = padded_size(x.shape, x.dtype.itemsize, ws)
    pad_h, pad_w = hp - height, wp - width
    if xp is not np:  # one copy kernel on the GPU
        from relattn.backends.gpu import windows as _window_gpu

        return _window_gpu.partition(x, ws, hp, wp), (hp, wp)
    if pad_h or pad_w:
        x = xp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    windows = x.reshape(batch, hp // ws, ws, wp // ws, ws, channels).transpose(0, 1, 3, 2, 4, 5)
    windows = xp.ascontiguousarray(windows).reshape(-1, ws, ws, channels)
    if not (pad_h or pad_w):  # no padding copy was made: never hand back a view of x
        windows = _unshared(xp, windows, x)
    return windows, (hp, wp)


def padded_size(shape, itemsize: int, ws: int) -> tuple[int, int]:
    """(Hp, Wp): H and W of a (B, H, W, C) map rounded up to multiples of ws,
    checked against ``MAX_ALLOC_BYTES`` for the padded map."""
    batch, height, width, channels = shape
    hp, wp = height + (-height) % ws, width + (-width) % ws
    check_alloc("window_size", (batch, hp, wp, channels), itemsize,
                f"the input padded to multiples of window_size={ws}")
    return hp, wp


@accepts_dlpack("windows")
def window_unpartition(windows, window_size, pad_hw, hw):
    """Reassemble windows into a feature map and crop the padding.

    Parameters
    ----------
    windows : array, shape (B * Hp // ws * Wp // ws, ws, ws, C)
        Output of :func:`window_partition` (or of attention over its windows).
    window_size : int
        Window side ``ws``.
    pad_hw : (int, int)
        Padded size ``(Hp, Wp)``, multiples of ``ws``.
    hw : (int, int)
        Original size ``(H, W)`` with ``H <= Hp`` and ``W <= Wp``.

    Returns
    -------
    array, shape (B, H, W, C)
        A new contiguous array of ``windows``' type and dtype.

    Examples
    --------
    >>> import numpy as np, relattn
    >>> x = np.random.default_rng(0).random((2, 5, 6, 3))
    >>> windows, pad_hw = relattn.window_partition(x, 4)
    >>> bool((relattn.window_unpartition(windows, 4, pad_hw, (5, 6)) == x).all())
    True
    """
    windows = _check_channels_last("windows", windows)
    ws = check_positive_int("window_size", window_size)
    hp, wp = check_size2("pad_hw", pad_hw)
    height, width = check_size2("hw", hw)
    if hp % ws or wp % ws:
        raise ValueError(f"pad_hw: expected multiples of window_size={ws}, got ({hp}, {wp})")
    if height > hp or width > wp:
        raise ValueError(f"hw: expected at most pad_hw=({hp}, {wp}), got ({height}, {width})")
    if windows.shape[1:3] != (ws, ws):
        raise ValueError(
            f"windows: expected shape (N, {ws}, {ws}, C) for window_size={ws}, got {tuple(windows.shape)}"
        )
    per_image = (hp // ws) * (wp // ws)
    if windows.shape[0] % per_image:
        raise ValueError(
            f"windows: expected a multiple of {per_image} windows for pad_hw=({hp}, {wp}), "
            f"got {windows.shape[0]}"
        )
    xp = array_module(windows)
    if xp is not np:  # one copy kernel on the GPU
        from relattn.backends.gpu import windows as _window_gpu

        return _window_gpu.unpartition(windows, ws, hp, wp, height, width)
    batch, channels = windows.shape[0] // per_image, windows.shape[3]
    x = windows.reshape(batch, hp // ws, wp // ws, ws, ws, channels).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, hp, wp, channels)
    return _unshared(xp, xp.ascontiguousarray(x[:, :height, :width]), windows)


def _unshared(xp, out, source):
    """``out``, copied if it may be a view of ``source`` (the results are always new arrays)."""
    may_share = getattr(xp, "may_share_memory", None)
    if may_share is None or may_share(out, source):
        return out.copy()
    return out
