"""Property tests of relattn's functional API, run against every backend.

Every case is checked against ``oracle.py`` (independent float64 loops written
from spec/REFERENCE.md) or against an algebraic property of attention.
Heavier variants are marked ``slow``; ``pytest -m "not slow"`` skips them and
``HYPOTHESIS_PROFILE=thorough`` runs many more examples.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import oracle

try:
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - optional dependency
    ml_dtypes = None
    BFLOAT16 = None

FLOAT_DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16)]
if BFLOAT16 is not None:
    FLOAT_DTYPES.append(BFLOAT16)
HALF_DTYPES = [dt for dt in FLOAT_DTYPES if dt.itemsize == 2]

HEAD_DIMS = [1, 8, 17, 64, 80]

# error <= RTOL * max|reference| + ATOL
RTOL = {"float64": 1e-10, "float32": 2e-6, "float16": 1e-2, "bfloat16": 1e-2}
ATOL = {"float64": 1e-12, "float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-3}


def _relattn():
    import relattn

    return relattn


def assert_close(got, want, dtype, what="output", scale_by=None):
    """Compare ``got`` to the float64 ``want`` with the tolerance for ``dtype``."""
    name = np.dtype(dtype).name
    got64 = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got64.shape == want.shape, f"{what}: shape {got64.shape} != {want.shape}"
    if want.size == 0:
        return
    assert np.all(np.isfinite(got64)), f"{what}: non-finite values"
    ref = np.max(np.abs(want)) if scale_by is None else scale_by
    tol = RTOL[name] * ref + ATOL[name]
    err = np.max(np.abs(got64 - want))
    assert err <= tol, (
        f"{what} ({name}): max abs error {err:.3g} > tol {tol:.3g} "
        f"(max|ref| {ref:.3g}, worst index "
        f"{np.unravel_index(np.argmax(np.abs(got64 - want)), want.shape)})"
    )


def random_array(rng, shape, dtype, magnitude=1.0):
    return (rng.standard_normal(shape) * magnitude).astype(dtype)


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------


@st.composite
def table_rows(draw, wanted):
    """Rows of a stored table: usually the exact size, else forcing a resize."""
    kind = draw(st.sampled_from(["exact", "exact", "down", "up"]))
    if kind == "exact":
        return wanted
    if kind == "down":
        return draw(st.integers(1, max(1, wanted)))  # may equal wanted: fine
    return draw(st.integers(wanted, 2 * wanted + 4))


@st.composite
def attention_cases(draw, dtypes=tuple(FLOAT_DTYPES), max_side=4, head_dims=tuple(HEAD_DIMS),
                    max_batch=3, max_heads=3, with_tables=True):
    batch = draw(st.integers(0, max_batch))
    heads = draw(st.integers(1, max_heads))
    head_dim = draw(st.sampled_from(head_dims))
    q_size = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    if draw(st.booleans()):
        k_size = q_size
    else:
        k_size = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    rows_h = draw(table_rows(2 * max(q_size[0], k_size[0]) - 1))
    rows_w = draw(table_rows(2 * max(q_size[1], k_size[1]) - 1))
    dtype = draw(st.sampled_from(list(dtypes)))
    seed = draw(st.integers(0, 2**32 - 1))
    table_magnitude = draw(st.sampled_from([0.0, 0.3, 1.0])) if with_tables else None
    return dict(batch=batch, heads=heads, head_dim=head_dim, q_size=q_size, k_size=k_size,
                rows=(rows_h, rows_w), dtype=np.dtype(dtype), seed=seed,
                table_magnitude=table_magnitude)


def build(case):
    """Arrays (q, k, v, rel_pos_h, rel_pos_w) for a case, in the case's dtype."""
    rng = np.random.default_rng(case["seed"])
    B, heads, d, dtype = case["batch"], case["heads"], case["head_dim"], case["dtype"]
    Sq = case["q_size"][0] * case["q_size"][1]
    Sk = case["k_size"][0] * case["k_size"][1]
    q = random_array(rng, (B, heads, Sq, d), dtype)
    k = random_array(rng, (B, heads, Sk, d), dtype)
    v = random_array(rng, (B, heads, Sk, d), dtype)
    mag = case["table_magnitude"]
    if mag is None:
        return q, k, v, None, None
    # q_i . R ~ N(0, mag^2): logits of order one, as in trained models
    rel_pos_h = random_array(rng, (case["rows"][0], d), dtype, mag / np.sqrt(d))
    rel_pos_w = random_array(rng, (case["rows"][1], d), dtype, mag / np.sqrt(d))
    return q, k, v, rel_pos_h, rel_pos_w


