"""``Attention.vjp``: the layer's forward and its pullback.

Checked against central finite differences in float64, against PyTorch
autograd of the seed module (``tests/golden/make_golden.py``'s
``SeedAttention`` and SAM's window helpers; skipped without torch), for the
forward's bits, the dtypes (half precision differentiated in float32 and
rounded once), the cotangent's checks, and the parameters it captures.
Every numeric check runs on both CPU backends, ``"numpy"`` (the reference
backward) and ``"numba"`` (the fused one).
"""

from __future__ import annotations

import importlib.util
import os
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relattn

try:
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - optional dependency
    BFLOAT16 = None

CORES = ["numpy", "numba"]
HALF_DTYPES = [np.dtype(np.float16)] + ([BFLOAT16] if BFLOAT16 is not None else [])
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def _layer(dim=8, heads=2, *, qkv_bias=True, use_rel_pos=True, input_size=(3, 4), dtype="float64",
           core="numpy", resize_dtype="table", seed=0):
    """A small layer with every parameter random (tables too) and of size 1."""
    layer = relattn.Attention(dim, heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos,
                              rel_pos_zero_init=False, input_size=input_size if use_rel_pos else None,
                              dtype=dtype, backend=core, resize_dtype=resize_dtype)
    rng = np.random.default_rng(seed)
    state = {k: rng.standard_normal(v.shape) * (0.5 if k.startswith("rel_pos") else dim ** -0.5)
             for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)
    return layer


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _rel_err(got, want, floor=0.0):
    """max |got - want| relative to max |want|, or to ``floor`` when larger (a
    gradient that is zero in exact arithmetic, such as a table's along a side
    of one key, is rounding noise: it is compared relative to the problem's
    other gradients)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = max(np.max(np.abs(want), initial=0.0), floor)
    err = np.max(np.abs(got - want), initial=0.0)
    return err / scale if scale > 0 else err


# ------------------------------------------------------------- the forward's bits
@pytest.mark.parametrize("core", ["numpy", "numba", "auto"])
@pytest.mark.parametrize("dtype", [np.dtype(np.float64), np.dtype(np.float32)] + HALF_DTYPES)
@pytest.mark.parametrize("window", [0, 3, 5])
def test_y_is_the_forward_bit_for_bit(core, dtype, window):
    layer = _layer(16, 2, core=core, input_size=(4, 4), dtype="float32", resize_dtype="float32")
    x = np.random.default_rng(1).standard_normal((2, 5, 7, 16)).astype(dtype)
    y, _ = layer.vjp(x, window_size=window)
    assert _same_bits(y, layer(x, window_size=window))


def test_layer_window_size_is_the_default():
    layer = _layer(8, 2, core="numpy")
    layer.window_size = 3
    x = np.random.default_rng(1).standard_normal((1, 5, 7, 8))
    y, pullback = layer.vjp(x)
    assert _same_bits(y, layer(x, window_size=3))
    assert not _same_bits(y, layer(x, window_size=0))
    dx = pullback(np.ones_like(y))[0]
    assert _same_bits(dx, _layer(8, 2, core="numpy").vjp(x, window_size=3)[1](np.ones_like(y))[0])


# ------------------------------------------------------------- (1) finite differences
def _finite_difference_check(layer, x, window, rng):
    """<pullback(dy), d> == d/dt <dy, f(. + t d)> for x and every parameter
    (central differences, Richardson-extrapolated: error O(h^4))."""
    y, pullback = layer.vjp(x, window_size=window)
    dy = rng.standard_normal(y.shape)
    dx, grads = pullback(dy)
    state = layer.state_dict()
    assert list(grads) == list(state)
    init = dict(num_heads=layer.num_heads, qkv_bias="qkv.bias" in state, use_rel_pos=layer.use_rel_pos,
                input_size=layer.input_size, dtype="float64", backend=layer.backend, resize_dtype="table")
    other = relattn.Attention(layer.dim, **init)

    def f(name, t, direction):
        if name == "x":
            return float(np.sum(dy * layer(x + t * direction, window_size=window)))
        other.load_state_dict({**state, name: state[name] + t * direction})
        return float(np.sum(dy * other(x, window_size=window)))

    for name, value, grad in [("x", x, dx), *((k, state[k], grads[k]) for k in state)]:
        assert grad.shape == value.shape and grad.dtype == np.float64, name
        direction = rng.standard_normal(value.shape)
        analytic = float(np.sum(grad * direction))

        def central(step):
            return (f(name, step, direction) - f(name, -step, direction)) / (2 * step)

        h = 1e-3
        numeric = (4 * central(h / 2) - central(h)) / 3
        typical = np.linalg.norm(grad) * np.linalg.norm(direction) / np.sqrt(direction.size)
        assert abs(numeric - analytic) <= 1e-7 * max(abs(analytic), typical, 1e-300), (
            f"{name}: analytic {analytic!r} numeric {numeric!r}")


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("use_rel_pos", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_finite_differences(core, window, use_rel_pos, qkv_bias):
    """A 5 x 7 grid: globally (tables (3, 4) interpolated to 5 x 7), and in
    3 x 3 windows (padded to 6 x 9: six windows, tables interpolated to 3 x 3)."""
    layer = _layer(8, 2, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos, input_size=(3, 4), core=core)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 7, 8))
    _finite_difference_check(layer, x, window, rng)


# ------------------------------------------------------------- (2) PyTorch autograd
_SEED = {}


def _seed_module_file():
    """tests/golden/make_golden.py (the seed module and SAM's window helpers, in torch)."""
    pytest.importorskip("torch")
    if "module" not in _SEED:
        spec = importlib.util.spec_from_file_location("_layer_vjp_make_golden",
                                                      os.path.join(GOLDEN, "make_golden.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SEED["module"] = module
    return _SEED["module"]


def _sam_get_rel_pos(torch, F):
    """SAM's own ``get_rel_pos``: the resize in the table's dtype (the seed
    module's resizes in float32); what ``resize_dtype="table"`` computes."""

    def get_rel_pos(q_size, k_size, rel_pos):
        max_rel_dist = int(2 * max(q_size, k_size) - 1)
        if rel_pos.shape[0] != max_rel_dist:
            resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
                                    size=max_rel_dist, mode="linear")
            resized = resized.reshape(-1, max_rel_dist).permute(1, 0)
        else:
            resized = rel_pos
        q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
        k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
        relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
        return resized[relative_coords.long()]

    return get_rel_pos


def _torch_vjp(layer, x, dy, window):
    """y, dx and the parameters' gradients of the seed module holding
    ``layer``'s weights, run windowed as SAM's Block does, by torch autograd
    in the dtype of ``x``. A ``resize_dtype="table"`` layer is compared with
    SAM's ``get_rel_pos`` (float64 tables resized in float64)."""
    torch = pytest.importorskip("torch")
    mg = _seed_module_file()
    dtype = {np.float64: torch.float64, np.float32: torch.float32}[x.dtype.type]
    state = layer.state_dict()
    module = mg.SeedAttention(layer.dim, layer.num_heads, qkv_bias="qkv.bias" in state,
                              use_rel_pos=layer.use_rel_pos, input_size=layer.input_size).to(dtype)
    module.load_state_dict({k: torch.from_numpy(v.astype(x.dtype)) for k, v in state.items()})
    xt = torch.tensor(x, requires_grad=True)
    seed_get_rel_pos = mg.get_rel_pos
    if layer.resize_dtype == "table":
        mg.get_rel_pos = _sam_get_rel_pos(torch, torch.nn.functional)
    try:
        yt = mg.windowed_forward(module, xt, window)
    finally:
        mg.get_rel_pos = seed_get_rel_pos
    yt.backward(torch.from_numpy(dy))
    grads = {name: p.grad.numpy() for name, p in module.named_parameters()}
    return yt.detach().numpy(), xt.grad.numpy(), grads


def _compare_with_torch(layer, x, window, tol, seed=3, table_tol=None):
    y, pullback = layer.vjp(x, window_size=window)
    dy = np.random.default_rng(seed).standard_normal(y.shape).astype(y.dtype)
    dx, grads = pullback(dy)
    want_y, want_dx, want = _torch_vjp(layer, x, dy, window)
    assert sorted(want) == sorted(grads) == sorted(layer.state_dict())
    assert _rel_err(y, want_y) <= tol, "y"
    floor = 1e-3 * max(np.max(np.abs(g), initial=0.0) for g in [want_dx, *want.values()])
    assert dx.dtype == x.dtype and _rel_err(dx, want_dx, floor) <= tol, f"dx: {_rel_err(dx, want_dx):.3g}"
    for key, grad in grads.items():
        assert grad.dtype == layer.dtype and grad.shape == want[key].shape, key
        limit = table_tol if (table_tol is not None and key.startswith("rel_pos")) else tol
        err = _rel_err(grad, want[key], floor)
        assert err <= limit, f"{key}: {err:.3g} > {limit:g}"


# (grid, window, input_size): global at input_size, global interpolated, windows
# with padding (5 x 7 in windows of 3, 6 x 6 in windows of 4) and without (6 x 6 in 3)
CASES = [((5, 7), 0, (5, 7)), ((5, 7), 0, (3, 4)), ((5, 7), 3, (3, 3)), ((5, 7), 3, (5, 2)),
         ((6, 6), 4, (3, 6)), ((6, 6), 3, (3, 3))]


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("grid, window, input_size", CASES)
@pytest.mark.parametrize("use_rel_pos, qkv_bias", [(True, True), (True, False), (False, True)])
def test_torch_autograd_float64(core, grid, window, input_size, use_rel_pos, qkv_bias):
    layer = _layer(16, 4, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos, input_size=input_size, core=core)
    x = np.random.default_rng(4).standard_normal((2, *grid, 16))
    _compare_with_torch(layer, x, window, 1e-10)


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("grid, window, input_size", [CASES[1], CASES[3]])
def test_torch_autograd_float64_float32_resize(core, grid, window, input_size):
    """``resize_dtype="float32"`` (the default): float64 tables resized in
    float32 as the seed module does. The forward and dx agree to float64;
    torch sends the tables' gradients back through its float32 resize, so
    those agree to float32 (relattn's adjoint keeps float64)."""
    layer = _layer(16, 4, input_size=input_size, core=core, resize_dtype="float32")
    x = np.random.default_rng(5).standard_normal((1, *grid, 16))
    _compare_with_torch(layer, x, window, 1e-10, table_tol=1e-6)


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("grid, window, input_size", CASES)
@pytest.mark.parametrize("use_rel_pos, qkv_bias", [(True, True), (False, False)])
def test_torch_autograd_float32(core, grid, window, input_size, use_rel_pos, qkv_bias):
    layer = _layer(16, 4, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos, input_size=input_size,
                   dtype="float32", core=core, resize_dtype="float32")
    x = np.random.default_rng(6).standard_normal((2, *grid, 16)).astype(np.float32)
    _compare_with_torch(layer, x, window, 1e-5)


# ------------------------------------------------------------- (4) random shapes
@st.composite
def layers_and_inputs(draw):
    heads, head_dim = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 4]))
    grid = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    window = draw(st.sampled_from([0, 0, 1, 2, 3, 4, 7]))
    use_rel_pos, qkv_bias = draw(st.booleans()), draw(st.booleans())
    input_size = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    core = draw(st.sampled_from(CORES))
    seed = draw(st.integers(0, 2**32 - 1))
    layer = _layer(heads * head_dim, heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos,
                   input_size=input_size, core=core, seed=seed)
    x = np.random.default_rng(seed).standard_normal((draw(st.integers(1, 2)), *grid, heads * head_dim))
    return layer, x, window


