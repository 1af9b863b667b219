"""The ``resize_dtype`` keyword: the arithmetic of the relative-position table resize.

``"float32"`` (default): PyTorch's float32 ``F.interpolate(mode="linear")``, bit
for bit (the result cast back to the table's dtype). ``"table"``: float64
tables resized in float64, bit for bit as PyTorch's float64 interpolate (what
SAM's / timm's / HF's code computes for a float64 table); other tables as
``"float32"``.

The torch cross-checks skip without torch; the GPU ones without CuPy and a
CUDA device.
"""

from __future__ import annotations

import pickle
from fractions import Fraction

import numpy as np
import pytest

import relattn
from relattn import functional
from relattn.relpos import _fma64, _resize_plan, decomposed_rel_pos_rows, terms

# (rows stored, rows wanted): SAM's real resizes (127 -> 63/79/95/159), both
# directions, degenerate tables and outputs, and pairs where PyTorch's float64
# kernel floors a source index rounded to float (2 -> 6, 2 -> 14, ...).
SIZES = [(127, 159), (127, 63), (127, 79), (127, 95), (159, 127), (27, 13), (13, 27), (1, 5), (5, 1),
         (2, 6), (2, 14), (3, 7), (7, 3), (63, 64), (64, 63), (27, 55), (55, 27), (255, 511), (511, 255),
         (2, 1), (1, 2), (14, 127), (127, 14)]