# ---------------------------------------------------------------------------
# Agreement with the oracle
# ---------------------------------------------------------------------------


@given(case=attention_cases())
def test_attention_matches_oracle(backend, case):
    relattn = _relattn()
    q, k, v, rh, rw = build(case)
    out = relattn.rel_pos_attention(q, k, v, rh, rw, case["q_size"], case["k_size"],
                                    backend=backend)
    assert out.dtype == case["dtype"]
    assert out.shape == q.shape
    want = oracle.attention(q, k, v, rh, rw, case["q_size"], case["k_size"])
    assert_close(out, want, case["dtype"])


@pytest.mark.slow
@given(case=attention_cases(max_side=7, max_batch=2, max_heads=2))
def test_attention_matches_oracle_larger_grids(backend, case):
    relattn = _relattn()
    q, k, v, rh, rw = build(case)
    out = relattn.rel_pos_attention(q, k, v, rh, rw, case["q_size"], case["k_size"],
                                    backend=backend)
    want = oracle.attention(q, k, v, rh, rw, case["q_size"], case["k_size"])
    assert_close(out, want, case["dtype"])


@given(case=attention_cases(with_tables=False), with_sizes=st.booleans())
def test_plain_attention_matches_oracle(backend, case, with_sizes):
    relattn = _relattn()
    q, k, v, _, _ = build(case)
    if with_sizes:
        out = relattn.rel_pos_attention(q, k, v, None, None, case["q_size"], case["k_size"],
                                        backend=backend)
    else:
        out = relattn.rel_pos_attention(q, k, v, backend=backend)
    assert out.dtype == case["dtype"]
    assert_close(out, oracle.attention(q, k, v), case["dtype"])


@given(case=attention_cases(dtypes=(np.float64, np.float32)),
       scale=st.sampled_from([0.0, 0.01, 0.37, 1.0, 2.5]))
def test_explicit_scale_matches_oracle(backend, case, scale):
    relattn = _relattn()
    q, k, v, rh, rw = build(case)
    out = relattn.rel_pos_attention(q, k, v, rh, rw, case["q_size"], case["k_size"],
                                    scale=scale, backend=backend)
    want = oracle.attention(q, k, v, rh, rw, case["q_size"], case["k_size"], scale=scale)
    # logits grow like scale * sqrt(d); so does their float32 rounding error
    growth = max(1.0, scale * np.sqrt(case["head_dim"]))
    assert_close(out, want, case["dtype"], scale_by=growth * np.max(np.abs(want), initial=0.0))


def test_head_dim_80_scale_is_not_a_power_of_two(backend):
    """SAM-H: head_dim 80, scale 80**-0.5; a rounded scale would show here."""
    relattn = _relattn()
    rng = np.random.default_rng(80)
    q, k, v = (rng.standard_normal((1, 2, 9, 80)) * 3 for _ in range(3))
    rh = rng.standard_normal((5, 80)) * 0.1
    rw = rng.standard_normal((5, 80)) * 0.1
    out = relattn.rel_pos_attention(q, k, v, rh, rw, (3, 3), (3, 3), backend=backend)
    assert_close(out, oracle.attention(q, k, v, rh, rw, (3, 3), (3, 3)), np.float64)


@given(case=attention_cases())
def test_decomposed_rel_pos_matches_oracle(case):
    relattn = _relattn()
    q, _, _, rh, rw = build(case)
    rel_h, rel_w = relattn.decomposed_rel_pos(q, rh, rw, case["q_size"], case["k_size"])
    compute = np.dtype(np.float32) if case["dtype"].itemsize == 2 else case["dtype"]
    assert rel_h.dtype == compute and rel_w.dtype == compute
    want_h, want_w = oracle.decomposed_rel_pos(q, rh, rw, case["q_size"], case["k_size"])
    # compute-dtype tolerance: a dot product of half inputs in float32 is near exact
    tol_dtype = np.float32 if case["dtype"].itemsize == 2 else case["dtype"]
    assert_close(rel_h, want_h, tol_dtype, "rel_h")
    assert_close(rel_w, want_w, tol_dtype, "rel_w")