@settings(max_examples=15)
@given(case=layers_and_inputs())
def test_random_shapes_match_torch_autograd(case):
    layer, x, window = case
    _compare_with_torch(layer, x, window, 1e-10)


# ------------------------------------------------------------- dtypes
@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("half", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("window", [0, 3])
def test_half_precision_is_float32_rounded_once(core, half, window):
    """A half layer on half input: the float32 computation of the same values
    (the float32 layer on the widened input and cotangent), each result
    rounded once to half, bit for bit."""
    layer = _layer(16, 2, input_size=(4, 4), dtype=half, core=core, resize_dtype="float32")
    wide = _layer(16, 2, input_size=(4, 4), dtype="float32", core=core, resize_dtype="float32")
    wide.load_state_dict(layer.state_dict())
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 5, 7, 16)).astype(half)
    y, pullback = layer.vjp(x, window_size=window)
    y32, pullback32 = wide.vjp(x.astype(np.float32), window_size=window)
    assert _same_bits(y, y32.astype(half))
    dy = rng.standard_normal(y.shape).astype(half)
    dx, grads = pullback(dy)
    dx32, grads32 = pullback32(dy.astype(np.float32))
    assert _same_bits(dx, dx32.astype(half))
    for key, grad in grads.items():
        assert _same_bits(grad, grads32[key].astype(half)), key


