"""Numerical behaviour at the edges, the same on every backend.

* Logits near the float16 / large-float32 range (``scale * q.k ~ 1e4``, and
  fp16 inputs whose fp16 dot products would overflow 65504 -- the SAM ViT-H
  fp16 failure): results are finite and agree with a float64 evaluation.
* NaN / Inf inputs: the documented IEEE behaviour of the formula (see
  docs/guarantees.md, "NaN and Inf"):

  - NaN or +-inf anywhere in query row i            -> output row i is NaN, other rows unaffected;
  - NaN in key j (or in a table row key j uses)      -> every affected query row is NaN
    (a NaN logit poisons its softmax row);
  - a +inf logit (from an infinite k or table entry) -> that row is NaN (inf - inf);
  - a -inf logit                                     -> that key gets weight 0 (row stays finite);
  - NaN in v_j column c                              -> column c of every row is NaN, others finite;
  - +-inf in v_j column c                            -> column c of every row is +-inf.

* Determinism: the same call twice gives bit-identical output on each CPU backend.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import oracle
import relattn

try:
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BFLOAT16 = None

HALF = [np.dtype(np.float16)] + ([BFLOAT16] if BFLOAT16 is not None else [])
HALF_IDS = ["float16", "bfloat16"][: len(HALF)]

# Known disagreement, reported to the numba backend's owner: its exp returns 0 for a
# NaN argument (``y if x >= LO else 0``) and its running max skips NaN, so a NaN
# logit is silently treated as -inf (weight 0) instead of making the row NaN.


def _call(backend, q, k, v, th=None, tw=None, q_size=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return relattn.rel_pos_attention(q, k, v, th, tw, q_size, backend=backend, **kw)


def _f64(*arrays):
    return [None if a is None else np.asarray(a).astype(np.float64) for a in arrays]


# ---------------------------------------------------------------------------
# Large logits
# ---------------------------------------------------------------------------


def _large_logits(d=64, grid=(4, 4), heads=2, level=1e4, seed=0):
    """q, k whose logits are ``level`` plus an O(1) spread: nothing saturates the softmax."""
    rng = np.random.default_rng(seed)
    s = grid[0] * grid[1]
    c = np.sqrt(level / d ** -0.5)  # scale * c * c == level
    q = rng.standard_normal((1, heads, s, d)) * 0.5
    k = rng.standard_normal((1, heads, s, d)) * 0.5
    q[..., 0] += c
    k[..., 0] += c
    v = rng.standard_normal((1, heads, s, d))
    th = rng.standard_normal((2 * grid[0] - 1, d)) * 0.01
    tw = rng.standard_normal((2 * grid[1] - 1, d)) * 0.01
    return q, k, v, th, tw


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logits_near_1e4(backend, dtype):
    q, k, v, th, tw = (a.astype(dtype) for a in _large_logits())
    out = _call(backend, q, k, v, th, tw, (4, 4))
    assert out.dtype == dtype and np.isfinite(out).all()
    ref = oracle.attention(*_f64(q, k, v, th, tw), (4, 4), (4, 4))
    # A float32 logit of 1e4 carries an absolute error ~1e-3: outputs to ~1e-2.
    tol = 2e-2 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(out, ref, atol=tol, rtol=0)


def test_huge_one_hot_logits(backend):
    """scale * q.k ~ 3e5 in float32 (far beyond fp16): a one-hot softmax, exactly."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 1, 9, 16)).astype(np.float32) * 300
    k = q.copy()
    v = rng.standard_normal((1, 1, 9, 16)).astype(np.float32)
    out = _call(backend, q, k, v)
    ref = oracle.attention(*_f64(q, k, v))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_half_inputs_whose_fp16_logits_overflow(backend, dtype):
    """The SAM ViT-H fp16 failure: q.k far above 65504. Accumulating in float32 is fine."""
    q, k, v, th, tw = _large_logits(level=2e5)
    q, k, v, th, tw = (a.astype(dtype) for a in (q, k, v, th, tw))
    qf, kf = q.astype(np.float32), k.astype(np.float32)
    with np.errstate(over="ignore"):
        naive = (qf.astype(np.float16) @ kf.astype(np.float16).swapaxes(-1, -2)) if dtype == np.float16 else None
    if naive is not None:
        assert not np.isfinite(naive).all(), "the case must overflow a naive fp16 q @ k.T"
    out = _call(backend, q, k, v, th, tw, (4, 4))
    assert out.dtype == dtype
    out32 = out.astype(np.float32)
    assert np.isfinite(out32).all()
    ref = oracle.attention(*_f64(q, k, v, th, tw), (4, 4), (4, 4))
    # Logits ~2e5 in float32: absolute logit error ~0.02 -> output error a few %, plus half rounding.
    np.testing.assert_allclose(out32, ref, atol=0.1, rtol=0)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_half_precision_rounds_once(backend, dtype):
    """Ordinary half inputs: within one half-precision rounding of the float64 result."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 2, 12, 32)).astype(dtype) for _ in range(3))
    th, tw = (rng.standard_normal((n, 32)).astype(dtype) * 0.1 for n in (5, 7))
    out = _call(backend, q, k, v, th, tw, (3, 4)).astype(np.float64)
    ref = oracle.attention(*_f64(q, k, v, th, tw), (3, 4), (3, 4))
    eps = float(np.finfo(np.float16).eps) if dtype == np.float16 else 2.0 ** -8
    np.testing.assert_allclose(out, ref, atol=eps * 2 * np.abs(ref).max(), rtol=0)


# ---------------------------------------------------------------------------
# NaN / Inf
# ---------------------------------------------------------------------------

DTYPES = [np.float64, np.float32, np.float16]


def _nan_case(dtype, seed=3):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 2, 6, 4)) for _ in range(3))
    th, tw = (rng.standard_normal((n, 4)) * 0.1 for n in (3, 5))
    return [a.astype(dtype) for a in (q, k, v)] + [th.astype(np.float32), tw.astype(np.float32)]


def _row_state(out):
    out = np.asarray(out, dtype=np.float64)
    return np.array([[np.isfinite(r).all() for r in h] for h in out[0]])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_query_row_poisons_only_that_row(backend, dtype, bad):
    q, k, v, th, tw = _nan_case(dtype)
    q[0, 1, 2, 1] = bad
    out = _call(backend, q, k, v, th, tw, (2, 3)).astype(np.float64)
    assert np.isnan(out[0, 1, 2]).all()
    finite = np.ones((2, 6), bool)
    finite[1, 2] = False
    np.testing.assert_array_equal(_row_state(out), finite)
    clean = _call(backend, *_nan_case(dtype), (2, 3)).astype(np.float64)
    np.testing.assert_array_equal(out[0][finite], clean[0][finite])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_key_poisons_every_row_of_its_head(backend, dtype):
    q, k, v, th, tw = _nan_case(dtype)
    k[0, 0, 3, 2] = np.nan
    out = _call(backend, q, k, v, th, tw, (2, 3)).astype(np.float64)
    assert np.isnan(out[0, 0]).all()
    assert np.isfinite(out[0, 1]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_table_row_poisons_the_rows_that_use_it(backend, dtype):
    q, k, v, th, tw = _nan_case(dtype)
    th[0, 1] = np.nan  # index y - ky + 1 == 0 only for (y=0, ky=1): query row y=0
    out = _call(backend, q, k, v, th, tw, (2, 3)).astype(np.float64)
    rows_y0 = np.isnan(out[0, :, :3]).all()
    assert rows_y0 and np.isfinite(out[0, :, 3:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_logits(backend, dtype):
    q, k, v, th, tw = _nan_case(dtype)
    q[..., 0] = np.where(np.arange(6) % 2 == 0, 1.0, -1.0)  # even rows see +inf, odd rows -inf
    k[0, :, 4, 0] = np.inf
    out = _call(backend, q, k, v, th, tw, (2, 3)).astype(np.float64)
    even, odd = out[0, :, 0::2], out[0, :, 1::2]
    assert np.isnan(even).all(), "a +inf logit makes its row NaN (inf - inf)"
    assert np.isfinite(odd).all(), "a -inf logit gives its key weight 0"
    q2, k2, v2, _, _ = (np.asarray(a, np.float64) for a in (q, k, v, th, tw))
    keep = [j for j in range(6) if j != 4]
    ref = oracle.attention(q2[:, :, 1::2], k2[:, :, keep], v2[:, :, keep], scale=0.5)
    # Without tables the key grid is plain, so the -inf key can simply be dropped.
    out_plain = _call(backend, q, k, v, scale=0.5).astype(np.float64)
    np.testing.assert_allclose(out_plain[:, :, 1::2], ref, rtol=2e-2 if dtype == np.float16 else 1e-5, atol=1e-3)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_value_poisons_its_column(backend, dtype, bad):
    q, k, v, th, tw = _nan_case(dtype)
    v[0, 0, 3, 2] = bad
    out = _call(backend, q, k, v, th, tw, (2, 3)).astype(np.float64)
    col = out[0, 0, :, 2]
    assert (np.isnan(col) if np.isnan(bad) else np.isposinf(col)).all()
    others = np.delete(out[0, 0], 2, axis=-1)
    assert np.isfinite(others).all() and np.isfinite(out[0, 1]).all()


# ---------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16] + ([BFLOAT16] if BFLOAT16 else []))
def test_same_call_twice_is_bit_identical(backend, dtype):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 3, 35, 16)).astype(dtype)
    k, v = (rng.standard_normal((2, 3, 35, 16)).astype(dtype) for _ in range(2))
    th, tw = (rng.standard_normal((n, 16)).astype(dtype) for n in (9, 11))  # resized to 13 and 9 rows
    first = relattn.rel_pos_attention(q, k, v, th, tw, (5, 7), backend=backend)
    for _ in range(3):
        again = relattn.rel_pos_attention(q.copy(), k.copy(), v.copy(), th, tw, (5, 7), backend=backend)
        assert first.tobytes() == again.tobytes()


def test_attention_layer_is_deterministic(backend):
    attn = relattn.Attention(32, 4, use_rel_pos=True, input_size=(6, 6), rel_pos_zero_init=False, rng=0,
                             backend=backend)
    x = np.random.default_rng(6).standard_normal((2, 7, 5, 32)).astype(np.float32)
    a, b = attn(x), attn(x)
    assert a.tobytes() == b.tobytes()
    assert attn(x, window_size=3).tobytes() == attn(x, window_size=3).tobytes()