@given(size_q=st.integers(1, 40), size_k=st.integers(1, 40), data=st.data(),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_get_rel_pos_matches_oracle(size_q, size_k, data, dtype):
    relattn = _relattn()
    wanted = 2 * max(size_q, size_k) - 1
    rows = data.draw(table_rows(wanted), label="rows")
    channels = data.draw(st.sampled_from([1, 3, 8]), label="channels")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    table = random_array(rng, (rows, channels), dtype)
    got = relattn.get_rel_pos(size_q, size_k, table)
    assert got.shape == (size_q, size_k, channels)
    want = oracle.get_rel_pos(size_q, size_k, table)
    if rows == wanted:  # a pure gather: bit-identical
        np.testing.assert_array_equal(np.asarray(got, dtype=np.float64), want)
    else:
        assert_close(got, want, dtype, "get_rel_pos", scale_by=np.max(np.abs(table)))


@pytest.mark.parametrize("q_size,k_size", [(56, 7), (7, 56), (5, 3), (3, 5), (64, 64), (14, 7)])
def test_get_rel_pos_index_tables(q_size, k_size):
    """Gather indices (table[i] = i) match the float32/truncation formula exactly."""
    relattn = _relattn()
    wanted = 2 * max(q_size, k_size) - 1
    table = np.arange(wanted, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    got = relattn.get_rel_pos(q_size, k_size, table)
    index = oracle.rel_pos_index(q_size, k_size)
    np.testing.assert_array_equal(got[..., 0], index.astype(np.float32))
    np.testing.assert_array_equal(got[..., 1], index.astype(np.float32))


@given(rows=st.integers(1, 80), length=st.integers(1, 200), channels=st.integers(1, 5),
       magnitude=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**32 - 1))
def test_resize_matches_oracle(rows, length, channels, magnitude, seed):
    """The oracle follows REFERENCE.md's float32 recipe with its two FMAs: bit-identical."""
    relattn = _relattn()
    rng = np.random.default_rng(seed)
    table = random_array(rng, (rows, channels), np.float32, magnitude)
    got = relattn.resize_rel_pos(table, length)
    assert got.shape == (length, channels) and got.dtype == np.float32
    np.testing.assert_array_equal(got, oracle.linear_resize(table, length))


@given(rows=st.integers(1, 40), length=st.integers(1, 90), seed=st.integers(0, 2**32 - 1))
def test_resize_float64_table_uses_float32_arithmetic(rows, length, seed):
    relattn = _relattn()
    table = np.random.default_rng(seed).standard_normal((rows, 3))
    got = relattn.resize_rel_pos(table, length)
    assert got.dtype == np.float64
    if length != rows:
        np.testing.assert_array_equal(got, oracle.linear_resize(table, length))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda dt: dt.name)
def test_resize_half_is_float32_resize_cast_back(dtype):
    relattn = _relattn()
    rng = np.random.default_rng(3)
    for rows, length in [(27, 13), (127, 63), (127, 159), (5, 13)]:
        table = random_array(rng, (rows, 8), dtype)
        got = relattn.resize_rel_pos(table, length)
        assert got.dtype == dtype
        want = relattn.resize_rel_pos(table.astype(np.float32), length).astype(dtype)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_resize_endpoints_not_preserved():
    """127 -> 79 samples source row 0.304 at output row 0 (align_corners=False)."""
    relattn = _relattn()
    table = np.arange(127, dtype=np.float32)[:, None]
    got = relattn.resize_rel_pos(table, 79)
    np.testing.assert_allclose(got[0, 0], 127 / 79 * 0.5 - 0.5, rtol=1e-6)
    np.testing.assert_allclose(got[-1, 0], 127 / 79 * 78.5 - 0.5, rtol=1e-6)


# ---------------------------------------------------------------------------
# Algebraic properties
# ---------------------------------------------------------------------------


@given(case=attention_cases(dtypes=(np.float64, np.float32)))
def test_zero_tables_equal_plain_attention(backend, case):
    relattn = _relattn()
    q, k, v, rh, rw = build(case)
    zeros_h, zeros_w = np.zeros_like(rh), np.zeros_like(rw)
    with_zero = relattn.rel_pos_attention(q, k, v, zeros_h, zeros_w, case["q_size"],
                                          case["k_size"], backend=backend)
    plain = relattn.rel_pos_attention(q, k, v, backend=backend)
    assert_close(with_zero, np.asarray(plain, np.float64), case["dtype"], "zero tables")


@given(n=st.integers(1, 20), channels=st.integers(1, 4), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(FLOAT_DTYPES))
def test_bias_depends_only_on_offset_when_sizes_match(n, channels, seed, dtype):
    relattn = _relattn()
    rng = np.random.default_rng(seed)
    table = random_array(rng, (2 * n - 1, channels), dtype)
    R = np.asarray(relattn.get_rel_pos(n, n, table))
    assert R.dtype == table.dtype
    for y in range(n):
        for ky in range(n):
            np.testing.assert_array_equal(R[y, ky].view(np.uint8),
                                          table[y - ky + n - 1].view(np.uint8))