def _random_sizes(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        L, M = int(rng.integers(1, 300)), int(rng.integers(1, 400))
        if L != M:
            out.append((L, M))
    return out


ALL_SIZES = SIZES + _random_sizes(120, 5)


def _torch():
    return pytest.importorskip("torch")


def torch_resize(table, length):
    """``F.interpolate`` as SAM's get_rel_pos calls it, in the table's own dtype."""
    torch = _torch()
    t = torch.from_numpy(np.ascontiguousarray(table))
    out = torch.nn.functional.interpolate(t.reshape(1, t.shape[0], -1).permute(0, 2, 1), size=length,
                                          mode="linear")
    return out.reshape(-1, length).permute(1, 0).numpy()


def _table(rng, rows, channels, dtype):
    return (rng.standard_normal((rows, channels)) * 10.0 ** rng.uniform(-6, 6)).astype(dtype)


def _assert_bits(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape)
    if not np.array_equal(got, want):
        bad = np.argwhere(got != want)
        pytest.fail(f"{what}: {len(bad)} values differ (first at {tuple(bad[0])}), "
                    f"max |diff| {np.max(np.abs(got.astype(np.float64) - want)):.3g}")


# ------------------------------------------------------------ the resize itself
@pytest.mark.parametrize("rows, length", ALL_SIZES)
def test_float32_table_both_modes_bit_identical_to_torch(rows, length):
    rng = np.random.default_rng(rows * 1000 + length)
    table = _table(rng, rows, 9, np.float32)
    want = torch_resize(table, length)
    for mode in ("float32", "table"):
        _assert_bits(relattn.resize_rel_pos(table, length, resize_dtype=mode), want, f"{rows}->{length} {mode}")


@pytest.mark.parametrize("rows, length", ALL_SIZES)
def test_float64_table_mode_bit_identical_to_torch_float64(rows, length):
    rng = np.random.default_rng(rows * 1000 + length + 1)
    for channels in (3, 64):
        table = _table(rng, rows, channels, np.float64)
        got = relattn.resize_rel_pos(table, length, resize_dtype="table")
        _assert_bits(got, torch_resize(table, length), f"{rows}->{length} C={channels}")


@pytest.mark.parametrize("rows, length", ALL_SIZES)
def test_float64_float32_mode_is_torch_float32_of_the_cast_table(rows, length):
    rng = np.random.default_rng(rows * 1000 + length + 2)
    table = _table(rng, rows, 5, np.float64)
    got = relattn.resize_rel_pos(table, length)   # the default
    want = torch_resize(table.astype(np.float32), length).astype(np.float64)
    _assert_bits(got, want, f"{rows}->{length}")
    _assert_bits(relattn.resize_rel_pos(table, length, resize_dtype="float32"), want, f"{rows}->{length}")


def test_modes_differ_on_interpolated_float64_tables_by_float32_rounding():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((127, 64)) * 0.02   # SAM-like magnitudes
    for length in (63, 79, 95, 159):
        wide = relattn.resize_rel_pos(table, length, resize_dtype="table")
        narrow = relattn.resize_rel_pos(table, length)
        diff = np.max(np.abs(wide - narrow)) / np.max(np.abs(table))
        assert 1e-9 < diff < 1e-4, (length, diff)
    # no resize: both modes return the table itself
    for mode in ("float32", "table"):
        np.testing.assert_array_equal(relattn.resize_rel_pos(table, 127, resize_dtype=mode), table)


def test_float64_plan_floors_like_torch():
    """PyTorch's float64 kernel computes ``floorf(src)``: a source index just
    below an integer (2 -> 6, row 4: 0.9999999999999999) takes that integer."""
    i0, i1, lambda0, lambda1 = _resize_plan(2, 6, "float64")
    assert (i0[4], i1[4], lambda1[4, 0], lambda0[4, 0]) == (1, 1, 0.0, 1.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_tables_resize_in_float32_in_both_modes(dtype):
    dt = np.dtype(dtype) if dtype == "float16" else np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    table = np.random.default_rng(1).standard_normal((27, 8)).astype(dt)
    want = relattn.resize_rel_pos(table.astype(np.float32), 41).astype(dt)
    for mode in ("float32", "table"):
        got = relattn.resize_rel_pos(table, 41, resize_dtype=mode)
        assert got.dtype == dt
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def _exact_fma(a, b, c):
    a, b, c = float(a), float(b), float(c)
    if not all(np.isfinite(x) for x in (a, b, c)):
        return a * b + c
    r = Fraction(a) * Fraction(b) + Fraction(c)
    if r == 0:
        return -0.0 if (a == 0 or b == 0) and np.signbit(a) != np.signbit(b) and np.signbit(c) else 0.0
    try:
        return float(r)
    except OverflowError:
        return np.inf if r > 0 else -np.inf


def test_fma64_is_correctly_rounded():
    """The float64 fma emulation against exact rational arithmetic: random
    operands, near-cancellation, exact ties, and extreme magnitudes."""
    rng = np.random.default_rng(7)
    n = 4000
    a = rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 8, n)
    b = rng.uniform(0, 1, n)
    c = rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 8, n)
    cancel = -(a * b) * (1 + rng.choice([0.0, 2.0 ** -52, -(2.0 ** -53)], n))
    ties_a = rng.integers(-2 ** 30, 2 ** 30, n) * 2.0 ** rng.integers(-40, 40, n)
    ties_b = rng.integers(0, 2 ** 24, n) / 2.0 ** 24
    ties_c = rng.integers(-2 ** 53, 2 ** 53, n) * 2.0 ** rng.integers(-40, 40, n)
    half = rng.integers(2 ** 52, 2 ** 53, n).astype(np.float64)   # + 0.5 exactly: a tie
    odd_a = np.array([1e300, 1e-300, 1e308, -1e-310, 0.0, -0.0, np.inf, np.nan, 5e-324, 2.0 ** 950, 1.0, -0.0])
    odd_b = np.array([0.7, 0.3, 0.999, 0.5, 0.5, 0.25, 0.5, 0.5, 0.5, 0.5, 0.0, 0.25])
    odd_c = np.array([1e300, -1e-300, 1e308, 1e-310, -0.0, -0.0, 1.0, 1.0, 0.0, -2.0 ** 949, -0.0, -0.0])
    for x, y, z in ((a, b, c), (a, b, cancel), (ties_a, ties_b, ties_c),
                    (np.ones(n), np.full(n, 0.5), half), (odd_a, odd_b, odd_c)):
        got = _fma64(x, y, z)
        for i in range(len(x)):
            want = _exact_fma(x[i], y[i], z[i])
            ok = (np.isnan(got[i]) and np.isnan(want)) or (got[i] == want and np.signbit(got[i]) == np.signbit(want))
            assert ok, (x[i], y[i], z[i], got[i], want)


