"""``relattn.torch``: relattn's attention as a differentiable torch operation.

Checked on the CPU against finite differences (``torch.autograd.gradcheck`` in
float64) and against torch autograd of SAM's attention written in torch below
(the seed form: logits ``scale * q k^T`` plus the decomposed terms through
``get_rel_pos`` with ``F.interpolate``'s linear resize); for what it keeps
(nothing without a gradient asked for), copies (none), errors, the lazy
import, and a small training loop. The CUDA tests (marker ``gpu``) compare
CUDA tensors against the CPU in float64 and skip without a CUDA torch and CuPy.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import relattn  # noqa: E402
import relattn.torch  # noqa: E402
from relattn import autodiff, functional  # noqa: E402

F = torch.nn.functional
attention = relattn.torch.rel_pos_attention
NAMES = ("q", "k", "v", "rel_pos_h", "rel_pos_w")


# ------------------------------------------------------------------ the seed form
def seed_get_rel_pos(q_len, k_len, table):
    """SAM's get_rel_pos in torch: the table linearly resized (``F.interpolate``,
    in the table's dtype) to ``2 * max(q_len, k_len) - 1`` rows when it has
    another count, then gathered at the relative coordinates (float32, truncated)."""
    rows = 2 * max(q_len, k_len) - 1
    if table.shape[0] != rows:
        table = F.interpolate(table.t()[None], size=rows, mode="linear")[0].t()
    q_stretch, k_stretch = max(k_len / q_len, 1.0), max(q_len / k_len, 1.0)
    coords = (torch.arange(q_len)[:, None] * q_stretch - torch.arange(k_len)[None, :] * k_stretch
              + (k_len - 1) * k_stretch)
    return table[coords.long()]


def seed_attention(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size=None, scale=None):
    """SAM's attention core in torch, (B, heads, S, d): softmax of
    ``scale * q k^T + rel_h[..., ky] + rel_w[..., kx]``, then ``@ v``."""
    batch, heads, q_len, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    if rel_pos_h is not None:
        (q_h, q_w), (k_h, k_w) = q_size, (k_size or q_size)
        grid = q.reshape(batch, heads, q_h, q_w, head_dim)
        rel_h = torch.einsum("bnyxc,ykc->bnyxk", grid, seed_get_rel_pos(q_h, k_h, rel_pos_h))
        rel_w = torch.einsum("bnyxc,xkc->bnyxk", grid, seed_get_rel_pos(q_w, k_w, rel_pos_w))
        logits = (logits.reshape(batch, heads, q_h, q_w, k_h, k_w)
                  + rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, heads, q_len, k_h * k_w)
    return logits.softmax(dim=-1) @ v


# ------------------------------------------------------------------ helpers
def make_inputs(q_size=(3, 4), k_size=(2, 5), rows=(4, 6), *, batch=2, heads=3, head_dim=8, dtype=torch.float64,
                seed=0, tables=True, requires_grad=True, device="cpu"):
    """q, k, v and the tables (None without tables), drawn in float64 then cast.
    The default tables are interpolated: 4 -> 5 rows (h) and 6 -> 9 rows (w)."""
    g = torch.Generator().manual_seed(seed)
    q_len, k_len = q_size[0] * q_size[1], k_size[0] * k_size[1]
    shapes = [(batch, heads, q_len, head_dim), (batch, heads, k_len, head_dim), (batch, heads, k_len, head_dim)]
    if tables:
        shapes += [(rows[0], head_dim), (rows[1], head_dim)]
    out = [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]
    if tables:
        out[3:] = [0.5 * t for t in out[3:]]
    else:
        out += [None, None]
    return [None if t is None else t.requires_grad_(requires_grad) for t in out]


def leaves(tensors, dtype=None, device=None):
    """Fresh leaf copies (requiring grad) of the tensors, optionally cast / moved."""
    return [None if t is None else t.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
            for t in tensors]


def grads_of(fn, tensors, dout, *args, **kwargs):
    """``fn(*tensors, *args, **kwargs)`` and the gradients of ``sum(out * dout)``."""
    out = fn(*tensors, *args, **kwargs)
    out.backward(dout)
    return out.detach(), [None if t is None else t.grad for t in tensors]


def rel_err(got, want):
    """max |got - want| / max |want|, in float64 on the CPU."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape
    return float((got - want).abs().max() / want.abs().max())


