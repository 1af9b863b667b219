"""The reference backward: ``relattn.rel_pos_attention_vjp``.

Checked against central finite differences in float64 (Richardson-extrapolated),
against PyTorch autograd of SAM's formulation written in torch below (skipped
without torch), and for its forward, dtypes, errors and masked keys.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relattn
from relattn import autodiff, functional
from relattn.autodiff import _resize_adjoint, _table_adjoint
from relattn.backends import reference
from relattn.relpos import _relative_index, _resize_arithmetic, _resize_plan

try:
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - optional dependency
    BFLOAT16 = None

HALF_DTYPES = [np.dtype(np.float16)] + ([BFLOAT16] if BFLOAT16 is not None else [])
NAMES = ("q", "k", "v", "rel_pos_h", "rel_pos_w")


@st.composite
def problems(draw, max_side=4, max_heads=2, head_dims=(1, 3, 8)):
    """A small float64 problem: q grid and k grid (equal or not), tables of
    SAM's row count, resized up or down, or none (plain attention)."""
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, max_heads))
    head_dim = draw(st.sampled_from(head_dims))
    q_h, q_w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    if draw(st.booleans()):
        k_h, k_w = q_h, q_w
    else:
        k_h, k_w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    tables = draw(st.sampled_from(["sam", "resized", "none"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, q_h * q_w, head_dim))
    k = rng.standard_normal((batch, heads, k_h * k_w, head_dim))
    v = rng.standard_normal((batch, heads, k_h * k_w, head_dim))
    rows_h, rows_w = 2 * max(q_h, k_h) - 1, 2 * max(q_w, k_w) - 1
    if tables == "resized":   # up or down (or, by chance, not at all)
        rows_h, rows_w = draw(st.integers(1, 2 * rows_h + 2)), draw(st.integers(1, 2 * rows_w + 2))
    if tables == "none":
        th = tw = None
    else:
        th = 0.5 * rng.standard_normal((rows_h, head_dim))
        tw = 0.5 * rng.standard_normal((rows_w, head_dim))
    return dict(arrays=[q, k, v, th, tw], q_size=(q_h, q_w), k_size=(k_h, k_w),
                what=f"B{batch} H{heads} d{head_dim} q{(q_h, q_w)} k{(k_h, k_w)} tables {tables} "
                     f"rows {(None if th is None else (th.shape[0], tw.shape[0]))} seed {seed}")


def _vjp(problem, arrays=None, **kw):
    """The reference pullback (this file tests it; tests/test_vjp_numba.py the fused one)."""
    arrays = problem["arrays"] if arrays is None else arrays
    kw.setdefault("backend", "numpy")
    return relattn.rel_pos_attention_vjp(*arrays, q_size=problem["q_size"], k_size=problem["k_size"], **kw)


def _rel_err(got, want, floor=0.0):
    """max |got - want| relative to max |want|, or to ``floor`` when larger (a
    gradient that is zero in exact arithmetic is rounding noise: it is compared
    relative to the problem's other gradients)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = max(np.max(np.abs(want), initial=0.0), floor)
    return np.max(np.abs(got - want), initial=0.0) / scale if scale > 0 else np.max(np.abs(got), initial=0.0)


def _draw_mask(data, n):
    """A boolean mask over ``n`` keys drawn by hypothesis, at least one key left."""
    masked = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    masked[data.draw(st.integers(0, n - 1))] = False
    return masked


def _mask_keys(arrays, masked):
    """[q, k, v, th, tw] with the keys ``masked`` set to -inf through k's
    channel 0, which every query weights positively (q's channel 0 made
    >= 0.5); q and k are copies."""
    q, k, v, th, tw = arrays
    q, k = q.copy(), k.copy()
    q[..., 0] = np.abs(q[..., 0]) + 0.5
    k[:, :, masked, 0] = -np.inf
    return [q, k, v, th, tw]


def _assert_close_where_finite(grads, ref, floor, tol, what):
    """Each gradient finite exactly where the reference's is, and within
    ``tol`` of it there (relative to its largest entry or ``floor``)."""
    for name, got, want in zip(NAMES, grads, ref):
        if want is None:
            assert got is None, name
            continue
        finite = np.isfinite(want)
        assert np.array_equal(np.isfinite(got), finite), f"{name}: finiteness differs ({what})"
        assert _rel_err(got[finite], want[finite], floor) <= tol, f"{name} ({what})"


def _floor(grads, fraction=1e-3):
    """``fraction`` of the largest gradient entry of a problem (finite ones)."""
    return fraction * max(np.max(np.abs(g[np.isfinite(g)]), initial=0.0) for g in grads if g is not None)


# ------------------------------------------------------------- (1) finite differences
@settings(max_examples=25)
@given(problem=problems())
def test_pullback_matches_finite_differences(problem):
    """<pullback(dout), d> == d/dt <dout, f(x + t d)> at t = 0 for each input
    (float64, tables resized in float64 so that f is smooth in the tables)."""
    arrays = problem["arrays"]
    out, pullback = _vjp(problem, resize_dtype="table")
    rng = np.random.default_rng(1)
    dout = rng.standard_normal(out.shape)
    grads = pullback(dout)

    def f(which, t, direction):
        moved = list(arrays)
        moved[which] = arrays[which] + t * direction
        return float(np.sum(dout * _vjp(problem, moved, resize_dtype="table")[0]))

    for which, name in enumerate(NAMES):
        if arrays[which] is None:
            assert grads[which] is None, name
            continue
        assert grads[which].shape == arrays[which].shape and grads[which].dtype == np.float64, name
        direction = rng.standard_normal(arrays[which].shape)
        analytic = float(np.sum(grads[which] * direction))
        h = 1e-3

        def central(step):
            return (f(which, step, direction) - f(which, -step, direction)) / (2 * step)

        numeric = (4 * central(h / 2) - central(h)) / 3      # Richardson: error O(h^4)
        # relative to the derivative, or to |grad| |direction| / sqrt(n) when it is
        # (by chance) far smaller than the typical size of <grad, direction>
        typical = np.linalg.norm(grads[which]) * np.linalg.norm(direction) / np.sqrt(direction.size)
        denom = max(abs(analytic), typical, _floor(grads), 1e-300)
        assert abs(numeric - analytic) <= 1e-6 * denom, (
            f"{name}: analytic {analytic!r} numeric {numeric!r} ({problem['what']})")


def test_resize_adjoint_is_the_transpose_of_the_resize():
    """<resize(x), y> == <x, resize^T(y)> for both arithmetics, up and down."""
    rng = np.random.default_rng(0)
    for rows, length in [(7, 13), (13, 7), (1, 5), (5, 1), (27, 127), (127, 63)]:
        y = rng.standard_normal((length, 3))
        x64 = rng.standard_normal((rows, 3))
        lhs = np.sum(relattn.resize_rel_pos(x64, length, resize_dtype="table") * y)
        rhs = np.sum(x64 * _resize_adjoint(y, rows, "float64"))
        assert abs(lhs - rhs) <= 1e-12 * (np.abs(y).sum() * np.abs(x64).max()), (rows, length)
        x32 = x64.astype(np.float32)
        lhs = np.sum(relattn.resize_rel_pos(x32, length).astype(np.float64) * y)
        rhs = np.sum(x32.astype(np.float64) * _resize_adjoint(y, rows, "float32"))
        assert abs(lhs - rhs) <= 1e-6 * (np.abs(y).sum() * np.abs(x64).max()), (rows, length)


def _table_adjoint_add_at(d_gathered, table, q_len, k_len, resize_dtype):
    """The table adjoint written with ``np.add.at`` (numpy only): the
    scatter-adds whose bits the array-generic :func:`_table_adjoint` keeps."""
    rows = 2 * max(q_len, k_len) - 1
    d_resized = np.zeros((rows, table.shape[1]), dtype=d_gathered.dtype)
    np.add.at(d_resized, _relative_index(q_len, k_len), d_gathered)
    if table.shape[0] != rows:
        i0, i1, lambda0, lambda1 = _resize_plan(table.shape[0], rows, _resize_arithmetic(table.dtype, resize_dtype))
        dx = np.zeros((table.shape[0], table.shape[1]), dtype=d_resized.dtype)
        np.add.at(dx, i0, lambda0.astype(dx.dtype) * d_resized)
        np.add.at(dx, i1, lambda1.astype(dx.dtype) * d_resized)
        d_resized = dx
    return d_resized.astype(table.dtype)


@pytest.mark.parametrize("work", [np.float64, np.float32])
def test_table_adjoint_has_the_bits_of_add_at(work):
    """The array-generic scatter-adds sum in np.add.at's order: the same bits
    (NaN in the same places), with values whose sums depend on the order
    (magnitudes 1e-8 to 1e8, signed zeros, infinities and NaN), for grids
    equal or not, tables of SAM's row count or resized up or down, in both
    resize arithmetics."""
    rng = np.random.default_rng(0)
    grids = [(1, 1), (1, 5), (5, 1), (4, 4), (7, 3), (3, 7), (14, 14), (64, 64), (6, 25)]
    checked = 0
    for q_len, k_len in grids:
        rows = 2 * max(q_len, k_len) - 1
        for stored in sorted({rows, 1, max(1, rows // 2 + 1), 2 * rows + 3}):
            for table_dtype in [np.float64, np.float32, np.float16] + ([BFLOAT16] if BFLOAT16 else []):
                for resize_dtype in ("float32", "table"):
                    d = rng.standard_normal((q_len, k_len, 5)) * 10.0 ** rng.integers(-8, 9, (q_len, k_len, 5))
                    d[rng.random(d.shape) < 0.05] = -0.0
                    if q_len * k_len > 4 and rng.random() < 0.3:
                        d.flat[rng.integers(d.size, size=3)] = [np.inf, -np.inf, np.nan]
                    d = d.astype(work)
                    table = np.zeros((stored, 5), dtype=table_dtype)
                    with np.errstate(invalid="ignore", over="ignore"):   # inf - inf, 0 * inf
                        got = _table_adjoint(d, table, q_len, k_len, resize_dtype)
                        want = _table_adjoint_add_at(d, table, q_len, k_len, resize_dtype)
                    assert got.dtype == want.dtype and got.shape == want.shape
                    what = (q_len, k_len, stored, table_dtype, resize_dtype)
                    # NaN where add.at has NaN (which of two NaNs an addition returns,
                    # and so the sign of the result, is the hardware's choice), and
                    # the same bits everywhere else
                    nan = np.isnan(want.astype(np.float64))
                    assert np.array_equal(np.isnan(got.astype(np.float64)), nan), what
                    bits = f"u{got.dtype.itemsize}"
                    assert np.array_equal(got.view(bits)[~nan], want.view(bits)[~nan]), what
                    checked += 1
    assert checked > 200


@pytest.mark.parametrize("block_bytes", [1, 3 * 5 * 8 * 7, None])
def test_blocked_scatter_add_sums_as_add_at(monkeypatch, block_bytes):
    """The blocked scatter-add (CuPy's, forced here on numpy): the sums of
    np.add.at to rounding, the same non-finite entries, whether each block
    is one slot row, a few, or all (the default budget)."""
    if block_bytes is not None:
        monkeypatch.setattr(autodiff, "SCATTER_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(1)
    for q_len, k_len in [(1, 1), (1, 5), (5, 1), (7, 3), (14, 14), (64, 64), (6, 25)]:
        index = _relative_index(q_len, k_len).ravel()
        rows = 2 * max(q_len, k_len) - 1
        slots = autodiff._accumulation_slots(index, rows)
        values = rng.standard_normal((index.size, 5)) * 10.0 ** rng.integers(-4, 5, (index.size, 5))
        if index.size > 4:
            values.flat[rng.integers(values.size, size=2)] = [np.inf, np.nan]
        want = np.zeros((rows, 5))
        np.add.at(want, index, values)
        key = ("test-blocked", q_len, k_len)
        got = autodiff._scatter_add(values, slots, key, blocked=True)
        loop = autodiff._scatter_add(values, slots, key, blocked=False)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.array_equal(loop.view(np.uint64)[np.isfinite(want)], want.view(np.uint64)[np.isfinite(want)])
        finite = np.isfinite(want)
        assert np.array_equal(np.isfinite(got), finite) and np.array_equal(np.isnan(got), np.isnan(want))
        assert np.array_equal(got[np.isinf(want)], want[np.isinf(want)])
        scale = np.zeros((rows, 5))
        np.add.at(scale, index, np.abs(np.where(np.isfinite(values), values, 0)))
        assert np.all(np.abs(got[finite] - want[finite]) <= 1e-13 * scale[finite]), (q_len, k_len)


# ------------------------------------------------------------- (2) PyTorch autograd
def _torch_get_rel_pos(torch, F, q_size, k_size, rel_pos):
    """SAM's get_rel_pos: linear resize when the row count differs, then the gather."""
    rows = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != rows:
        resized = F.interpolate(rel_pos.T[None], size=rows, mode="linear")   # (1, C, rows)
        rel_pos = resized[0].T
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    index = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[index.long()]


def _torch_attention(torch, F, q, k, v, th, tw, q_size, k_size):
    """SAM's attention with decomposed relative position, in torch."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    scale = head_dim ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1)                              # (B, H, Sq, Sk)
    if th is not None:
        (q_h, q_w), (k_h, k_w) = q_size, k_size
        Rh = _torch_get_rel_pos(torch, F, q_h, k_h, th)
        Rw = _torch_get_rel_pos(torch, F, q_w, k_w, tw)
        r_q = q.reshape(batch, heads, q_h, q_w, head_dim)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)
        attn = (attn.view(batch, heads, q_h, q_w, k_h, k_w)
                + rel_h[..., :, None] + rel_w[..., None, :]).view(batch, heads, q_len, k_len)
    return attn.softmax(dim=-1) @ v


def _torch_grads(problem, dout):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    tensors = [None if a is None else torch.tensor(a, dtype=torch.float64, requires_grad=True)
               for a in problem["arrays"]]
    out = _torch_attention(torch, F, *tensors, problem["q_size"], problem["k_size"])
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), [None if t is None else t.grad.numpy() for t in tensors]


@settings(max_examples=25)
@given(problem=problems(max_side=5))
def test_pullback_matches_torch_autograd(problem):
    pytest.importorskip("torch")
    out, pullback = _vjp(problem, resize_dtype="table")
    dout = np.random.default_rng(2).standard_normal(out.shape)
    want_out, want = _torch_grads(problem, dout)
    assert _rel_err(out, want_out) <= 1e-12, problem["what"]
    floor = _floor(want)
    for name, got, ref in zip(NAMES, pullback(dout), want):
        if ref is None:
            assert got is None, name
            continue
        err = _rel_err(got, ref, floor)
        assert err <= 1e-10, f"{name}: {err:.3g} ({problem['what']})"


# ------------------------------------------------------------- (3) the forward's bits
@settings(max_examples=25)
@given(problem=problems(max_side=5),
       dtype=st.sampled_from([np.dtype(np.float64), np.dtype(np.float32)] + HALF_DTYPES),
       resize_dtype=st.sampled_from(["float32", "table"]))
def test_out_is_the_numpy_backend_bit_for_bit(problem, dtype, resize_dtype):
    arrays = [None if a is None else a.astype(dtype) for a in problem["arrays"]]
    out, _ = _vjp(problem, arrays, resize_dtype=resize_dtype)
    want = relattn.rel_pos_attention(*arrays, q_size=problem["q_size"], k_size=problem["k_size"],
                                     backend="numpy", resize_dtype=resize_dtype)
    assert out.dtype == want.dtype and out.shape == want.shape
    assert np.array_equal(out.view(np.uint8), want.view(np.uint8)), problem["what"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_out_bits_with_chunked_rows_and_terms(monkeypatch, dtype):
    """With one head's logits split into row blocks, and the terms computed by
    rows (tiny budgets), the forward still follows the numpy backend's path."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 2, 30, 8)).astype(dtype) for _ in range(3))
    th, tw = (0.5 * rng.standard_normal((n, 8)).astype(dtype) for n in (7, 13))
    monkeypatch.setattr(reference, "CHUNK_BYTES", 7 * 30 * np.dtype(dtype).itemsize)
    monkeypatch.setattr(functional, "TERMS_BUDGET", 1024)
    functional._plans.clear()   # plans made under other budgets
    try:
        want = relattn.rel_pos_attention(q, k, v, th, tw, q_size=(5, 6), backend="numpy")
        out, pullback = relattn.rel_pos_attention_vjp(q, k, v, th, tw, q_size=(5, 6), backend="numpy")
    finally:
        functional._plans.clear()   # made under these budgets
    assert np.array_equal(out, want)
    grads = pullback(np.ones_like(out))
    assert all(np.all(np.isfinite(g)) for g in grads)


# ------------------------------------------------------------- (4) dtypes
@settings(max_examples=20)
@given(problem=problems(), resize_dtype=st.sampled_from(["float32", "table"]))
def test_float32_gradients_agree_with_float64(problem, resize_dtype):
    arrays32 = [None if a is None else a.astype(np.float32) for a in problem["arrays"]]
    arrays64 = [None if a is None else a.astype(np.float64) for a in arrays32]
    out32, pb32 = _vjp(problem, arrays32, resize_dtype=resize_dtype)
    out64, pb64 = _vjp(problem, arrays64, resize_dtype="float32")   # the float32 resize: same tables
    dout = np.random.default_rng(4).standard_normal(out32.shape).astype(np.float32)
    grads64 = pb64(dout.astype(np.float64))
    # dq, dk and the tables' gradients come from dS = P * (dP - rowsum(P * dP)),
    # a cancellation: one far below the problem's largest gradient is known in
    # float32 only to ~1e-7 of the terms that cancelled (of the size of the
    # largest gradient), so each is compared relative to itself or to a tenth
    # of the largest, whichever is larger.
    floor = _floor(grads64, 1e-1)
    # Gradients that are zero in exact arithmetic (softmax is shift-invariant):
    # all but dv with one key, a table's with one key along its side or with
    # one stored row (constant terms along the keys). In float32 they are
    # rounding noise.
    (k_h, k_w), sk = problem["k_size"], problem["k_size"][0] * problem["k_size"][1]
    rows = [None if a is None else a.shape[0] for a in arrays32[3:]]
    zero = {"q": sk == 1, "k": sk == 1, "v": False,
            "rel_pos_h": sk == 1 or k_h == 1 or rows[0] == 1,
            "rel_pos_w": sk == 1 or k_w == 1 or rows[1] == 1}
    for name, a, g32, g64 in zip(NAMES, arrays32, pb32(dout), grads64):
        if a is None:
            assert g32 is None
            continue
        assert g32.dtype == np.float32 and g32.shape == a.shape, name
        if zero[name]:
            assert np.max(np.abs(g32)) <= 1e-5 * 10 * floor, f"{name}: not ~0 ({problem['what']})"
            continue
        err = _rel_err(g32, g64, floor)
        assert err <= 1e-5, f"{name}: {err:.3g} ({problem['what']})"


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("tables", [True, False])
def test_half_precision_runs_in_float32_and_returns_its_dtypes(dtype, tables):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 2, 12, 8)).astype(dtype)
    k, v = (rng.standard_normal((1, 2, 6, 8)).astype(dtype) for _ in range(2))
    th, tw = (0.5 * rng.standard_normal((n, 8)).astype(dtype) for n in (9, 4)) if tables else (None, None)
    out, pullback = relattn.rel_pos_attention_vjp(q, k, v, th, tw, q_size=(3, 4), k_size=(2, 3))
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = pullback(dout)
    inputs = [q, k, v, th, tw]
    exact = relattn.rel_pos_attention_vjp(
        *[None if a is None else a.astype(np.float64) for a in inputs],
        q_size=(3, 4), k_size=(2, 3))[1](dout.astype(np.float64))
    assert out.dtype == dtype
    floor = _floor(exact)
    for name, a, g, g64 in zip(NAMES, inputs, grads, exact):
        if a is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.shape == a.shape, name
        assert np.all(np.isfinite(g.astype(np.float32))), name
        # float32 inside, one rounding at the end (plus the half-precision resize)
        assert _rel_err(g, g64, floor) <= 2e-2, f"{name}: {_rel_err(g, g64, floor):.3g}"