# ------------------------------------------------------------ attention vs SAM in float64
def sam_attention_torch(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size):
    """SAM's eager attention in the inputs' dtype (float64 here), tables
    resized by ``F.interpolate`` in their own dtype. q, k, v: (B, heads, S, d)."""
    torch = _torch()
    F = torch.nn.functional

    def get_rel_pos(qs, ks, table):
        rows = 2 * max(qs, ks) - 1
        if table.shape[0] != rows:
            table = F.interpolate(table.reshape(1, table.shape[0], -1).permute(0, 2, 1), size=rows,
                                  mode="linear").reshape(-1, rows).permute(1, 0)
        qc = torch.arange(qs)[:, None] * max(ks / qs, 1.0)
        kc = torch.arange(ks)[None, :] * max(qs / ks, 1.0)
        return table[((qc - kc) + (ks - 1) * max(qs / ks, 1.0)).long()]

    q, k, v, th, tw = (torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k, v, rel_pos_h, rel_pos_w))
    B, H, Sq, d = q.shape
    (qh, qw), (kh, kw) = q_size, k_size
    q3, k3, v3 = q.reshape(B * H, Sq, d), k.reshape(B * H, -1, d), v.reshape(B * H, -1, d)
    attn = (q3 * d ** -0.5) @ k3.transpose(-2, -1)
    rq = q3.reshape(B * H, qh, qw, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", rq, get_rel_pos(qh, kh, th))
    rel_w = torch.einsum("bhwc,wkc->bhwk", rq, get_rel_pos(qw, kw, tw))
    attn = (attn.view(B * H, qh, qw, kh, kw) + rel_h[..., None] + rel_w[..., None, :]).view(B * H, Sq, kh * kw)
    return (attn.softmax(dim=-1) @ v3).view(B, H, Sq, d).numpy()


def _float64_case(seed=0, q_size=(10, 6), trained=(8, 8), d=16):
    rng = np.random.default_rng(seed)
    S = q_size[0] * q_size[1]
    q, k, v = (rng.standard_normal((1, 2, S, d)) for _ in range(3))
    th = rng.standard_normal((2 * trained[0] - 1, d)) * 0.5   # 15 rows -> 19
    tw = rng.standard_normal((2 * trained[1] - 1, d)) * 0.5   # 15 rows -> 11
    return q, k, v, th, tw, q_size


def test_attention_float64_table_mode_matches_sam_in_float64(backend):
    q, k, v, th, tw, grid = _float64_case()
    want = sam_attention_torch(q, k, v, th, tw, grid, grid)
    wide = relattn.rel_pos_attention(q, k, v, th, tw, grid, resize_dtype="table", backend=backend)
    narrow = relattn.rel_pos_attention(q, k, v, th, tw, grid, backend=backend)
    err_wide = np.max(np.abs(wide - want))
    err_narrow = np.max(np.abs(narrow - want))
    assert err_wide <= 1e-13, err_wide
    assert 1e-8 < err_narrow < 1e-4, err_narrow
    # a second call takes the cached plan: same bits, mode still applied
    np.testing.assert_array_equal(relattn.rel_pos_attention(q, k, v, th, tw, grid, resize_dtype="table",
                                                            backend=backend), wide)
    np.testing.assert_array_equal(relattn.rel_pos_attention(q, k, v, th, tw, grid, backend=backend), narrow)


def test_attention_float64_table_mode_chunked_rows(monkeypatch):
    """The row-chunked CPU path (terms over TERMS_BUDGET) gets the resized tables too."""
    q, k, v, th, tw, grid = _float64_case(seed=3)
    want = sam_attention_torch(q, k, v, th, tw, grid, grid)
    monkeypatch.setattr(functional, "TERMS_BUDGET", 4096)
    functional._plans.clear()
    try:
        got = relattn.rel_pos_attention(q, k, v, th, tw, grid, resize_dtype="table", backend="numpy")
    finally:
        functional._plans.clear()
    assert np.max(np.abs(got - want)) <= 1e-13


# ------------------------------------------------------------ the keyword reaches every function
def test_get_rel_pos_and_terms_pass_the_mode():
    q, _, _, th, tw, grid = _float64_case(seed=1)
    for mode in ("float32", "table"):
        resized = relattn.resize_rel_pos(th, 19, resize_dtype=mode)
        np.testing.assert_array_equal(relattn.get_rel_pos(10, 10, th, resize_dtype=mode),
                                      relattn.get_rel_pos(10, 10, resized))
    assert not np.array_equal(relattn.get_rel_pos(10, 10, th, resize_dtype="table"), relattn.get_rel_pos(10, 10, th))
    sized = (relattn.resize_rel_pos(th, 19, resize_dtype="table"), relattn.resize_rel_pos(tw, 11, resize_dtype="table"))
    want = relattn.decomposed_rel_pos(q, *sized, grid, grid)
    got = relattn.decomposed_rel_pos(q, th, tw, grid, grid, resize_dtype="table")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    for g, w in zip(terms(q, th, tw, grid, grid, "table"), want):
        np.testing.assert_array_equal(g, w)
    rows = decomposed_rel_pos_rows(q[:, :, 7:31], th, tw, grid, grid, 7, "table")
    for g, w in zip(rows, want):
        np.testing.assert_allclose(g, w[:, :, 7:31], rtol=0, atol=1e-13)
    default = relattn.decomposed_rel_pos(q, th, tw, grid, grid)
    assert not np.array_equal(default[0], got[0])


def test_plan_and_explain_pass_the_mode():
    q, k, v, th, tw, grid = _float64_case(seed=2)
    want = relattn.rel_pos_attention(q, k, v, th, tw, grid, resize_dtype="table", backend="numpy")
    p = relattn.plan(q, k, v, th, tw, grid, resize_dtype="table", backend="numpy")
    np.testing.assert_array_equal(p(q, k, v, th, tw), want)
    np.testing.assert_array_equal(p(q, k, v, th, tw), want)
    default = relattn.plan(q, k, v, th, tw, grid, backend="numpy")(q, k, v, th, tw)
    assert not np.array_equal(default, want)
    text = relattn.explain(q, k, v, th, tw, grid, resize_dtype="table", backend="numpy")
    assert "resize_dtype='table'" in text
    assert "resize_dtype" not in relattn.explain(q, k, v, th, tw, grid, backend="numpy")
    # float32 tables: the mode changes nothing
    q32, k32, v32, th32, tw32 = (a.astype(np.float32) for a in (q, k, v, th, tw))
    assert "resize_dtype" not in relattn.explain(q32, k32, v32, th32, tw32, grid, resize_dtype="table")
    np.testing.assert_array_equal(
        relattn.rel_pos_attention(q32, k32, v32, th32, tw32, grid, resize_dtype="table"),
        relattn.rel_pos_attention(q32, k32, v32, th32, tw32, grid))


def test_attention_layer_passes_the_mode():
    kw = dict(num_heads=2, use_rel_pos=True, input_size=(8, 8), rel_pos_zero_init=False, dtype="float64")
    default = relattn.Attention(32, rng=0, **kw)
    wide = relattn.Attention(32, rng=0, resize_dtype="table", **kw)
    assert wide.resize_dtype == "table" and default.resize_dtype == "float32"
    x = np.random.default_rng(4).standard_normal((1, 10, 6, 32))
    assert not np.array_equal(wide(x), default(x))           # interpolated grid: the mode shows
    assert np.max(np.abs(wide(x) - default(x))) < 1e-4
    x8 = np.random.default_rng(4).standard_normal((1, 8, 8, 32))
    np.testing.assert_array_equal(wide(x8), default(x8))      # trained grid: no resize
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(wide))(x), wide(x))
    rebuilt = relattn.Attention.from_state_dict(wide.state_dict(), dtype="float64", resize_dtype="table")
    np.testing.assert_array_equal(rebuilt(x), wide(x))
    # a float32 layer: both modes are PyTorch's float32 resize
    kw["dtype"] = "float32"
    x32 = x.astype(np.float32)
    np.testing.assert_array_equal(relattn.Attention(32, rng=0, resize_dtype="table", **kw)(x32),
                                  relattn.Attention(32, rng=0, **kw)(x32))


