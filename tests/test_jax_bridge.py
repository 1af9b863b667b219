"""relattn.jax: rel_pos_attention on jax arrays, under jit / grad / vmap."""

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import relattn  # noqa: E402
import relattn.jax as rj  # noqa: E402
from relattn._arrays import BFLOAT16  # noqa: E402

NAMES = ("q", "k", "v", "rel_pos_h", "rel_pos_w")


@pytest.fixture
def x64():
    """float64 jax arrays for the test, the previous setting restored after."""
    before = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


# Problems: (batch, heads, q_size, k_size, head_dim, table rows h, table rows w);
# None rows: no tables.
SAME_GRID = (2, 2, (3, 4), (3, 4), 8, 5, 7)
RESIZED = (1, 2, (3, 4), (2, 5), 8, 7, 5)        # q grid != k grid, both tables resized
PLAIN = (2, 3, None, None, 8, None, None)


def _problem(case, dtype=np.float64, seed=0):
    batch, heads, q_size, k_size, d, rows_h, rows_w = case
    rng = np.random.default_rng(seed)
    sq = 10 if q_size is None else q_size[0] * q_size[1]
    sk = 7 if k_size is None else k_size[0] * k_size[1]
    arrays = [rng.standard_normal((batch, heads, sq, d)),
              rng.standard_normal((batch, heads, sk, d)),
              rng.standard_normal((batch, heads, sk, d))]
    if rows_h is not None:
        arrays += [rng.standard_normal((rows_h, d)), rng.standard_normal((rows_w, d))]
    arrays = [a.astype(dtype) for a in arrays]
    w = rng.standard_normal(arrays[0].shape).astype(dtype)      # the loss's weights
    sizes = {} if q_size is None else {"q_size": q_size, "k_size": k_size}
    return arrays, w, sizes


def _loss(sizes, w, **options):
    def loss(*arrays):
        out = rj.rel_pos_attention(*arrays, **sizes, **options)
        return jnp.sum(out.astype(jnp.float32 if out.dtype != jnp.float64 else out.dtype) * w)
    return loss


def _grads(arrays, sizes, w, **options):
    fn = jax.grad(_loss(sizes, jnp.asarray(w), **options), argnums=tuple(range(len(arrays))))
    return [np.asarray(g) for g in jax.jit(fn)(*(jnp.asarray(a) for a in arrays))]


def _reference(arrays, sizes, w, **options):
    out, pullback = relattn.rel_pos_attention_vjp(*arrays, **sizes, **options)
    return out, [g for g in pullback(w.astype(out.dtype)) if g is not None]


# ---------------------------------------------------------------- imports
def test_import_relattn_imports_no_jax():
    code = ("import sys, relattn, relattn.jax; "
            "assert 'jax' not in sys.modules, 'jax imported'; print(relattn.jax.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "relattn.jax"


def test_missing_jax_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)
    q = np.ones((1, 1, 4, 8), np.float32)
    with pytest.raises(ImportError, match=r"^relattn.jax needs the jax package \(pip install jax\)$"):
        rj.rel_pos_attention(q, q, q)


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("case", [SAME_GRID, RESIZED, PLAIN], ids=["same-grid", "resized", "plain"])
@pytest.mark.parametrize("name", ["auto", "numpy"])
def test_forward_is_relattns_bits(case, name):
    arrays, _, sizes = _problem(case, np.float32)
    ref = relattn.rel_pos_attention(*arrays, **sizes, backend=name)
    eager = rj.rel_pos_attention(*(jnp.asarray(a) for a in arrays), **sizes, backend=name)
    jitted = jax.jit(lambda *a: rj.rel_pos_attention(*a, **sizes, backend=name))(*arrays)
    for got in (eager, jitted):
        assert isinstance(got, jax.Array) and got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), ref)


def test_numpy_inputs_are_converted():
    arrays, _, sizes = _problem(SAME_GRID, np.float32)
    out = rj.rel_pos_attention(*arrays, **sizes, backend="numpy")
    assert isinstance(out, jax.Array)
    np.testing.assert_array_equal(np.asarray(out), relattn.rel_pos_attention(*arrays, **sizes, backend="numpy"))


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("case, resize_dtype", [(SAME_GRID, "float32"), (RESIZED, "float32"),
                                                (RESIZED, "table"), (PLAIN, "float32")],
                         ids=["same-grid", "resized-float32", "resized-table", "plain"])
def test_grad_is_the_reference_pullback_float64(x64, case, resize_dtype):
    arrays, w, sizes = _problem(case)
    got = _grads(arrays, sizes, w, backend="numpy", resize_dtype=resize_dtype)
    _, want = _reference(arrays, sizes, w, backend="numpy", resize_dtype=resize_dtype)
    assert len(got) == len(want) == len(arrays)
    for name, g, r, a in zip(NAMES, got, want, arrays):
        assert g.dtype == np.float64 and g.shape == a.shape, name
        np.testing.assert_array_equal(g, r, err_msg=name)


