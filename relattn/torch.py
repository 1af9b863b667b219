"""PyTorch autograd for relattn's attention: :func:`rel_pos_attention` on torch tensors.

An optional bridge: importing this module imports torch (``import relattn``
does not; ``relattn.torch`` is loaded on first access). Its
:func:`rel_pos_attention` takes and returns torch tensors and is
differentiable through a :class:`torch.autograd.Function`, so a SAM-style
encoder written in PyTorch can train with relattn's kernels in place of its
eager attention.

What runs where
---------------
CPU tensors
    become numpy arrays sharing their memory (bfloat16 through ml_dtypes,
    ``pip install relattn[bf16]``); the forward and the backward run on
    relattn's CPU backends (the fused numba kernels where numba runs, else
    the numpy reference), and the results come back with
    ``torch.from_numpy``, without copies.
CUDA tensors
    become CuPy arrays through DLPack (``pip install relattn[gpu]``), without
    copies; relattn's GPU kernels run on the tensors' device and on torch's
    current stream of that device (the forward's stream in the backward, as
    torch's autograd engine sets it), and the results come back through
    ``torch.from_dlpack``, without copies. Their memory is CuPy's (its memory
    pool), not torch's caching allocator: ``torch.cuda.memory_allocated``
    does not count it, and it is freed when the tensors are.

The forward keeps what the backward needs (the pullback of
:func:`relattn.rel_pos_attention_vjp`: the inputs, which it does not copy,
and each logit row's statistics; on the CPU also the relative-position
terms) only when a gradient is asked for: grad mode on and an input that
requires grad. Otherwise it calls :func:`relattn.rel_pos_attention` and keeps
nothing. The pullback is dropped after the backward unless the graph is
retained (``retain_graph=True``); a backward through a retained graph whose
pullback has gone recomputes the forward first. The backward runs in the
float32 GPU mode (:func:`relattn.gpu_float32_mode`) of its forward call:
torch runs a CUDA backward on threads of its own, which do not see the
caller's mode.

Limits
------
- Double backward is not supported (the backward is
  ``once_differentiable``: differentiating the gradients raises).
- ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``) are not
  supported: fold a mapped dimension into the batch instead.
- ``torch.compile`` does not trace into relattn (numpy / CuPy code): in a
  compiled function the call is a graph break and runs eagerly, the code
  around it compiled. ``torch.jit`` cannot script or trace it.
- Autocast does not apply: q, k and v must have one dtype (tables may have
  another), e.g. ``q.to(torch.bfloat16)`` before the call.
- In-place changes to the inputs or the output between forward and
  backward are refused by torch's version check, as for built-in operations.
- Tensors must be dense (strided) CPU or CUDA tensors; views of any strides
  are taken without copies.
"""

from __future__ import annotations

import contextlib

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("relattn.torch needs the torch package (pip install torch); "
                      "relattn itself does not") from None

from relattn import autodiff as _autodiff
from relattn import functional as _functional
from relattn import precision as _precision
from relattn._arrays import BFLOAT16
from relattn._interop import _INSTALL_BF16, _INSTALL_CUPY
from relattn._interop import from_dlpack as _from_dlpack

__all__ = ["rel_pos_attention"]

_NAMES = ("q", "k", "v", "rel_pos_h", "rel_pos_w")

# torch.compile must not trace into relattn (numpy / CuPy code): it runs eagerly, a graph break.
_eager = getattr(getattr(torch, "compiler", None), "disable", lambda fn: fn)