@given(q_h=st.integers(1, 5), q_w=st.integers(1, 5), d=st.sampled_from([1, 8, 17]),
       seed=st.integers(0, 2**32 - 1))
def test_decomposed_terms_are_toeplitz_for_a_constant_query(q_h, q_w, d, seed):
    """With the same q at every position, rel_h[(y, x), ky] depends only on y - ky."""
    relattn = _relattn()
    rng = np.random.default_rng(seed)
    q = np.broadcast_to(rng.standard_normal(d), (1, q_h * q_w, d)).copy()
    rh = rng.standard_normal((2 * q_h - 1, d))
    rw = rng.standard_normal((2 * q_w - 1, d))
    rel_h, rel_w = relattn.decomposed_rel_pos(q, rh, rw, (q_h, q_w), (q_h, q_w))
    rel_h = rel_h.reshape(q_h, q_w, q_h)
    rel_w = rel_w.reshape(q_h, q_w, q_w)
    for y in range(q_h):
        for x in range(q_w):
            for ky in range(q_h):
                np.testing.assert_allclose(rel_h[y, x, ky], q[0, 0] @ rh[y - ky + q_h - 1],
                                           rtol=1e-12, atol=1e-12)
            for kx in range(q_w):
                np.testing.assert_allclose(rel_w[y, x, kx], q[0, 0] @ rw[x - kx + q_w - 1],
                                           rtol=1e-12, atol=1e-12)


@given(case=attention_cases(dtypes=(np.float64, np.float32)), data=st.data())
def test_batch_and_head_permutations_commute(backend, case, data):
    relattn = _relattn()
    q, k, v, rh, rw = build(case)
    B, heads = case["batch"], case["heads"]
    perm_b = np.array(data.draw(st.permutations(range(B)), label="batch perm"), dtype=np.intp)
    perm_h = np.array(data.draw(st.permutations(range(heads)), label="head perm"),
                      dtype=np.intp)
    args = (case["q_size"], case["k_size"])
    out = relattn.rel_pos_attention(q, k, v, rh, rw, *args, backend=backend)
    permuted = relattn.rel_pos_attention(q[perm_b][:, perm_h], k[perm_b][:, perm_h],
                                         v[perm_b][:, perm_h], rh, rw, *args, backend=backend)
    want = np.asarray(out, np.float64)[perm_b][:, perm_h]
    assert_close(permuted, want, case["dtype"], "permuted")


@given(case=attention_cases(), factor=st.sampled_from([0.5, 2.0, -1.0, 4.0, 0.0]))
def test_scaling_v_scales_output(backend, case, factor):
    relattn = _relattn()
    q, k, v, rh, rw = build(case)
    args = (case["q_size"], case["k_size"])
    out = relattn.rel_pos_attention(q, k, v, rh, rw, *args, backend=backend)
    scaled_v = (v.astype(np.float64) * factor).astype(case["dtype"])  # exact: powers of 2
    scaled = relattn.rel_pos_attention(q, k, scaled_v, rh, rw, *args, backend=backend)
    want = np.asarray(out, np.float64) * factor
    assert_close(scaled, want, case["dtype"], "scaled v",
                 scale_by=max(np.max(np.abs(want), initial=0.0), 1e-30))


@given(case=attention_cases(dtypes=(np.float64,)), shift=st.floats(-30, 30))
def test_shifting_all_keys_by_one_vector_is_invariant(backend, case, shift):
    """k_j -> k_j + u shifts row i of the logits by scale * q_i.u, the same for every j,
    so the output is unchanged (and large logits must not overflow the softmax)."""
    relattn = _relattn()
    q, k, v, rh, rw = build(case)
    rng = np.random.default_rng(case["seed"] + 1)
    u = rng.standard_normal(case["head_dim"]) * shift
    args = (case["q_size"], case["k_size"])
    out = relattn.rel_pos_attention(q, k, v, rh, rw, *args, backend=backend)
    shifted = relattn.rel_pos_attention(q, k + u, v, rh, rw, *args, backend=backend)
    assert_close(shifted, oracle.attention(q, k + u, v, rh, rw, *args), np.float64,
                 "shifted keys", scale_by=max(1.0, 1e2 * float(np.max(np.abs(u), initial=0))))
    assert_close(shifted, np.asarray(out), np.float64, "shift invariance",
                 scale_by=max(1.0, 1e2 * float(np.max(np.abs(u), initial=0))))