@pytest.mark.parametrize("layer_dtype, x_dtype", [("float64", np.float32), ("float32", np.float64)])
def test_mixed_dtypes_compute_in_float64(layer_dtype, x_dtype):
    """float64 on either side: computed in float64; dx in x's dtype, the
    gradients in the parameters'."""
    layer = _layer(8, 2, dtype=layer_dtype)
    ref = _layer(8, 2, dtype="float64")
    ref.load_state_dict(layer.state_dict())
    x = np.random.default_rng(8).standard_normal((1, 5, 7, 8)).astype(x_dtype)
    y, pullback = layer.vjp(x, window_size=3)
    y64, pullback64 = ref.vjp(x.astype(np.float64), window_size=3)
    assert _same_bits(y, y64.astype(x_dtype))
    dy = np.ones_like(y)
    dx, grads = pullback(dy)
    dx64, grads64 = pullback64(dy.astype(np.float64))
    assert _same_bits(dx, dx64.astype(x_dtype))
    for key, grad in grads.items():
        assert _same_bits(grad, grads64[key].astype(layer_dtype)), key


# ------------------------------------------------------------- (3) the cotangent
def test_bad_cotangents_name_dy():
    layer = _layer(8, 2, dtype="float32")
    y, pullback = layer.vjp(np.zeros((1, 5, 7, 8), np.float32), window_size=3)
    with pytest.raises(TypeError, match=r"^dy: expected a numpy\.ndarray like y, got builtins\.list"):
        pullback(y.tolist())
    with pytest.raises(TypeError, match=r"^dy: expected dtype float32 \(that of y\), got float64"):
        pullback(y.astype(np.float64))
    with pytest.raises(ValueError, match=r"^dy: expected shape \(1, 5, 7, 8\) \(that of y\), got \(1, 6, 9, 8\)"):
        pullback(np.zeros((1, 6, 9, 8), np.float32))
    with pytest.raises(ValueError, match=r"^dy: expected shape"):
        pullback(y[0])
    with pytest.raises(TypeError, match=r"^dy: expected a numpy\.ndarray like y"):
        pullback(np.float32(1.0))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"^dy: expected a numpy\.ndarray like y, got torch\.Tensor"):
        pullback(torch.from_numpy(y))