# ------------------------------------------------------------- (5) errors
def _small():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 1, 4, 2)) for _ in range(3))
    return q, k, v, rng.standard_normal((3, 2)), rng.standard_normal((3, 2))


def test_bad_dout_is_refused_naming_it():
    q, k, v, th, tw = _small()
    out, pullback = relattn.rel_pos_attention_vjp(q, k, v, th, tw, q_size=(2, 2))
    with pytest.raises(ValueError, match="dout"):
        pullback(np.ones((1, 1, 4, 3)))
    with pytest.raises(TypeError, match="dout"):
        pullback(np.ones(out.shape, np.float32))
    with pytest.raises(TypeError, match="dout"):
        pullback(np.ones(out.shape, np.int64))
    with pytest.raises(TypeError, match="dout"):
        pullback(out.tolist())


@pytest.mark.parametrize("fused", ["cupy"])
def test_fused_backends_have_no_backward_yet(fused):
    q, k, v, th, tw = _small()
    with pytest.raises(relattn.BackendError, match="backward is not available"):
        relattn.rel_pos_attention_vjp(q, k, v, th, tw, q_size=(2, 2), backend=fused)


def test_cupy_arrays_are_refused_by_the_host_backwards():
    cupy = pytest.importorskip("cupy")
    q, k, v, th, tw = (cupy.asarray(a) for a in _small())
    for backend in ("numpy", "numba"):
        with pytest.raises(relattn.BackendError, match="host"):
            relattn.rel_pos_attention_vjp(q, k, v, th, tw, q_size=(2, 2), backend=backend)


