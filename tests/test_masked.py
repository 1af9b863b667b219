"""Masked and non-finite inputs: every backend gives the reference's result.

The numpy backend (the formula, materialized) is the reference. A fused
backend walks the keys in tiles with a running maximum, so the cases that
break such kernels are built on purpose: keys masked with -inf through ``k``
(a -inf channel the query weights positively) or through a table row (a
whole key row or column of the bias for some queries), whole key tiles
masked, every key masked, and weights so small that only a subnormal float
keeps them non-zero next to an infinite value. The rule: the same NaN
pattern, the same infinities, and the finite values within the dtype's
tolerance.

On the GPU backend the arrays are CuPy arrays, so its own planning (fused
terms included) runs; the test skips there without CuPy and a device.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import relattn

try:
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - optional dependency
    BFLOAT16 = None

DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16)]
if BFLOAT16 is not None:
    DTYPES.append(BFLOAT16)

# |error| <= RTOL * max|finite reference| + ATOL, on the finite entries
RTOL = {"float64": 1e-9, "float32": 1e-5, "float16": 1e-2, "bfloat16": 2e-2}
ATOL = {"float64": 1e-12, "float32": 1e-6, "float16": 1e-3, "bfloat16": 2e-3}

MASK_KINDS = ["keys", "table_h", "table_w", "first_tile", "tile", "key_row", "all", "none"]


def _on(backend, arrays):
    """The arrays as ``backend`` takes them natively (CuPy for the GPU)."""
    if relattn.backends.get(backend).ARRAY_MODULE == "cupy":
        import cupy

        return [None if a is None else cupy.asarray(a) for a in arrays]
    return arrays


def _host(out):
    return out.get() if hasattr(out, "get") else np.asarray(out)


def assert_same_ieee(got, want, dtype, what=""):
    """Same NaN pattern, same infinities, finite entries within tolerance."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    assert np.array_equal(nan_got, nan_want), (
        f"{what}: NaN pattern differs at {np.argwhere(nan_got != nan_want)[:5].tolist()} "
        f"(got {got[nan_got != nan_want][:5]}, reference {want[nan_got != nan_want][:5]})")
    inf_want = np.isinf(want)
    assert np.array_equal(np.isinf(got), inf_want), (
        f"{what}: infinities differ at {np.argwhere(np.isinf(got) != inf_want)[:5].tolist()}")
    assert np.array_equal(got[inf_want], want[inf_want]), f"{what}: infinities of another sign"
    finite = np.isfinite(want)
    if finite.any():
        name = np.dtype(dtype).name
        err = np.max(np.abs(got[finite] - want[finite]))
        tol = RTOL[name] * np.max(np.abs(want[finite])) + ATOL[name]
        assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} ({name})"