@pytest.mark.parametrize("case", [SAME_GRID, RESIZED, PLAIN], ids=["same-grid", "resized", "plain"])
def test_grad_matches_finite_differences_float64(x64, case):
    # resize_dtype="table": float64 tables resized in float64 (the default
    # resize runs in float32, which a step of 1e-6 does not survive)
    arrays, w, sizes = _problem(case, seed=1)
    options = dict(backend="numpy", resize_dtype="table")
    loss = jax.jit(_loss(sizes, jnp.asarray(w), **options))
    grads = _grads(arrays, sizes, w, **options)
    rng = np.random.default_rng(2)
    eps = 1e-6
    for i, name in enumerate(NAMES[:len(arrays)]):
        direction = rng.standard_normal(arrays[i].shape)
        plus, minus = list(arrays), list(arrays)
        plus[i], minus[i] = arrays[i] + eps * direction, arrays[i] - eps * direction
        numeric = (float(loss(*plus)) - float(loss(*minus))) / (2 * eps)
        analytic = float(np.sum(grads[i] * direction))
        assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic)), (name, numeric, analytic)


@pytest.mark.parametrize("case", [SAME_GRID, RESIZED, PLAIN], ids=["same-grid", "resized", "plain"])
def test_grad_float32(case):
    arrays, w, sizes = _problem(case, np.float32)
    got = _grads(arrays, sizes, w)                                   # backend="auto"
    _, fused = _reference(arrays, sizes, w)                          # what the callback runs
    _, reference = _reference(arrays, sizes, w, backend="numpy")    # the reference backward
    for name, g, f, r in zip(NAMES, got, fused, reference):
        assert g.dtype == np.float32, name
        np.testing.assert_array_equal(g, f, err_msg=name)
        assert np.max(np.abs(g - r)) <= 1e-5 * np.max(np.abs(r)), name


def test_grad_of_some_arguments_under_jit():
    arrays, w, sizes = _problem(RESIZED, np.float32)
    q, k, v, th, tw = (jnp.asarray(a) for a in arrays)

    @jax.jit
    def tables_loss(th, tw):
        return jnp.sum(rj.rel_pos_attention(q, k, v, th, tw, **sizes, backend="numpy") * w)

    value, (d_h, d_w) = jax.value_and_grad(tables_loss, argnums=(0, 1))(th, tw)
    out, want = _reference(arrays, sizes, w, backend="numpy")
    np.testing.assert_allclose(float(value), np.sum(out * w), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(d_h), want[3])
    np.testing.assert_array_equal(np.asarray(d_w), want[4])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision(dtype):
    if dtype == "bfloat16" and BFLOAT16 is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    np_dtype = BFLOAT16 if dtype == "bfloat16" else np.dtype(np.float16)
    arrays, w, sizes = _problem(RESIZED, np.float32)
    arrays = [a.astype(np_dtype) for a in arrays]
    out = rj.rel_pos_attention(*arrays, **sizes, backend="numpy")
    assert out.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(out), relattn.rel_pos_attention(*arrays, **sizes, backend="numpy"))
    cotangent = w.astype(np_dtype)
    _, pullback = jax.vjp(lambda *a: rj.rel_pos_attention(*a, **sizes, backend="numpy"), *arrays)
    got = pullback(jnp.asarray(cotangent))
    _, want = relattn.rel_pos_attention_vjp(*arrays, **sizes, backend="numpy")
    for name, g, r in zip(NAMES, got, want(cotangent)):
        assert g.dtype == jnp.dtype(dtype), name
        np.testing.assert_array_equal(np.asarray(g).astype(np.float32), r.astype(np.float32), err_msg=name)


# ---------------------------------------------------------------- vmap
def test_vmap_runs_each_element():
    arrays, w, sizes = _problem(SAME_GRID, np.float32)
    q, k, v, th, tw = arrays
    # map over the batch axis: q, k, v mapped, the tables shared
    attend = lambda q, k, v: rj.rel_pos_attention(q[None], k[None], v[None], th, tw, **sizes, backend="numpy")[0]
    out = jax.jit(jax.vmap(attend))(q, k, v)
    np.testing.assert_array_equal(np.asarray(out), relattn.rel_pos_attention(*arrays, **sizes, backend="numpy"))
    # per-example gradients of the shared tables: one pullback per element
    loss = lambda th, tw, q, k, v, w: jnp.sum(
        rj.rel_pos_attention(q[None], k[None], v[None], th, tw, **sizes, backend="numpy")[0] * w)
    d_h, d_w = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, None, 0, 0, 0, 0))(th, tw, q, k, v, w)
    assert d_h.shape == (q.shape[0],) + th.shape
    for b in range(q.shape[0]):
        _, want = _reference([q[b:b + 1], k[b:b + 1], v[b:b + 1], th, tw], sizes, w[b:b + 1], backend="numpy")
        np.testing.assert_array_equal(np.asarray(d_h[b]), want[3])
        np.testing.assert_array_equal(np.asarray(d_w[b]), want[4])
    # mapped tables too
    stacked_h = jnp.stack([th, 2 * th])
    outs = jax.vmap(lambda th: rj.rel_pos_attention(q, k, v, th, tw, **sizes, backend="numpy"))(stacked_h)
    np.testing.assert_array_equal(np.asarray(outs[1]),
                                  relattn.rel_pos_attention(q, k, v, 2 * th, tw, **sizes, backend="numpy"))