@_eager
def rel_pos_attention(
    q, k, v, rel_pos_h=None, rel_pos_w=None, q_size=None, k_size=None, *, scale=None, backend="auto",
    resize_dtype="float32",
):
    """:func:`relattn.rel_pos_attention` on torch tensors, differentiable.

    Parameters
    ----------
    q : torch.Tensor, shape (B, heads, Sq, d)
    k, v : torch.Tensor, shape (B, heads, Sk, d)
        CPU or CUDA tensors, one dtype among float16, bfloat16, float32 and
        float64, all on one device. Views of any strides are fine.
    rel_pos_h, rel_pos_w : torch.Tensor, shape (L_h, d) and (L_w, d), optional
        SAM's relative-position tables, on the device of ``q``; both or
        neither. They are resized when their row count is not
        ``2 * max(q, k) - 1`` of their axis, and the gradients go back
        through the resize.
    q_size, k_size, scale, backend, resize_dtype
        As for :func:`relattn.rel_pos_attention`; ``backend`` also picks
        the backward of :func:`relattn.rel_pos_attention_vjp` when a
        gradient is asked for.

    Returns
    -------
    torch.Tensor, shape (B, heads, Sq, d)
        On the device and with the dtype of ``q``. It has a ``grad_fn`` when
        grad mode is on and any input requires grad; the backward gives the
        gradients of q, k, v and of both tables (in their own shapes and
        dtypes).

    Raises
    ------
    TypeError
        For an input that is not a tensor (a table may be None), naming it;
        for a CUDA tensor without CuPy installed, or a bfloat16 CPU tensor
        without ml_dtypes; and as :func:`relattn.rel_pos_attention` does
        (a dtype, a wrong type of argument), naming the argument.
    ValueError
        For tensors on different devices, naming them, or on a device other
        than CPU and CUDA; and as :func:`relattn.rel_pos_attention` does
        (a shape, a size), naming the argument.
    relattn.BackendError
        When the backend asked for cannot take the inputs.

    Notes
    -----
    No double backward, ``torch.func`` transforms, ``torch.compile`` or
    autocast: see the module's docstring (:mod:`relattn.torch`).

    Examples
    --------
    >>> import torch, relattn.torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v = (torch.randn(1, 2, 12, 8, generator=g, requires_grad=True) for _ in range(3))
    >>> rel_pos_h = torch.randn(5, 8, generator=g, requires_grad=True)   # 2 * 3 - 1 rows
    >>> rel_pos_w = torch.randn(7, 8, generator=g, requires_grad=True)   # 2 * 4 - 1 rows
    >>> out = relattn.torch.rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, q_size=(3, 4))
    >>> out.shape, out.dtype, out.requires_grad
    (torch.Size([1, 2, 12, 8]), torch.float32, True)
    >>> out.square().sum().backward()
    >>> q.grad.shape, rel_pos_h.grad.shape
    (torch.Size([1, 2, 12, 8]), torch.Size([5, 8]))
    >>> with torch.no_grad():                   # inference: nothing kept for a backward
    ...     relattn.torch.rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, q_size=(3, 4)).grad_fn is None
    True
    """
    tensors = (q, k, v, rel_pos_h, rel_pos_w)
    device = _check_tensors(tensors)
    options = (q_size, k_size, scale, backend, resize_dtype)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _RelPosAttention.apply(q, k, v, rel_pos_h, rel_pos_w, options)
    with _on_device(device):
        out = _functional.rel_pos_attention(*_as_arrays(tensors), q_size, k_size, scale=scale,
                                            backend=backend, resize_dtype=resize_dtype)
        return _to_torch(out, device)