def test_bad_inputs_are_checked_as_the_forward_does():
    layer = _layer(8, 2)
    with pytest.raises(ValueError, match=r"^x: expected shape \(B, H, W, 8\)"):
        layer.vjp(np.zeros((1, 3, 3, 4)))
    with pytest.raises(ValueError, match="^window_size"):
        layer.vjp(np.zeros((1, 3, 3, 8)), window_size=-1)


# ------------------------------------------------------------- repeated calls, captured state
@pytest.mark.parametrize("core", CORES)
def test_pullback_is_repeatable_and_leaves_dy_alone(core):
    layer = _layer(8, 2, core=core)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 5, 7, 8))
    y, pullback = layer.vjp(x, window_size=3)
    dy = rng.standard_normal(y.shape)
    dy_before = dy.copy()
    dx1, grads1 = pullback(dy)
    dx2, grads2 = pullback(dy)
    assert np.array_equal(dy, dy_before)
    assert _same_bits(dx1, dx2) and dx1 is not dx2
    for key in grads1:
        assert _same_bits(grads1[key], grads2[key]), key
    # linear in dy
    dx3, grads3 = pullback(2 * dy)
    np.testing.assert_allclose(dx3, 2 * dx1, rtol=1e-12, atol=1e-14)


def test_pullback_uses_the_parameters_of_the_forward():
    """A parameter write after vjp (load_state_dict, assigning an attribute)
    does not reach the pullback; writes to x after vjp neither."""
    layer, before = _layer(8, 2, seed=10), _layer(8, 2, seed=10)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 5, 7, 8))
    x_then = x.copy()
    y, pullback = layer.vjp(x)
    dy = rng.standard_normal(y.shape)
    layer.load_state_dict(_layer(8, 2, seed=12).state_dict())
    layer.proj_weight = np.zeros((8, 8))
    x[...] = 0.0
    dx, grads = pullback(dy)
    dx_want, grads_want = before.vjp(x_then)[1](dy)
    assert _same_bits(dx, dx_want)
    for key in grads:
        assert _same_bits(grads[key], grads_want[key]), key