def assert_close(got, want, tol, what):
    out, grads = got
    want_out, want_grads = want
    err = rel_err(out, want_out)
    assert err <= tol, f"{what}: out {err:.3g}"
    for name, g, w in zip(NAMES, grads, want_grads):
        if w is None:
            assert g is None, f"{what}: {name}"
            continue
        err = rel_err(g, w)
        assert err <= tol, f"{what}: d{name} {err:.3g}"


GRIDS = [  # q_size, k_size, table rows (h, w), what
    ((3, 4), (2, 5), (4, 6), "q grid != k grid, tables interpolated up"),
    ((3, 3), (3, 3), (9, 8), "one grid, tables interpolated down"),
    ((2, 4), (4, 2), (7, 7), "q grid != k grid, tables of SAM's size"),
]


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("which", ["auto", "numpy"])
@pytest.mark.parametrize("q_size, k_size, rows, what", GRIDS[:2])
def test_gradcheck_float64(which, q_size, k_size, rows, what):
    # float64 tables resized in float64 (resize_dtype="table"): a smooth function of them
    inputs = make_inputs(q_size, k_size, rows, batch=1, heads=2, head_dim=4)

    def fn(*tensors):
        return attention(*tensors, q_size, k_size, backend=which, resize_dtype="table")

    assert torch.autograd.gradcheck(fn, tuple(inputs)), what


def test_gradcheck_float64_without_tables_and_with_a_scale():
    q, k, v, _, _ = make_inputs((2, 3), (3, 3), batch=1, heads=2, head_dim=4, tables=False)
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, scale=0.7), (q, k, v))
    th, tw = make_inputs((2, 3), (3, 3), (4, 4), batch=1, heads=2, head_dim=4, seed=1)[3:]
    assert torch.autograd.gradcheck(
        lambda q, th, tw: attention(q, k.detach(), v.detach(), th, tw, (2, 3), (3, 3), scale=-1.5,
                                    resize_dtype="table"), (q, th, tw))


@pytest.mark.parametrize("which", ["auto", "numpy"])
@pytest.mark.parametrize("q_size, k_size, rows, what", GRIDS)
def test_float32_matches_torch_autograd_of_the_seed_form(which, q_size, k_size, rows, what):
    inputs = make_inputs(q_size, k_size, rows, dtype=torch.float32, seed=3)
    dout = torch.randn(inputs[0].shape[:3] + (inputs[2].shape[3],), generator=torch.Generator().manual_seed(4))
    want = grads_of(seed_attention, leaves(inputs), dout, q_size, k_size, scale=0.3)
    got = grads_of(attention, leaves(inputs), dout, q_size, k_size, scale=0.3, backend=which)
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[1])
    assert_close(got, want, 1e-5, what)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_matches_the_float32_seed_form(dtype):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    dtype = getattr(torch, dtype)
    inputs = make_inputs(dtype=dtype, seed=5)          # tables in the half dtype too, as a model holds them
    dout = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    got = grads_of(attention, leaves(inputs), dout, (3, 4), (2, 5))
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1])
    # the seed form in float32 on the same (rounded) values
    want = grads_of(seed_attention, leaves(inputs, torch.float32), dout.float(), (3, 4), (2, 5))
    assert_close(got, want, 1e-2, str(dtype))


def test_gradients_only_for_the_inputs_that_ask():
    q, k, v, th, tw = make_inputs(dtype=torch.float32, requires_grad=False)
    th.requires_grad_(True)
    attention(q, k, v, th, tw, (3, 4), (2, 5)).sum().backward()
    assert q.grad is None and k.grad is None and v.grad is None and tw.grad is None
    assert th.grad is not None and th.grad.shape == th.shape
    q.requires_grad_(True)
    out = attention(q, k, v, None, None)
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("layout", ["sum", "slice", "transposed"])
def test_cotangents_of_any_layout(layout):
    """Autograd's cotangents may be expanded (a sum), partly zero (a slice) or
    strided: the backward takes them contiguous."""
    inputs = make_inputs(dtype=torch.float32, seed=7)

    def loss(out):
        if layout == "sum":
            return out.sum()
        if layout == "slice":
            return out[:, :, ::2].square().sum()
        return (out.transpose(-2, -1) * torch.arange(12.0)).sum()

    got = [t.grad for t in _backward(lambda *a: loss(attention(*a, (3, 4), (2, 5))), inputs)]
    want = [t.grad for t in _backward(lambda *a: loss(seed_attention(*a, (3, 4), (2, 5))), inputs)]
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) <= 1e-5, name