@given(case=attention_cases())
def test_inputs_are_never_modified(backend, case):
    relattn = _relattn()
    arrays = build(case)
    copies = [None if a is None else a.copy() for a in arrays]
    q, k, v, rh, rw = arrays
    relattn.rel_pos_attention(q, k, v, rh, rw, case["q_size"], case["k_size"],
                              backend=backend)
    relattn.decomposed_rel_pos(q, rh, rw, case["q_size"], case["k_size"])
    for name, a, c in zip(["q", "k", "v", "rel_pos_h", "rel_pos_w"], arrays, copies):
        if a is not None:
            np.testing.assert_array_equal(a.view(np.uint8), c.view(np.uint8), err_msg=name)


@given(case=attention_cases(max_batch=2))
def test_read_only_and_non_contiguous_inputs(backend, case):
    relattn = _relattn()
    q, k, v, rh, rw = build(case)
    args = (case["q_size"], case["k_size"])
    want = relattn.rel_pos_attention(q, k, v, rh, rw, *args, backend=backend)

    def strided(a):
        # same values, but a transposed view of a (B, S, heads, d) buffer, read-only
        buf = np.ascontiguousarray(a.transpose(0, 2, 1, 3))
        view = buf.transpose(0, 2, 1, 3)
        view.flags.writeable = False
        return view

    def strided_table(a):
        buf = np.asfortranarray(a)
        buf.flags.writeable = False
        return buf

    got = relattn.rel_pos_attention(strided(q), strided(k), strided(v), strided_table(rh),
                                    strided_table(rw), *args, backend=backend)
    assert_close(got, np.asarray(want, np.float64), case["dtype"], "strided inputs")


def test_empty_batch(backend):
    relattn = _relattn()
    q = np.zeros((0, 2, 6, 8), np.float32)
    rh = np.zeros((3, 8), np.float32)
    rw = np.zeros((5, 8), np.float32)
    out = relattn.rel_pos_attention(q, q, q, rh, rw, (2, 3), (2, 3), backend=backend)
    assert out.shape == (0, 2, 6, 8) and out.dtype == np.float32


def test_auto_backend_agrees_with_numpy():
    relattn = _relattn()
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 3, 12, 16)).astype(np.float32) for _ in range(3))
    rh = rng.standard_normal((5, 16)).astype(np.float32) * 0.25
    rw = rng.standard_normal((7, 16)).astype(np.float32) * 0.25
    auto = relattn.rel_pos_attention(q, k, v, rh, rw, (3, 4), (3, 4))
    ref = relattn.rel_pos_attention(q, k, v, rh, rw, (3, 4), (3, 4), backend="numpy")
    assert_close(auto, np.asarray(ref, np.float64), np.float32, "auto vs numpy")


# ---------------------------------------------------------------------------
# Windows and tables
# ---------------------------------------------------------------------------


@given(B=st.integers(0, 3), H=st.integers(1, 12), W=st.integers(1, 12),
       C=st.integers(1, 4), ws=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_partition_then_unpartition_is_identity(B, H, W, C, ws, seed):
    relattn = _relattn()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, H, W, C)).astype(np.float32)
    windows, pad_hw = relattn.window_partition(x, ws)
    want_windows, want_pad = oracle.window_partition(x, ws)
    assert tuple(pad_hw) == want_pad
    np.testing.assert_array_equal(windows, want_windows)
    back = relattn.window_unpartition(windows, ws, pad_hw, (H, W))
    np.testing.assert_array_equal(back, x)


@given(rows=st.integers(1, 130), channels=st.integers(1, 9), dtype=st.sampled_from(FLOAT_DTYPES),
       seed=st.integers(0, 2**32 - 1))
def test_resize_to_same_length_is_bit_identical(rows, channels, dtype, seed):
    relattn = _relattn()
    rng = np.random.default_rng(seed)
    table = random_array(rng, (rows, channels), dtype, 10.0)
    before = table.copy()
    got = relattn.resize_rel_pos(table, rows)
    assert got.dtype == table.dtype and got.shape == table.shape
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), before.view(np.uint8))
    np.testing.assert_array_equal(table.view(np.uint8), before.view(np.uint8))


@given(rows=st.integers(1, 40), length=st.integers(1, 90), seed=st.integers(0, 2**32 - 1))
def test_resize_of_a_constant_table_is_constant(rows, length, seed):
    relattn = _relattn()
    value = np.float32(np.random.default_rng(seed).standard_normal())
    table = np.full((rows, 3), value, dtype=np.float32)
    got = relattn.resize_rel_pos(table, length)
    # (1 - l1) * c + l1 * c may round by an ulp; never more
    np.testing.assert_allclose(got, value, rtol=2 * np.finfo(np.float32).eps, atol=0)
