"""relattn_wgt: float32 as 3xTF32 on Hopper's warpgroup tensor-core
instructions (skipped without CuPy, a CUDA device or an sm_90a-capable one).

Cases are compared with the float64 numpy evaluation of tests/test_gpu.py and
with the FMA path's own error; every case asserts that relattn_wgt is the
kernel that runs (the plan's family and configuration).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

# test_gpu skips the whole module where CuPy or a CUDA device is missing
from test_gpu import cupy  # noqa: E402

pytestmark = pytest.mark.gpu

import relattn  # noqa: E402
from relattn.backends import gpu  # noqa: E402
from relattn.backends.gpu import NoKernel  # noqa: E402
from relattn.backends.gpu.families import tf32, wgt  # noqa: E402
from test_gpu import core_plan, from_dev, make_case, problem, reference, rel_l2  # noqa: E402


@pytest.fixture
def sm90():
    """The device, where the sm_90a kernels can run on it (else the test is skipped)."""
    from test_gpu import hopper

    return hopper()


def _pad16(d):
    return max(16, (d + 15) // 16 * 16)


def _wgt(hd, bn, bias):
    return wgt.Config(hd, bn, wgt.Bias(bias))


WGT_SHAPES = [  # B, H, q grid, k grid, head_dim
    (2, 3, (14, 14), (14, 14), 64),    # SAM windows: 16-slot key rows (WINDOW)
    (1, 2, (16, 64), (16, 64), 64),    # k_w == 64 (KEY_ROWS)
    (2, 3, (9, 64), (5, 64), 64),      # q / k grids of different sizes, partial row tiles
    (1, 2, (15, 20), (10, 12), 56),    # head_dim 56 read as 64, 300 queries
    (2, 2, (7, 7), (7, 7), 20),        # head_dim 20 read as 32
    (1, 1, (1, 1), (1, 3), 64),        # one query, three keys
    (1, 2, (5, 9), (17, 16), 48),      # k_w at the 16-slot limit, k_h past 16
    (1, 1, (3, 5), (33, 2), 16),       # two keys per 16-slot row, 33 rows
    (1, 2, (8, 64), (8, 64), 80),      # SAM-H's head_dim: 32-key tiles, k_w == 64 rows in halves
    (2, 2, (9, 64), (3, 64), 72),      # head_dim 72 read as 80, partial row tiles
    (2, 3, (14, 14), (14, 14), 80),    # SAM-H windows
]


@pytest.mark.parametrize("bn", [None, 64, 32])
@pytest.mark.parametrize("shape", WGT_SHAPES)
def test_wgt_matches_float64(shape, bn, sm90):
    """Against float64 at float32-level error (and within 2x of the FMA path's
    own error), chosen by the planner and with either key tile forced
    (kernel="wgt", kernel_options bn; 32 only above head_dim 64); inputs unchanged."""
    B, H, qg, kg, D = shape
    hd = _pad16((D + 3) // 4 * 4)
    rng = np.random.default_rng(zlib.crc32(repr((shape, bn and str(bn))).encode()))
    dev, host = make_case(rng, B, H, qg, kg, D, "float32", relmag=2.0)
    if bn == 64 and hd > 64:   # does not fit the registers: refused, the default tile runs
        with pytest.raises(NoKernel):
            core_plan(dev, kg, D ** -0.5, "wgt", bn=bn)
        bn = None
    plan = core_plan(dev, kg, D ** -0.5) if bn is None else core_plan(dev, kg, D ** -0.5, "wgt", bn=bn)
    assert plan.family == "wgt" and plan.config.hd == hd
    if bn is not None:
        assert plan.config.bn == bn
    if hd > 64:
        assert plan.config.bn == 32
    before = [x.copy() for x in dev]
    out = plan.run(*dev)
    assert out.dtype == cupy.float32 and out.shape == dev[0].shape and out.flags.c_contiguous
    for a, b in zip(dev, before):
        assert bool((a == b).all())
    ref = reference(*host, kg, D ** -0.5)
    err = rel_l2(from_dev(out), ref)
    with relattn.gpu_float32_mode("fma"):
        err_fma = rel_l2(from_dev(gpu.attention(*dev, kg, D ** -0.5)), ref)
    assert err <= 1e-5 and err <= 2 * err_fma + 2e-7, (err, err_fma)


@pytest.mark.parametrize("D", [80, 64, 40, 16])
@pytest.mark.parametrize("sizes", [(1, 3), (300, 1000), (77, 65), (64, 129)])
def test_wgt_without_terms_any_length(sizes, D, sm90):
    """No bias (NONE): any number of keys (the last tile masked) and queries."""
    Sq, Sk = sizes
    rng = np.random.default_rng(zlib.crc32(repr((sizes, D)).encode()))
    (q, k, v, _, _), (qr, kr, vr, _, _) = make_case(rng, 1, 2, (1, Sq), (1, Sk), D, "float32", with_rel=False)
    plan = core_plan((q, k, v, None, None), None, D ** -0.5)
    assert (plan.family, plan.config) == ("wgt", _wgt(_pad16(D), 32 if D > 64 else 64, 0))
    out = plan.run(q, k, v, None, None)
    assert rel_l2(from_dev(out), reference(qr, kr, vr, None, None, None, D ** -0.5)) <= 1e-5


@pytest.mark.parametrize("why", ["head_dim 96", "k_w 30", "keys not whole rows", "k_w 17"])
def test_wgt_not_taken(why, sm90):
    """Where relattn_wgt does not serve a problem, relattn_tf32 runs (and it
    serves every one relattn_wgt does, forced with kernel="tf32")."""
    hd, kh, kw = 64, 14, 14
    Sk = kh * kw
    if why == "head_dim 96":
        hd = 96
    elif why == "k_w 30":
        kw, Sk = 30, kh * 30
    elif why == "k_w 17":
        kw, Sk = 17, kh * 17
    else:
        Sk -= 1
    p = problem(hd, Sk, Sk, kh, kw, dtype="float32")
    assert wgt.not_supported_reasons(p, sm90, False)
    assert tf32.not_supported_reasons(p, sm90, False) == []
    sam = problem(64, 196, 196, 14, 14, dtype="float32")
    assert wgt.not_supported_reasons(sam, sm90, False) == []
    assert tf32.not_supported_reasons(sam, sm90, False) == []


@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("kg", [(14, 14), (8, 64)])
def test_wgt_non_finite_inputs_follow_ieee_like_fma(kg, D, sm90):
    """Infinite / NaN k and v elements: relattn_wgt flags its blocks, the
    IEEE-safe pass of relattn_tf32 redoes them; the NaN / inf pattern and the
    finite values match the FMA path."""
    rng = np.random.default_rng(29)
    S = kg[0] * kg[1]
    q, k, v = (rng.standard_normal((2, 4, S, D)).astype(np.float32) for _ in range(3))
    q[0, 1, :, 0] = np.where(np.arange(S) % 2 == 0, 1.0, -1.0)
    k[0, 1, 7, 0] = np.inf           # head 1: +inf logits (NaN rows) and -inf logits (weight 0)
    v[0, 2, 11, 5] = np.inf          # head 2: column 5 becomes +inf
    v[1, 3, S - 3, 9] = np.nan       # batch 1, head 3: column 9 becomes NaN
    rh = (0.5 * rng.standard_normal((2, 4, S, kg[0]))).astype(np.float32)
    rw = (0.5 * rng.standard_normal((2, 4, S, kg[1]))).astype(np.float32)
    dev = [cupy.asarray(a) for a in (q, k, v, rh, rw)]
    plan = core_plan(dev, kg, 0.125)
    assert (plan.family, plan.config) == ("wgt", _wgt(D, 32 if (kg[1] <= 16 or D > 64) else 64,
                                                       5 if kg[1] <= 16 else 1))
    got = plan.run(*dev).get()
    with relattn.gpu_float32_mode("fma"):
        want = gpu.attention(*dev, kg, 0.125).get()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    assert np.isnan(want[0, 1, 0::2]).all() and np.isfinite(want[0, 1, 1::2]).all()
    assert np.isposinf(want[0, 2, :, 5]).all() and np.isnan(want[1, 3, :, 9]).all()
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=0, atol=2e-5 * np.abs(want[fin]).max())
    assert np.isfinite(got[0, 0]).all() and np.isfinite(got[1, :3]).all()   # untouched heads stay finite


def test_wgt_public_call_on_strided_views(sm90):
    """SAM's windowed layout through the public function: q / k / v as
    strided views of one qkv array, terms from the tables."""
    rng = np.random.default_rng(31)
    B, S, H, d = 3, 196, 4, 64
    qkv = cupy.asarray(rng.standard_normal((B, S, 3, H, d)).astype(np.float32))
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    th = cupy.asarray(rng.standard_normal((27, d)).astype(np.float32))
    tw = cupy.asarray(rng.standard_normal((27, d)).astype(np.float32))
    fast = relattn.rel_pos_attention(q, k, v, th, tw, (14, 14))
    assert relattn.plan(q, k, v, th, tw, (14, 14)).kernel.startswith("relattn_wgt (bn=32 bias=WINDOW)")
    exact = relattn.rel_pos_attention(*(x.astype(cupy.float64) for x in (q, k, v, th, tw)), (14, 14))
    assert rel_l2(from_dev(fast), from_dev(exact)) <= 1e-5