class _RelPosAttention(torch.autograd.Function):
    """The attention as one autograd node; its state is the pullback of
    :func:`relattn.rel_pos_attention_vjp`."""

    @staticmethod
    def forward(ctx, q, k, v, rel_pos_h, rel_pos_w, options):
        device = q.device
        with _on_device(device):
            out, pullback = _vjp((q, k, v, rel_pos_h, rel_pos_w), options)
            out = _to_torch(out, device)
        ctx.pullback = pullback
        ctx.options = options
        # torch runs a CUDA backward on its own threads, which do not see the caller's
        # context: the backward takes the float32 GPU mode of its forward.
        ctx.float32_mode = _precision.get_gpu_float32_mode()
        # Inputs and output are saved for torch's checks (a freed graph, an
        # in-place change since the forward): the pullback holds views of them.
        ctx.save_for_backward(q, k, v, rel_pos_h, rel_pos_w, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        *inputs, out = ctx.saved_tensors
        pullback = ctx.pullback
        if not _graph_kept():
            ctx.pullback = None          # its memory goes with this backward, as saved tensors do
        device = out.device
        with _on_device(device), _precision.gpu_float32_mode(ctx.float32_mode):
            if pullback is None:         # a retained graph's later backward: recompute the forward
                _, pullback = _vjp(inputs, ctx.options)
            dout = dout.to(device=device, dtype=out.dtype).contiguous()
            grads = pullback(_as_array("dout", dout))
            grads = tuple(_to_torch(g, device) if g is not None and needed else None
                          for g, needed in zip(grads, ctx.needs_input_grad))
        return (*grads, None)


def _vjp(tensors, options):
    q_size, k_size, scale, backend, resize_dtype = options
    return _autodiff.rel_pos_attention_vjp(*_as_arrays(tensors), q_size, k_size, scale=scale,
                                           backend=backend, resize_dtype=resize_dtype)


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``);
    False when this torch cannot say (a later backward then recomputes)."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if probe is None:
        return False
    try:
        return bool(probe())
    except Exception:  # noqa: BLE001 - a private probe: any failure means "cannot say"
        return False


def _check_tensors(tensors):
    """The device of the inputs: TypeError for a non-tensor, ValueError for
    devices that differ or are neither CPU nor CUDA, naming the arguments."""
    for name, t in zip(_NAMES, tensors):
        if t is None and name.startswith("rel_pos"):
            continue
        if not isinstance(t, torch.Tensor):
            wanted = "a torch.Tensor or None" if name.startswith("rel_pos") else "a torch.Tensor"
            raise TypeError(f"{name}: expected {wanted}, got {type(t).__name__}")
    device = tensors[0].device
    others = [(name, t.device) for name, t in zip(_NAMES[1:], tensors[1:]) if t is not None and t.device != device]
    if others:
        names = ", ".join(name for name, _ in others)
        got = ", ".join(f"{name} on {d}" for name, d in others)
        raise ValueError(f"{names}: expected tensors on the device of q ({device}), got {got}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"q: expected CPU or CUDA tensors, got tensors on {device}")
    return device


@contextlib.contextmanager
def _on_device(device):
    """On CUDA: CuPy's current device and stream are the tensors' device and
    torch's current stream there, so relattn's kernels run in torch's order."""
    if device.type != "cuda":
        yield
        return
    try:
        import cupy
    except ImportError:
        raise TypeError(f"q: a CUDA tensor {_INSTALL_CUPY}") from None
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream, device.index):
        yield


def _as_arrays(tensors):
    """numpy (CPU) or CuPy (CUDA) views of the tensors, never copies; None stays None."""
    return tuple(None if t is None else _as_array(name, t) for name, t in zip(_NAMES, tensors))


def _as_array(name, t):
    """A numpy (CPU) or CuPy (CUDA, through DLPack) view of tensor ``t``."""
    if t.device.type == "cpu":
        t = t.detach()
        if t.dtype == torch.bfloat16:      # numpy has no bfloat16: its bits, viewed as ml_dtypes'
            if BFLOAT16 is None:
                raise TypeError(f"{name}: a bfloat16 tensor {_INSTALL_BF16}")
            return t.view(torch.int16).numpy().view(BFLOAT16)
        try:
            return t.numpy()
        except (TypeError, RuntimeError):  # a dtype numpy lacks, a sparse layout: DLPack's error names it
            pass
    return _from_dlpack(name, t)


def _to_torch(a, device):
    """A torch tensor on ``device`` sharing the memory of ``a`` (numpy or CuPy)."""
    if isinstance(a, np.ndarray):
        if BFLOAT16 is not None and a.dtype == BFLOAT16:
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
    else:
        t = torch.from_dlpack(a)
    return t if t.device == device else t.to(device)