def _backward(fn, inputs):
    tensors = leaves(inputs)
    fn(*tensors).backward()
    return tensors


def test_module_parameters_and_non_contiguous_views():
    """Tables as nn.Parameters, q / k / v as strided views of one qkv tensor."""
    g = torch.Generator().manual_seed(8)
    qkv = torch.randn(2, 12, 3, 2, 8, generator=g).permute(2, 0, 3, 1, 4).requires_grad_(True)
    th, tw = (torch.nn.Parameter(0.5 * torch.randn(r, 8, generator=g)) for r in (5, 7))
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    out = attention(q, k, v, th, tw, (3, 4))
    out.square().sum().backward()
    got = (qkv.grad.clone(), th.grad.clone(), tw.grad.clone())
    for t in (qkv, th, tw):
        t.grad = None
    q, k, v = qkv.unbind(0)
    seed_attention(q, k, v, th, tw, (3, 4)).square().sum().backward()
    for name, a, b in zip(("qkv", "rel_pos_h", "rel_pos_w"), got, (qkv.grad, th.grad, tw.grad)):
        assert rel_err(a, b) <= 1e-5, name


# ------------------------------------------------------------------ what is kept
def _refuse_vjp(*args, **kwargs):
    raise AssertionError("rel_pos_attention_vjp called where no gradient was asked for")


def test_no_gradient_asked_keeps_nothing(monkeypatch):
    inputs = make_inputs(dtype=torch.float32)
    with_grad = attention(*inputs, (3, 4), (2, 5))
    assert with_grad.requires_grad and type(with_grad.grad_fn).__name__ == "_RelPosAttentionBackward"
    monkeypatch.setattr(autodiff, "rel_pos_attention_vjp", _refuse_vjp)
    with torch.no_grad():
        out = attention(*inputs, (3, 4), (2, 5))
    assert out.grad_fn is None and not out.requires_grad
    with torch.inference_mode():
        assert attention(*inputs, (3, 4), (2, 5)).grad_fn is None
    plain = attention(*(t.detach() for t in inputs), (3, 4), (2, 5))    # grad mode on, nothing asks
    assert plain.grad_fn is None and not plain.requires_grad
    # the same forward either way (the fused backward's forward is the numba backend's)
    assert torch.equal(out, with_grad.detach()) and torch.equal(plain, out)


def test_pullback_released_after_backward_kept_with_retain_graph():
    inputs = leaves(make_inputs(dtype=torch.float32))
    out = attention(*inputs, (3, 4), (2, 5))
    node = out.grad_fn
    assert node.pullback is not None
    out.sum().backward(retain_graph=True)
    # the graph is kept, so is the pullback (where torch says so; else it is recomputed)
    probe = hasattr(torch._C._autograd, "_get_current_graph_task_keep_graph")
    assert (node.pullback is not None) == probe
    first = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    out.sum().backward()
    assert node.pullback is None                           # released with the graph's buffers
    assert all(torch.equal(t.grad, g) for t, g in zip(inputs, first))
    with pytest.raises(RuntimeError, match="second time"):
        out.sum().backward()


def test_retained_graph_recomputes_a_released_pullback(monkeypatch):
    """Where torch cannot say whether the graph is kept, the pullback goes after
    each backward and a later one recomputes the forward: the same gradients."""
    monkeypatch.setattr(relattn.torch, "_graph_kept", lambda: False)
    inputs = leaves(make_inputs(dtype=torch.float64))
    out = attention(*inputs, (3, 4), (2, 5))
    out.sum().backward(retain_graph=True)
    assert out.grad_fn.pullback is None
    first = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    out.sum().backward()
    assert all(torch.equal(t.grad, g) for t, g in zip(inputs, first))