# ---------------------------------------------------------------- training
def test_sgd_lowers_the_loss():
    rng = np.random.default_rng(3)
    batch, heads, grid, d = 2, 2, (4, 4), 8
    x = jnp.asarray(rng.standard_normal((batch, heads, 16, d), dtype=np.float32))
    target = jnp.asarray(rng.standard_normal((batch, heads, 16, d), dtype=np.float32))
    params = {"wq": jnp.asarray(np.eye(d, dtype=np.float32)), "wk": jnp.asarray(np.eye(d, dtype=np.float32)),
              "rel_pos_h": jnp.zeros((7, d), jnp.float32), "rel_pos_w": jnp.zeros((7, d), jnp.float32)}

    def loss(p):
        out = rj.rel_pos_attention(x @ p["wq"], x @ p["wk"], x, p["rel_pos_h"], p["rel_pos_w"], q_size=grid)
        return jnp.mean((out - target) ** 2)

    @jax.jit
    def step(p):
        value, grads = jax.value_and_grad(loss)(p)
        return value, jax.tree_util.tree_map(lambda a, g: a - 0.5 * g, p, grads)

    losses = []
    for _ in range(30):
        value, params = step(params)
        losses.append(float(value))
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:])), losses
    assert float(jnp.abs(params["rel_pos_h"]).max()) > 0   # the tables were trained


# ---------------------------------------------------------------- errors
def _ones(shape, dtype=jnp.float32):
    return jnp.ones(shape, dtype)


Q = _ones((1, 2, 12, 8))
TH, TW = _ones((5, 8)), _ones((7, 8))


@pytest.mark.parametrize("kwargs, error, start", [
    (dict(q_size=(3, 5)), ValueError, "q_size: expected q_h * q_w == Sq = 12"),
    (dict(q_size=(3, 4), k_size=(2, 2)), ValueError, "k_size: expected k_h * k_w == Sk = 12"),
    (dict(q_size=None), ValueError, "q_size: required with relative-position tables"),
    (dict(q_size=(3, 4.5)), ValueError, "q_size[1]: expected a positive integer"),
    (dict(q_size=(3, 4), scale=float("nan")), ValueError, "scale: expected a finite number"),
    (dict(q_size=(3, 4), scale=jnp.float32(0.5)), TypeError, "scale: expected a Python number"),
    (dict(q_size=(3, 4), backend="nope"), ValueError, "backend: expected one of"),
    (dict(q_size=(3, 4), backend=1), TypeError, "backend: expected a string"),
    (dict(q_size=(3, 4), resize_dtype="float16"), ValueError, "resize_dtype: expected 'float32' or 'table'"),
], ids=["q_size", "k_size", "no-q_size", "q_size-float", "scale-nan", "scale-traced", "backend", "backend-type",
        "resize_dtype"])
def test_bad_static_arguments_are_named(kwargs, error, start):
    eager = lambda: rj.rel_pos_attention(Q, Q, Q, TH, TW, **kwargs)
    jitted = lambda: jax.jit(lambda q: rj.rel_pos_attention(q, Q, Q, TH, TW, **kwargs))(Q)
    for run in (eager, jitted):
        with pytest.raises(error) as info:
            run()
        assert str(info.value).startswith(start), str(info.value)


@pytest.mark.parametrize("args, error, start", [
    ((Q.tolist(), Q, Q), TypeError, "q: expected a jax array (or a numpy array), got list"),
    ((Q, Q, Q, TH, None), ValueError, "rel_pos_w: expected both tables or neither"),
    ((Q, Q[:, :1], Q), ValueError, "k: expected shape (1, 2, Sk, 8)"),
    ((Q, Q, Q.astype(jnp.float16)), TypeError, "q, k, v: expected one dtype"),
    ((Q, Q, Q, TH[:, :4], TW), ValueError, "rel_pos_h: expected shape (L, 8)"),
    ((Q.astype(jnp.int32), Q, Q), TypeError, "q: expected a floating dtype"),
    ((np.ones((1, 2, 12, 8)), Q, Q), TypeError, "q: a float64 array needs jax_enable_x64"),
], ids=["list", "one-table", "k-shape", "dtypes", "table-width", "int", "float64-without-x64"])
def test_bad_arrays_are_named(args, error, start):
    if jax.config.read("jax_enable_x64"):
        pytest.skip("x64 is on in this process")
    with pytest.raises(error) as info:
        rj.rel_pos_attention(*args, q_size=(3, 4))
    assert str(info.value).startswith(start), str(info.value)


def test_cupy_backend_has_no_gradient():
    loss = lambda q: jnp.sum(rj.rel_pos_attention(q, Q, Q, TH, TW, q_size=(3, 4), backend="cupy"))
    with pytest.raises(relattn.BackendError, match="^backend: 'cupy' cannot be differentiated through relattn.jax"):
        jax.grad(loss)(Q)


def test_forward_mode_is_refused():
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda q: rj.rel_pos_attention(q, Q, Q, TH, TW, q_size=(3, 4)), (Q,), (Q,))
