"""Edge tests of the numba attention kernel against a float64 numpy oracle."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from relattn.backends import numba_cpu  # noqa: E402
from relattn.backends import _numba_kernels as K  # noqa: E402

TOL = {np.float64: 1e-12, np.float32: 2e-6}


def oracle(q, k, v, rel_h, rel_w, k_size, scale):
    """Materialized float64 reference: (B, heads, Sq, d)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    logits = scale * np.einsum("bhid,bhjd->bhij", q, k)
    if rel_h is not None:
        rh = np.asarray(rel_h, dtype=np.float64)
        rw = np.asarray(rel_w, dtype=np.float64)
        B, H, Sq, _ = rh.shape
        logits = logits + (rh[..., :, :, None] + rw[..., :, None, :]).reshape(B, H, Sq, -1)
    logits = logits - logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return p @ v


def rel_err(out, ref):
    out = np.asarray(out, dtype=np.float64)
    return np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-300)


def make(B, H, Sq, q_d, k_size, dtype=np.float32, seed=0, mag=1.0, rel=True):
    rng = np.random.default_rng(seed)
    Sk = k_size[0] * k_size[1]
    q = (rng.standard_normal((B, H, Sq, q_d)) * mag).astype(dtype)
    k = (rng.standard_normal((B, H, Sk, q_d)) * mag).astype(dtype)
    v = rng.standard_normal((B, H, Sk, q_d)).astype(dtype)
    if not rel:
        return q, k, v, None, None
    cdt = np.float64 if dtype == np.float64 else np.float32
    rel_h = rng.standard_normal((B, H, Sq, k_size[0])).astype(cdt)
    rel_w = rng.standard_normal((B, H, Sq, k_size[1])).astype(cdt)
    return q, k, v, rel_h, rel_w