BAD = ["float64", "Table", "", None, np.float32, 32, ("table",)]


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_bad_values_raise_naming_the_keyword(bad):
    q, k, v, th, tw, grid = _float64_case()
    calls = [
        lambda: relattn.resize_rel_pos(th, 19, resize_dtype=bad),
        lambda: relattn.resize_rel_pos(th, 15, resize_dtype=bad),   # checked even without a resize
        lambda: relattn.get_rel_pos(10, 10, th, resize_dtype=bad),
        lambda: relattn.decomposed_rel_pos(q, th, tw, grid, grid, resize_dtype=bad),
        lambda: relattn.rel_pos_attention(q, k, v, th, tw, grid, resize_dtype=bad),
        lambda: relattn.rel_pos_attention(q, k, v, resize_dtype=bad),
        lambda: relattn.explain(q, k, v, th, tw, grid, resize_dtype=bad),
        lambda: relattn.plan(q, k, v, th, tw, grid, resize_dtype=bad),
        lambda: relattn.Attention(32, 2, use_rel_pos=True, input_size=(8, 8), resize_dtype=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="resize_dtype"):
            call()


# ------------------------------------------------------------ GPU (CuPy)
def _cupy():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no usable CUDA device")
    except Exception:  # no driver / no device
        pytest.skip("no usable CUDA device")
    return cupy


@pytest.mark.gpu
def test_gpu_resize_both_modes_bit_identical_to_numpy():
    """The CuPy kernels of ``_resize_gpu``: float64 in "table" mode, float32
    otherwise, each bit-identical to the host arithmetic (hence to PyTorch)."""
    cupy = _cupy()
    rng = np.random.default_rng(9)
    for rows, length in ALL_SIZES[:60]:
        for dtype in (np.float32, np.float64):
            host = _table(rng, rows, 7, dtype)
            dev = cupy.asarray(host)
            for mode in ("float32", "table"):
                got = relattn.resize_rel_pos(dev, length, resize_dtype=mode)
                assert isinstance(got, cupy.ndarray) and got.dtype == host.dtype
                _assert_bits(got.get(), relattn.resize_rel_pos(host, length, resize_dtype=mode),
                             f"{rows}->{length} {np.dtype(dtype).name} {mode}")
    view = cupy.asarray(_table(rng, 27, 16, np.float64))[:, ::2]
    np.testing.assert_array_equal(relattn.resize_rel_pos(view, 13, resize_dtype="table").get(),
                                  relattn.resize_rel_pos(view.get(), 13, resize_dtype="table"))


@pytest.mark.gpu
def test_gpu_attention_float64_table_mode_matches_sam_in_float64():
    cupy = _cupy()
    q, k, v, th, tw, grid = _float64_case()
    want = relattn.rel_pos_attention(q, k, v, th, tw, grid, resize_dtype="table", backend="numpy")
    dev = [cupy.asarray(a) for a in (q, k, v, th, tw)]
    got = relattn.rel_pos_attention(*dev, grid, resize_dtype="table")
    assert np.max(np.abs(got.get() - want)) <= 1e-12
    got = relattn.get_rel_pos(10, 10, dev[3], resize_dtype="table")
    np.testing.assert_array_equal(got.get(), relattn.get_rel_pos(10, 10, th, resize_dtype="table"))