def test_concurrent_writes_never_mix_parameters():
    """While another thread swaps between two weight sets, every vjp's
    results are those of one of them."""
    a, b = _layer(8, 2, seed=13), _layer(8, 2, seed=14)
    x = np.random.default_rng(15).standard_normal((1, 4, 5, 8))
    dy = np.random.default_rng(16).standard_normal(x.shape)
    wants = []
    for source in (a, b):
        y, pullback = source.vjp(x, window_size=3)
        wants.append((y, *pullback(dy)))
    layer = _layer(8, 2, seed=13)
    states = [a.state_dict(), b.state_dict()]
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            layer.load_state_dict(states[i % 2])
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(30):
            y, pullback = layer.vjp(x, window_size=3)
            dx, grads = pullback(dy)
            matches = [i for i, (wy, wdx, wg) in enumerate(wants)
                       if _same_bits(y, wy) and _same_bits(dx, wdx)
                       and all(_same_bits(grads[k], wg[k]) for k in grads)]
            assert matches, "the results mix two parameter sets"
    finally:
        stop.set()
        thread.join()


def test_empty_batch():
    layer = _layer(8, 2)
    for window in (0, 3):
        x = np.zeros((0, 5, 7, 8))
        y, pullback = layer.vjp(x, window_size=window)
        dx, grads = pullback(y)
        assert dx.shape == x.shape
        assert all(g.shape == v.shape and not g.any() for g, v in zip(grads.values(), layer.state_dict().values()))


def test_dlpack_tensors_come_back_as_their_kind():
    torch = pytest.importorskip("torch")
    layer = _layer(8, 2, dtype="float32")
    x = np.random.default_rng(17).standard_normal((1, 5, 7, 8)).astype(np.float32)
    y, pullback = layer.vjp(torch.from_numpy(x), window_size=3)
    assert isinstance(y, torch.Tensor) and np.array_equal(y.numpy(), layer(x, window_size=3))
    dx, grads = pullback(torch.ones_like(y))
    dx_np, grads_np = layer.vjp(x, window_size=3)[1](np.ones(x.shape, np.float32))
    assert isinstance(dx, torch.Tensor) and np.array_equal(dx.numpy(), dx_np)
    assert all(isinstance(g, torch.Tensor) and np.array_equal(g.numpy(), grads_np[k]) for k, g in grads.items())
    with pytest.raises(TypeError, match=r"^dy: expected a torch\.Tensor like y, got numpy\.ndarray"):
        pullback(np.ones(x.shape, np.float32))