def check(q, k, v, rel_h, rel_w, k_size, tol, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = numba_cpu.attention(q, k, v, rel_h, rel_w, k_size, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = oracle(q, k, v, rel_h, rel_w, k_size, scale)
    assert np.all(np.isfinite(np.asarray(out, dtype=np.float64)))
    err = rel_err(out, ref)
    assert err <= tol, err
    return err


def test_interface():
    assert numba_cpu.NAME == "numba"
    assert numba_cpu.ARRAY_MODULE == "numpy"
    assert numba_cpu.unavailable_reason() is None
    q, k, v, rh, rw = make(1, 1, 4, 8, (2, 2))
    assert numba_cpu.not_supported_reasons(q, k, v, rh, rw, (2, 2)) == []
    qi = q.astype(np.int32)
    assert numba_cpu.not_supported_reasons(qi, qi, qi, rh, rw, (2, 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "B,H,Sq,d,k_size",
    [
        (2, 3, 196, 64, (14, 14)),   # SAM windowed shape
        (1, 2, 197, 32, (1, 197)),   # S not a multiple of any tile
        (1, 1, 1, 16, (3, 5)),       # one query
        (2, 2, 17, 16, (1, 1)),      # one key
        (1, 2, 30, 1, (5, 6)),       # head_dim 1
        (1, 2, 70, 80, (7, 10)),     # head_dim 80 (SAM-H), odd sizes
        (1, 2, 120, 24, (3, 5)),     # Sq != Sk (pooled keys)
        (1, 1, 9, 8, (20, 13)),      # Sq < Sk
        (1, 1, 300, 64, (16, 16)),   # several query and key tiles, partial last ones
    ],
)
def test_shapes(dtype, B, H, Sq, d, k_size):
    check(*make(B, H, Sq, d, k_size, dtype), k_size, TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plain_attention(dtype):
    q, k, v, _, _ = make(2, 3, 77, 32, (7, 11), dtype, rel=False)
    check(q, k, v, None, None, (7, 11), TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tq,tk", [(1, 1), (5, 7), (8, 3), (13, 64), (64, 5), (3, 200)])
def test_tile_remainders(dtype, tq, tk):
    """Drive the kernel directly with awkward tiles (odd remainders everywhere)."""
    q, k, v, rh, rw = make(2, 2, 29, 13, (5, 9), dtype)
    BH, Sq, d, Sk = 4, 29, 13, 45
    out = np.empty((BH, Sq, d), dtype)
    nonfinite = np.ones((BH, Sq), bool)
    args = (q.reshape(BH, Sq, d), k.reshape(BH, Sk, d), v.reshape(BH, Sk, d),
            rh.reshape(BH, Sq, 5), rw.reshape(BH, Sq, 9), True, 9, dtype(d ** -0.5), tq, tk)
    K.attention_fwd(*args, out, nonfinite)
    ref = oracle(q, k, v, rh, rw, (5, 9), d ** -0.5)
    assert rel_err(out.reshape(q.shape), ref) <= TOL[dtype]
    assert not nonfinite.any()
    serial = np.empty_like(out)
    K.attention_fwd(*args, serial, nonfinite, serial=True)  # the kernel without threads
    np.testing.assert_array_equal(serial, out)


def test_batch_zero():
    for dtype in (np.float32, np.float64, np.float16):
        q, k, v, rh, rw = make(0, 3, 16, 8, (4, 4), dtype)
        out = numba_cpu.attention(q, k, v, rh, rw, (4, 4), 8 ** -0.5)
        assert out.shape == (0, 3, 16, 8) and out.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_logits(dtype):
    """scale*q.k ~ 1e4: a naive exp overflows.  Integer-valued inputs keep the
    float32 logits exact, so the float32 tolerance still applies."""
    rng = np.random.default_rng(1)
    B, H, S, d, ks = 1, 2, 64, 64, (8, 8)
    q = rng.integers(-200, 201, (B, H, S, d)).astype(dtype)
    k = rng.integers(-200, 201, (B, H, S, d)).astype(dtype)
    v = rng.standard_normal((B, H, S, d)).astype(dtype)
    rh = rng.integers(-500, 500, (B, H, S, 8)).astype(dtype)
    rw = rng.integers(-500, 500, (B, H, S, 8)).astype(dtype)
    ref_logits = 0.125 * np.einsum("bhid,bhjd->bhij", q.astype(float), k.astype(float))
    assert np.abs(ref_logits).max() > 5e3
    check(q, k, v, rh, rw, ks, TOL[dtype], scale=0.125)
    check(q, k, v, None, None, ks, TOL[dtype], scale=0.125)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noncontiguous_and_not_modified(dtype):
    """q/k/v as strided views of a (B, S, 3, heads, d) qkv buffer, read-only."""
    rng = np.random.default_rng(2)
    B, S, H, d, ks = 2, 49, 3, 16, (7, 7)
    qkv = rng.standard_normal((B, S, 3, H, d)).astype(dtype)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    cdt = np.float64 if dtype == np.float64 else np.float32
    rel_full = rng.standard_normal((B, H, S, 2 * 7)).astype(cdt)
    rh, rw = rel_full[..., :7], rel_full[..., 7:]   # strided too
    assert not q.flags.c_contiguous and not rh.flags.c_contiguous
    saved = [a.copy() for a in (qkv, rel_full)]
    qkv.flags.writeable = False
    rel_full.flags.writeable = False
    check(q, k, v, rh, rw, ks, TOL[dtype])
    np.testing.assert_array_equal(qkv, saved[0])
    np.testing.assert_array_equal(rel_full, saved[1])
    # negative strides
    check(q[:, ::-1], k[:, :, ::-1], v[:, :, ::-1], rh[:, ::-1], rw[:, ::-1], ks, TOL[dtype])


def test_float16():
    q, k, v, rh, rw = make(2, 3, 50, 32, (5, 10), np.float16)
    out = numba_cpu.attention(q, k, v, rh, rw, (5, 10), 32 ** -0.5)
    assert out.dtype == np.float16
    ref = oracle(q, k, v, rh, rw, (5, 10), 32 ** -0.5)
    # float32 compute, one rounding at the end: within half an ulp of fp16 (+ fp32 noise)
    assert np.all(np.abs(out.astype(np.float64) - ref) <= np.abs(ref) * 2.0 ** -11 * 1.01 + 1e-6)


def test_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    q, k, v, rh, rw = make(1, 2, 40, 16, (4, 10), np.float32)
    q, k, v = (a.astype(bf16) for a in (q, k, v))
    out = numba_cpu.attention(q, k, v, rh, rw, (4, 10), 0.25)
    assert out.dtype == bf16
    ref = oracle(q, k, v, rh, rw, (4, 10), 0.25)
    assert np.all(np.abs(out.astype(np.float64) - ref) <= np.abs(ref) * 2.0 ** -8 * 1.01 + 1e-6)


def test_exp_accuracy():
    """Relative error on normal results; subnormal results within one unit of
    the subnormal spacing (beside the relative error) of numpy's exp (a weight of 1e-42 is not 0: times an
    infinite value it is infinite); 0 where numpy's exp rounds to 0."""
    for dtype, tol, lo, hi in ((np.float32, 2.5e-7, -87.0, -110.0), (np.float64, 1e-15, -708.0, -760.0)):
        xs = np.concatenate([np.linspace(hi, 0, 400001), np.linspace(-1, 1, 1001)]).astype(dtype)
        out = np.empty_like(xs)
        K.exp_array(xs, out)
        ref = np.exp(xs.astype(np.float64))
        normal = xs >= lo
        assert np.all(np.abs(out[normal] - ref[normal]) <= tol * ref[normal])
        tiny = np.finfo(dtype).smallest_subnormal
        want = np.exp(xs[~normal])  # numpy in the dtype itself: subnormal, then 0
        assert np.all(np.abs(out[~normal] - want) <= tol * want + tiny)
        assert np.any(out[~normal] > 0) and np.all(out[xs < hi + 5] == 0)
        special = np.array([-np.inf, np.nan], dtype)
        got = np.empty_like(special)
        K.exp_array(special, got)
        assert got[0] == 0 and np.isnan(got[1])


def test_long_sequence_float32():
    """S = 4096 (SAM global): float32 accumulation over many keys stays <= 2e-6."""
    check(*make(1, 1, 4096, 64, (64, 64), np.float32, seed=3), (64, 64), TOL[np.float32])