def test_in_place_changes_before_the_backward_are_refused():
    inputs = leaves(make_inputs(dtype=torch.float32))
    out = attention(*inputs, (3, 4), (2, 5))
    with torch.no_grad():
        inputs[0].mul_(2)
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()
    out = attention(*leaves(inputs), (3, 4), (2, 5))
    out.add_(1)
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()


def test_double_backward_is_refused():
    inputs = leaves(make_inputs(dtype=torch.float64))
    out = attention(*inputs, (3, 4), (2, 5))
    dq, = torch.autograd.grad(out.square().sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()


def test_backward_runs_in_the_float32_mode_of_its_forward(monkeypatch):
    modes = []
    real = autodiff.rel_pos_attention_vjp

    def spy(*args, **kwargs):
        out, pullback = real(*args, **kwargs)

        def pullback_spy(dout):
            modes.append(relattn.get_gpu_float32_mode())
            return pullback(dout)

        return out, pullback_spy

    monkeypatch.setattr(autodiff, "rel_pos_attention_vjp", spy)
    inputs = leaves(make_inputs(dtype=torch.float32))
    with relattn.gpu_float32_mode("fma"):
        out = attention(*inputs, (3, 4), (2, 5))
    with relattn.gpu_float32_mode("tf32"):
        out.sum().backward()
    assert modes == ["fma"] and relattn.get_gpu_float32_mode() == "3xtf32"


def test_torch_compile_runs_it_eagerly_between_compiled_parts():
    inputs = make_inputs(dtype=torch.float32, seed=13)

    def loss(q, k, v, th, tw):
        return (attention(2 * q, k, v, th, tw, (3, 4), (2, 5)) + 1).square().sum()

    torch._dynamo.reset()
    got = [t.grad for t in _backward(torch.compile(loss, backend="eager"), inputs)]
    want = [t.grad for t in _backward(loss, inputs)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ------------------------------------------------------------------ no copies (CPU)
def _recording(monkeypatch, module, name, log):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        log.append((args, result))
        return result

    monkeypatch.setattr(module, name, wrapper)


def _host_ptr(a):
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("grad", [True, False])
def test_cpu_inputs_and_output_are_not_copied(monkeypatch, dtype, grad):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    q, k, v, th, tw = make_inputs(dtype=getattr(torch, dtype), requires_grad=grad)
    q = q.detach().transpose(-2, -1).contiguous().transpose(-2, -1).requires_grad_(grad)  # strided view
    assert not q.is_contiguous()
    log = []
    _recording(monkeypatch, autodiff, "rel_pos_attention_vjp", log)
    _recording(monkeypatch, functional, "rel_pos_attention", log)
    out = attention(q, k, v, th, tw, (3, 4), (2, 5))
    (args, result), = log
    for name, t, a in zip(NAMES, (q, k, v, th, tw), args):
        assert type(a) is np.ndarray and _host_ptr(a) == t.data_ptr(), name
        assert a.strides == tuple(s * t.element_size() for s in t.stride()), name
    array = result[0] if grad else result
    assert _host_ptr(array) == out.data_ptr() and out.dtype == q.dtype


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("grad", [True, False])
def test_errors_name_the_argument(grad):
    q, k, v, th, tw = make_inputs(dtype=torch.float32, requires_grad=grad)
    with pytest.raises(TypeError, match=r"^q: expected a torch\.Tensor, got ndarray"):
        attention(q.detach().numpy(), k, v, th, tw, (3, 4), (2, 5))
    with pytest.raises(TypeError, match=r"^v: expected a torch\.Tensor, got NoneType"):
        attention(q, k, None, th, tw, (3, 4), (2, 5))
    with pytest.raises(TypeError, match=r"^rel_pos_w: expected a torch\.Tensor or None, got list"):
        attention(q, k, v, th, tw.tolist(), (3, 4), (2, 5))
    meta = [t.to("meta") for t in (q, k, v, th, tw)]
    with pytest.raises(ValueError, match=r"^k: expected tensors on the device of q \(cpu\), got k on meta"):
        attention(q, meta[1], v, th, tw, (3, 4), (2, 5))
    with pytest.raises(ValueError, match=r"^v, rel_pos_h: expected .* got v on meta, rel_pos_h on meta"):
        attention(q, k, meta[2], meta[3], tw, (3, 4), (2, 5))
    with pytest.raises(ValueError, match=r"^q: expected CPU or CUDA tensors, got tensors on meta"):
        attention(*meta, (3, 4), (2, 5))
    # relattn's own validation, as rel_pos_attention words it
    with pytest.raises(ValueError, match=r"^q_size: expected q_h \* q_w == Sq = 12"):
        attention(q, k, v, th, tw, (4, 4), (2, 5))
    with pytest.raises(ValueError, match=r"^rel_pos_w: expected both tables or neither"):
        attention(q, k, v, th, None, (3, 4), (2, 5))
    with pytest.raises(TypeError, match=r"^q, k, v: expected one dtype"):
        attention(q, k.double(), v, th, tw, (3, 4), (2, 5))
    with pytest.raises(TypeError, match=r"^q: expected a floating dtype"):
        attention(q.detach().int(), k.detach().int(), v.detach().int())
    with pytest.raises(ValueError, match=r"^backend: "):
        attention(q, k, v, th, tw, (3, 4), (2, 5), backend="nope")
    with pytest.raises(TypeError, match=r"^k: could not import"):
        attention(q, k.detach().to_sparse(), v, th, tw, (3, 4), (2, 5))


def test_bfloat16_without_ml_dtypes_names_the_argument(monkeypatch):
    monkeypatch.setattr(relattn.torch, "BFLOAT16", None)
    q, k, v, th, tw = make_inputs(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"^q: a bfloat16 tensor needs the ml_dtypes package"):
        attention(q, k, v, th, tw, (3, 4), (2, 5))


# ------------------------------------------------------------------ the lazy import
def _python(code):
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_import_relattn_does_not_import_torch():
    out = _python("""
        import sys
        import relattn
        assert "torch" not in sys.modules, "import relattn imported torch"
        assert "relattn.torch" not in sys.modules
        try:
            relattn.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError("no AttributeError")
        bridge = relattn.torch                       # the first access imports it (and torch)
        assert bridge is sys.modules["relattn.torch"] and "torch" in sys.modules
        assert relattn.torch is bridge and hasattr(bridge, "rel_pos_attention")
        from relattn import torch as again
        assert again is bridge
        print("ok")
    """)
    assert out.strip() == "ok"


def test_without_torch_the_bridge_says_what_it_needs():
    out = _python("""
        import sys
        sys.modules["torch"] = None                  # as if PyTorch were not installed
        import relattn
        try:
            relattn.torch
        except ImportError as exc:
            print(exc)
    """)
    assert out.strip() == "relattn.torch needs the torch package (pip install torch); relattn itself does not"


# ------------------------------------------------------------------ a training step
class TinyBlock(torch.nn.Module):
    """SAM's attention layer shape: qkv projection, per-head attention with the
    decomposed relative-position bias (tables trained on a smaller grid, so
    resized), output projection."""

    def __init__(self, core, dim=16, heads=2, trained=(3, 3), seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.core, self.heads = core, heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        with torch.no_grad():
            for p in (*self.qkv.parameters(), *self.proj.parameters()):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        head_dim = dim // heads
        self.rel_pos_h = torch.nn.Parameter(0.1 * torch.randn(2 * trained[0] - 1, head_dim, generator=g))
        self.rel_pos_w = torch.nn.Parameter(0.1 * torch.randn(2 * trained[1] - 1, head_dim, generator=g))

    def forward(self, x):
        batch, h, w, dim = x.shape
        qkv = self.qkv(x).reshape(batch, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                  # (B, heads, S, head_dim), strided views
        out = self.core(q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w))
        return self.proj(out.transpose(1, 2).reshape(batch, h, w, dim))


def _train(core, steps, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 16, generator=g).to(device=device, dtype=dtype)
    target = torch.randn(2, 4, 5, 16, generator=g).to(device=device, dtype=dtype)
    block = TinyBlock(core).to(device=device, dtype=dtype)
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    losses, tables = [], block.rel_pos_h.detach().clone()
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(block(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, block, tables


def test_training_steps_reduce_the_loss():
    losses, block, start = _train(attention, 15)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert not torch.equal(block.rel_pos_h.detach(), start)          # the tables were trained
    # the same steps with the seed form: the same losses (float32 rounding apart)
    want, _, _ = _train(seed_attention, 15)
    np.testing.assert_allclose(losses, want, rtol=1e-4)


# ------------------------------------------------------------------ CUDA
def _cuda_ready():
    if not torch.cuda.is_available():
        return "torch without CUDA"
    if importlib.util.find_spec("cupy") is None:
        return "CuPy not installed"
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - a broken CuPy install: skip with its reason
        return f"CuPy unusable: {exc}"
    return None


_CUDA_MISSING = _cuda_ready()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(_CUDA_MISSING is not None, reason=str(_CUDA_MISSING))

# max-relative error of CUDA results and gradients against the CPU in float64:
# float32 in relattn's "fma" and "3xtf32" (default) modes is float32-accurate;
# "tf32" has 10-bit operands, relative errors around 1e-3 (relattn.precision).
CUDA_TOLERANCES = {("float32", "fma"): 1e-5, ("float32", "3xtf32"): 1e-5, ("float32", "tf32"): 1e-2,
                   ("bfloat16", None): 1e-2, ("float16", None): 1e-2}


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype, mode", list(CUDA_TOLERANCES))
@pytest.mark.parametrize("q_size, k_size, rows, what", GRIDS[:2])
def test_cuda_matches_the_cpu_in_float64(dtype, mode, q_size, k_size, rows, what):
    tol = CUDA_TOLERANCES[(dtype, mode)]
    dtype = getattr(torch, dtype)
    inputs = make_inputs(q_size, k_size, rows, dtype=dtype, device="cuda", seed=9)
    dout = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(10)).to(dtype).cuda()
    with relattn.gpu_float32_mode(mode or "3xtf32"):
        got = grads_of(attention, leaves(inputs), dout, q_size, k_size)
        with torch.no_grad():
            plain = attention(*inputs, q_size, k_size)
    torch.cuda.synchronize()
    assert got[0].is_cuda and got[0].dtype == dtype and plain.is_cuda and plain.dtype == dtype
    assert all(g.is_cuda and g.dtype == dtype for g in got[1])
    # the CPU in float64 on the same (rounded) values
    want = grads_of(attention, leaves(inputs, torch.float64, "cpu"), dout.double().cpu(), q_size, k_size)
    assert_close(got, want, tol, f"{what}, {dtype}, mode {mode}")
    assert rel_err(plain, want[0]) <= tol


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("grad", [True, False])
def test_cuda_inputs_and_output_are_not_copied(monkeypatch, dtype, grad):
    import cupy

    q, k, v, th, tw = make_inputs(dtype=getattr(torch, dtype), device="cuda", requires_grad=grad)
    q = q.detach().transpose(-2, -1).contiguous().transpose(-2, -1).requires_grad_(grad)  # strided view
    assert not q.is_contiguous()
    for name, t in zip(NAMES, (q, k, v, th, tw)):
        assert cupy.from_dlpack(t.detach()).data.ptr == t.data_ptr(), name
    log = []
    _recording(monkeypatch, autodiff, "rel_pos_attention_vjp", log)
    _recording(monkeypatch, functional, "rel_pos_attention", log)
    out = attention(q, k, v, th, tw, (3, 4), (2, 5))
    # the outermost call is logged last (the GPU vjp runs rel_pos_attention inside)
    assert len(log) == (2 if grad else 1)
    args, result = log[-1]
    for name, t, a in zip(NAMES, (q, k, v, th, tw), args):
        assert type(a) is cupy.ndarray and a.data.ptr == t.data_ptr(), name
        assert a.strides == tuple(s * t.element_size() for s in t.stride()), name
    array = result[0] if grad else result
    assert type(array) is cupy.ndarray and array.data.ptr == out.data_ptr()
    assert out.is_cuda and out.dtype == q.dtype


@gpu
@needs_cuda
def test_cuda_runs_on_torchs_current_stream_device_and_float32_mode(monkeypatch):
    import cupy

    seen = []

    def where(name):
        seen.append((name, cupy.cuda.get_current_stream().ptr, cupy.cuda.runtime.getDevice(),
                     relattn.get_gpu_float32_mode()))

    def spy(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            where(name)
            result = real(*args, **kwargs)
            if name != "rel_pos_attention_vjp":
                return result
            out, pullback = result

            def pullback_spy(dout):
                where("pullback")
                return pullback(dout)

            return out, pullback_spy

        monkeypatch.setattr(module, name, wrapper)

    inputs = make_inputs(dtype=torch.float32, device="cuda", seed=11)
    with relattn.gpu_float32_mode("fma"):
        want = grads_of(attention, leaves(inputs), torch.ones(inputs[0].shape, device="cuda"), (3, 4), (2, 5))
    spy(autodiff, "rel_pos_attention_vjp")
    spy(functional, "rel_pos_attention")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tensors = leaves(inputs)
        with relattn.gpu_float32_mode("fma"):
            out = attention(*tensors, (3, 4), (2, 5))
            with torch.no_grad():
                plain = attention(*inputs, (3, 4), (2, 5))
        out.backward(torch.ones_like(out))       # outside the mode block: the forward's mode holds
        got = (out.detach().clone(), [t.grad.clone() for t in tensors], plain.clone())
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    # the GPU vjp runs rel_pos_attention for its forward: calls inside it are seen too
    names = [s[0] for s in seen]
    assert names[0] == "rel_pos_attention_vjp" and names[-1] == "pullback", seen
    assert names[1:-1] in (["rel_pos_attention"], ["rel_pos_attention"] * 2), seen
    device = torch.cuda.current_device()
    assert all(ptr == side.cuda_stream and dev == device and mode == "fma" for _, ptr, dev, mode in seen), seen
    # the same values as on the default stream (a missing synchronisation would show)
    assert rel_err(got[0], want[0]) <= 1e-6 and rel_err(got[2], want[0]) <= 1e-5
    for name, a, b in zip(NAMES, got[1], want[1]):
        assert rel_err(a, b) <= 1e-6, name


@gpu
@needs_cuda
def test_cuda_tensors_on_another_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("one CUDA device")
    inputs = make_inputs(dtype=torch.float32, seed=12)
    want = grads_of(attention, leaves(inputs, torch.float64), torch.ones(inputs[0].shape, dtype=torch.float64),
                    (3, 4), (2, 5))
    with torch.cuda.device(0):
        got = grads_of(attention, leaves(inputs, device="cuda:1"), torch.ones(inputs[0].shape, device="cuda:1"),
                       (3, 4), (2, 5))
    assert got[0].device == torch.device("cuda:1") and all(g.device == got[0].device for g in got[1])
    assert_close(got, want, 1e-5, "cuda:1")


@gpu
@needs_cuda
def test_cuda_no_gradient_asked_keeps_nothing_and_device_errors(monkeypatch):
    inputs = make_inputs(dtype=torch.bfloat16, device="cuda")
    monkeypatch.setattr(autodiff, "rel_pos_attention_vjp", _refuse_vjp)
    with torch.no_grad():
        out = attention(*inputs, (3, 4), (2, 5))
    assert out.grad_fn is None and out.is_cuda and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"^rel_pos_h: expected tensors on the device of q \(cuda:0\)"):
        attention(inputs[0], inputs[1], inputs[2], inputs[3].cpu(), inputs[4], (3, 4), (2, 5))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_training_steps_reduce_the_loss(dtype):
    losses, block, start = _train(attention, 15, device="cuda", dtype=dtype)
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(block.rel_pos_h.detach(), start)
    want, _, _ = _train(attention, 15)                       # the same steps on the CPU, float32
    if dtype == torch.float32:
        np.testing.assert_allclose(losses, want, rtol=1e-3)
    else:
        np.testing.assert_allclose(losses[0], want[0], rtol=2e-2)