@st.composite
def masked_problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([2, 8, 16, 32, 64, 80]))
    k_h, k_w = draw(st.integers(1, 14)), draw(st.integers(1, 14))
    if draw(st.booleans()):
        q_h, q_w = k_h, k_w
    else:
        q_h, q_w = draw(st.integers(1, 14)), draw(st.integers(1, 14))
    Sq, Sk = q_h * q_w, k_h * k_w
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, Sq, head_dim))
    k = rng.standard_normal((batch, heads, Sk, head_dim))
    v = rng.standard_normal((batch, heads, Sk, head_dim))
    rows_h, rows_w = 2 * max(q_h, k_h) - 1, 2 * max(q_w, k_w) - 1
    if draw(st.booleans()):  # a table that needs resizing
        rows_h, rows_w = draw(st.integers(1, 2 * rows_h)), draw(st.integers(1, 2 * rows_w))
    table_h = rng.standard_normal((rows_h, head_dim)) * 0.5
    table_w = rng.standard_normal((rows_w, head_dim)) * 0.5
    # channel 0 carries the masks: every query weights it positively
    q[..., 0] = np.abs(q[..., 0]) + 0.5
    kind = draw(st.sampled_from(MASK_KINDS))
    if kind == "keys":
        k[..., rng.random(Sk) < draw(st.floats(0.1, 0.9)), 0] = -np.inf
    elif kind == "table_h":
        table_h[rng.integers(rows_h, size=draw(st.integers(1, rows_h))), 0] = -np.inf
    elif kind == "table_w":
        table_w[rng.integers(rows_w, size=draw(st.integers(1, rows_w))), 0] = -np.inf
    elif kind == "first_tile":  # the first 16 / 32 / 64 / 128 keys: a kernel's first key tiles
        k[..., : draw(st.sampled_from([16, 32, 64, 128])), 0] = -np.inf
    elif kind == "tile":
        t = draw(st.sampled_from([32, 64]))
        start = t * draw(st.integers(0, max(0, (Sk - 1) // t)))
        k[..., start:start + t, 0] = -np.inf
    elif kind == "key_row":
        ky = draw(st.integers(0, k_h - 1))
        k[..., ky * k_w:(ky + 1) * k_w, 0] = -np.inf
    elif kind == "all":
        k[..., 0] = -np.inf
    with_tables = draw(st.booleans()) or kind.startswith("table")
    cast = [a.astype(dtype) for a in (q, k, v)]
    tables = [t.astype(dtype) for t in (table_h, table_w)] if with_tables else [None, None]
    return dict(arrays=cast + tables, q_size=(q_h, q_w), k_size=(k_h, k_w), dtype=dtype,
                what=f"{kind}, q {(q_h, q_w)}, k {(k_h, k_w)}, d {head_dim}, {dtype.name}, "
                     f"tables {with_tables}, seed {seed}")


def _run(backend, problem, **kw):
    arrays = _on(backend, problem["arrays"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reference's inf - inf
        return _host(relattn.rel_pos_attention(
            *arrays, q_size=problem["q_size"], k_size=problem["k_size"], backend=backend, **kw))


def _supported(backend, problem):
    try:
        relattn.explain(*_on(backend, problem["arrays"]), q_size=problem["q_size"],
                        k_size=problem["k_size"], backend=backend)
        return True
    except relattn.BackendError:
        return False


@settings(max_examples=60)
@given(problem=masked_problems())
def test_masked_inputs_match_reference(backend, problem):
    assume(_supported(backend, problem))
    want = _run("numpy", problem)
    got = _run(backend, problem)
    assert_same_ieee(got, want, problem["dtype"], f"{backend}: {problem['what']}")


@settings(max_examples=40)
@given(dtype=st.sampled_from(DTYPES), data=st.data())
def test_infinite_values_under_tiny_weights(backend, dtype, data):
    """A key whose weight is subnormal but not zero, next to an infinite value:
    weight x inf is inf (not 0 x inf = NaN); a weight that is exactly 0 in the
    reference gives NaN on every backend too."""
    Sk = data.draw(st.integers(2, 160))
    depth = data.draw(st.sampled_from([20.0, 90.0, 95.0, 100.0, 103.0, 200.0, 700.0, 740.0, 800.0]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    k = rng.standard_normal((1, 1, Sk, 1))
    hot = data.draw(st.integers(0, Sk - 1))
    k[0, 0, hot, 0] = -depth
    v = rng.standard_normal((1, 1, Sk, 1))
    v[0, 0, hot, 0] = data.draw(st.sampled_from([np.inf, -np.inf, np.nan]))
    q = np.ones((1, 1, 2, 1))
    problem = dict(arrays=[q.astype(dtype), k.astype(dtype), v.astype(dtype), None, None],
                   q_size=(1, 2), k_size=(1, Sk), dtype=dtype)
    assume(_supported(backend, problem))
    want = _run("numpy", problem, scale=1.0)
    got = _run(backend, problem, scale=1.0)
    assert_same_ieee(got, want, dtype, f"{backend}: depth {depth}, Sk {Sk}, {np.dtype(dtype).name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_first_key_tile_masked(backend, dtype):
    """A query whose first 64 keys are all -inf gets the softmax over the rest."""
    q = np.ones((1, 1, 1, 2), dtype)
    k = np.zeros((1, 1, 128, 2), dtype)
    k[..., :64, 0] = -np.inf
    v = np.ones((1, 1, 128, 2), dtype)
    problem = dict(arrays=[q, k, v, None, None], q_size=(1, 1), k_size=(1, 128), dtype=dtype)
    assume_ok = _supported(backend, problem)
    if not assume_ok:
        pytest.skip(f"backend {backend!r} does not take {dtype.name}")
    out = _run(backend, dict(problem, k_size=None, q_size=None))
    np.testing.assert_array_equal(out.astype(np.float64), np.ones((1, 1, 1, 2)))


def test_subnormal_weight_times_inf_is_inf(backend):
    q = np.ones((1, 1, 1, 1), np.float32)
    k = np.array([0.0, -95.0], np.float32).reshape(1, 1, 2, 1)
    v = np.array([1.0, np.inf], np.float32).reshape(1, 1, 2, 1)
    problem = dict(arrays=[q, k, v, None, None], q_size=None, k_size=None, dtype=np.float32)
    assert _run(backend, problem, scale=1.0)[0, 0, 0, 0] == np.inf


@pytest.mark.parametrize("table_dtype", ["same", "float32"])
@pytest.mark.parametrize("dtype", DTYPES[2:], ids=lambda d: d.name)
def test_infinite_table_entries(backend, dtype, table_dtype):
    """A -inf entry of a table masks the keys its row reaches (the query's
    weight on that channel is positive); the GPU's terms kernel splits
    float32 tables into two 16-bit halves, where -inf - -inf must not
    become NaN. One head, q grid == k grid (2, 1)."""
    rng = np.random.default_rng(3)
    q = np.abs(rng.standard_normal((1, 1, 2, 2))) + 0.5
    k, v = rng.standard_normal((1, 1, 2, 2)), rng.standard_normal((1, 1, 2, 2))
    table_h = rng.standard_normal((3, 2)) * 0.5
    table_h[1, 0] = -np.inf                      # the diagonal (ky == y): each query's own key row
    table_w = rng.standard_normal((1, 2)) * 0.5
    tdt = dtype if table_dtype == "same" else np.dtype(np.float32)
    problem = dict(arrays=[q.astype(dtype), k.astype(dtype), v.astype(dtype), table_h.astype(tdt),
                           table_w.astype(tdt)], q_size=(2, 1), k_size=(2, 1), dtype=dtype)
    if not _supported(backend, problem):
        pytest.skip(f"backend {backend!r} does not take {dtype.name}")
    want = _run("numpy", problem)
    assert np.isfinite(want).all()
    assert_same_ieee(_run(backend, problem), want, dtype, f"{backend}: {dtype.name}, tables {tdt.name}")


def underflow_problem(qh, qw, dtype, table_dtype, D=64):
    """q, k, v (1, 2, qh * qw, D) of ``dtype``, tables of ``table_dtype`` and
    the scale, where three keys get a logit about -90 below every row's
    maximum (a float32 subnormal weight, zero in 16-bit or TF32 weights) and
    hold +-inf and NaN in v: the fast paths' 0 x inf = NaN against the
    formula's infinities."""
    S = qh * qw
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 2, S, D)) * 0.3
    k = rng.standard_normal((1, 2, S, D)) * 0.3
    v = rng.standard_normal((1, 2, S, D))
    q[..., 0] = 1.0
    scale = D ** -0.5
    hot = [3, S // 2 + 5, S - 1]
    k[..., hot, 0] = -90.0 / scale          # logit about -90 at these keys for every query
    v[0, 0, hot[0], 1], v[0, 0, hot[1], 2], v[0, 1, hot[2], 3] = np.inf, -np.inf, np.nan
    v[0, 1, hot[0], 4] = np.inf
    v[0, 1, hot[1], 4] = -np.inf             # inf + -inf: NaN in the formula too
    th, tw = (rng.standard_normal((2 * n - 1, D)) * 0.2 for n in (qh, qw))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), th.astype(table_dtype), tw.astype(table_dtype), scale


# (kernel family, dtype, q grid, tables in q's dtype (the fused-terms modes), float32 mode)
FAMILY_CASES = [
    ("ws", "bfloat16", (64, 64), True, None), ("ws", "float16", (64, 64), False, None),
    ("ws", "bfloat16", (14, 14), True, None), ("ws", "float16", (14, 14), False, None),
    ("wg", "bfloat16", (32, 32), False, None), ("wg", "float16", (20, 24), False, None),
    ("mma", "bfloat16", (16, 16), False, None), ("mma", "float16", (14, 14), False, None),
    ("win", "bfloat16", (14, 14), True, None), ("win", "float16", (14, 14), False, None),
    ("wgt", "float32", (14, 14), False, "3xtf32"), ("tf32", "float32", (20, 20), False, "3xtf32"),
    ("tf32", "float32", (14, 14), False, "tf32"), ("simt", "float32", (14, 14), False, "fma"),
    ("simt", "float64", (10, 12), False, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", FAMILY_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2][0]}x{c[2][1]}"
                         + ("-fused" if c[3] else "") + (f"-{c[4]}" if c[4] else ""))
def test_gpu_families_recompute_non_finite_rows(case):
    """Each GPU kernel family, forced: values +-inf and NaN under a weight
    that underflows the fast path (logit about -90 below the row's maximum:
    a float32 subnormal, zero in the kernels' flushed 16-bit or TF32
    weights) give the formula's infinities, not 0 x inf = NaN; the rows the
    kernel recomputes keep their finite columns within tolerance, and the
    other rows are untouched."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    kernel, name, (qh, qw), fused_tables, mode = case
    dtype = BFLOAT16 if name == "bfloat16" else np.dtype(name)
    if dtype is None:
        pytest.skip("ml_dtypes is not installed")
    *host, table_h, table_w, scale = underflow_problem(qh, qw, dtype, dtype if fused_tables else np.float32)
    tables = [table_h, table_w]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = relattn.rel_pos_attention(*host, *tables, (qh, qw), scale=scale, backend="numpy")
    dev = [cupy.asarray(a) for a in host + tables]
    with relattn.gpu_float32_mode(mode or "3xtf32"):
        try:
            p = relattn.plan(*dev, (qh, qw), scale=scale, kernel=kernel)
        except relattn.BackendError as exc:
            pytest.skip(f"relattn_{kernel} does not serve this case here: {exc}")
        assert p.kernel.startswith(f"relattn_{kernel} (")
        got = _host(p(*dev))
    assert np.isinf(want.astype(np.float64)).any() and np.isnan(want.astype(np.float64)).any()
    assert_same_ieee(got, want, dtype, f"{p.kernel}, {name}")
