"""The reference path runs inside another array-API namespace (array-api-strict), unconverted."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import oracle

xps = pytest.importorskip("array_api_strict")
pytest.importorskip("array_api_compat")
import relattn.array_api as ra  # noqa: E402


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 2), heads=st.integers(1, 2), head_dim=st.sampled_from([1, 4, 9]),
    q_grid=st.tuples(st.integers(1, 4), st.integers(1, 4)), k_grid=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    extra_rows=st.tuples(st.integers(-2, 3), st.integers(-2, 3)), seed=st.integers(0, 2**16),
)
def test_equals_the_oracle_in_array_api_strict(batch, heads, head_dim, q_grid, k_grid, extra_rows, seed):
    rng = np.random.default_rng(seed)
    sq, sk = q_grid[0] * q_grid[1], k_grid[0] * k_grid[1]
    q = rng.standard_normal((batch, heads, sq, head_dim))
    k, v = (rng.standard_normal((batch, heads, sk, head_dim)) for _ in range(2))
    rows = [max(1, 2 * max(a, b) - 1 + e) for a, b, e in zip(q_grid, k_grid, extra_rows)]  # forces resizes
    th, tw = (rng.standard_normal((r, head_dim)) for r in rows)
    out = ra.rel_pos_attention(*(xps.asarray(a) for a in (q, k, v, th, tw)), q_grid, k_grid)
    assert type(out) is type(xps.asarray(q))  # stayed in the caller's namespace
    expected = oracle.attention(q, k, v, th, tw, q_grid, k_grid)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=1e-10)


def test_plain_attention_and_float32_in_array_api_strict():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 6, 4)).astype(np.float32)
    out = ra.rel_pos_attention(xps.asarray(q), xps.asarray(q), xps.asarray(q))
    assert out.dtype == xps.float32
    np.testing.assert_allclose(np.asarray(out), oracle.attention(q.astype(np.float64), q, q), rtol=0, atol=2e-6)


def test_bad_input_names_the_argument():
    q = xps.asarray(np.zeros((1, 1, 4, 2)))
    with pytest.raises(TypeError, match="q"):
        ra.rel_pos_attention(xps.asarray(np.zeros((1, 1, 4, 2), dtype=np.int64)), q, q)
    with pytest.raises(ValueError, match="q_size"):
        ra.rel_pos_attention(q, q, q, xps.asarray(np.zeros((3, 2))), xps.asarray(np.zeros((3, 2))), (3, 3))