def test_validation_is_rel_pos_attentions():
    q, k, v, th, tw = _small()
    with pytest.raises(ValueError, match="q_size"):
        relattn.rel_pos_attention_vjp(q, k, v, th, tw)
    with pytest.raises(ValueError, match="rel_pos_w"):
        relattn.rel_pos_attention_vjp(q, k, v, th, None, q_size=(2, 2))
    with pytest.raises(ValueError, match="backend"):
        relattn.rel_pos_attention_vjp(q, k, v, backend="nope")
    with pytest.raises(ValueError, match="resize_dtype"):
        relattn.rel_pos_attention_vjp(q, k, v, resize_dtype="float16")


# ------------------------------------------------------------- (6) masked keys
@settings(max_examples=20)
@given(problem=problems(max_side=4), data=st.data())
def test_masked_keys_against_torch(problem, data):
    """Keys masked with -inf through k (a channel every query weights
    positively): the gradients are finite where torch's are, agree there, and
    the masked keys' dk / dv rows are zero."""
    pytest.importorskip("torch")
    masked = _draw_mask(data, problem["arrays"][1].shape[2])
    problem = dict(problem, arrays=_mask_keys(problem["arrays"], masked))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # 0 * inf in dq's matmul
        out, pullback = _vjp(problem, resize_dtype="table")
        dout = np.random.default_rng(7).standard_normal(out.shape)
        grads = pullback(dout)
    want_out, want = _torch_grads(problem, dout)
    assert np.all(np.isfinite(out)) and _rel_err(out, want_out) <= 1e-12
    _assert_close_where_finite(grads, want, _floor(want), 1e-10, problem["what"])
    dk, dv = grads[1], grads[2]
    assert np.all(dk[:, :, masked] == 0) and np.all(dv[:, :, masked] == 0)
    assert np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))
    for g in grads[3:]:
        assert g is None or np.all(np.isfinite(g))
