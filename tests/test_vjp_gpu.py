"""The GPU backward: ``rel_pos_attention_vjp`` on CuPy arrays (skipped where
CuPy, a CUDA device or the cupy backend is missing).

Checked against the reference pullback (``backend="numpy"`` on host copies of
the same arrays): float64 to 1e-10 and float32 to 1e-5 of the largest
gradient; float16 / bfloat16 to 1e-2, against the reference run on the same
half-precision values (both compute in float32 and round once) and, where no
table is resized, against the float32 reference of those values. Cases:
no tables, tables of the grid's size, interpolated tables, q grid != k grid,
masked keys, SAM's windows, a sequence length that is no multiple of 64,
chunks of a few rows or a few heads; then the forward's bits, the core's
contract, memory (no Sq x Sk buffer), and the errors.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

cupy = pytest.importorskip("cupy")

try:
    _NDEV = cupy.cuda.runtime.getDeviceCount()
except Exception:  # no driver / no device
    _NDEV = 0
if _NDEV < 1:
    pytest.skip("no usable CUDA device", allow_module_level=True)

import relattn  # noqa: E402
from relattn import autodiff, backends  # noqa: E402
from relattn._arrays import BFLOAT16, dtype_name  # noqa: E402
from relattn.backends.gpu import backward  # noqa: E402
from test_vjp import NAMES, _assert_close_where_finite, _draw_mask, _floor, _mask_keys, _rel_err  # noqa: E402
from test_vjp import problems as reference_problems  # noqa: E402

if backends.get("cupy").unavailable_reason() is not None:  # pragma: no cover
    pytest.skip(f"cupy backend unavailable: {backends.get('cupy').unavailable_reason()}",
                allow_module_level=True)

pytestmark = pytest.mark.gpu

SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------ helpers
def _bf16_on_device():
    """bfloat16 CuPy arrays (views of uint16 device memory), or a skip."""
    if BFLOAT16 is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    try:
        cupy.zeros(2, dtype=cupy.uint16).view(BFLOAT16)
    except Exception as exc:   # this CuPy cannot view memory as bfloat16
        pytest.skip(f"bfloat16 CuPy arrays unavailable: {exc}")
    return BFLOAT16


def _dtype(name):
    return _bf16_on_device() if name == "bfloat16" else np.dtype(name)


def to_device(a):
    """A host array as a CuPy array of the same dtype (bfloat16 through its bits)."""
    if a is None:
        return None
    if dtype_name(a.dtype) == "bfloat16":
        return cupy.asarray(np.ascontiguousarray(a).view(np.uint16)).view(a.dtype)
    return cupy.asarray(a)


def to_host(a):
    """A CuPy array back on the host, same dtype."""
    if a is None:
        return None
    if dtype_name(a.dtype) == "bfloat16":
        return a.view(cupy.uint16).get().view(BFLOAT16)
    return a.get()


def _cast(arrays, dtype):
    return [None if a is None else a.astype(dtype) for a in arrays]


def _zero_gradients(arrays, k_size):
    """The gradients that are zero in exact arithmetic (softmax is
    shift-invariant): all but dv with one key, a table's with one key along
    its side or one stored row. Both sides are rounding noise there."""
    (k_h, k_w), sk = k_size, k_size[0] * k_size[1]
    rows = [None if a is None else a.shape[0] for a in arrays[3:]]
    return {"q": sk == 1, "k": sk == 1, "v": False,
            "rel_pos_h": sk == 1 or k_h == 1 or rows[0] == 1,
            "rel_pos_w": sk == 1 or k_w == 1 or rows[1] == 1}


def assert_grads_close(got, want, arrays, k_size, tol, floor_fraction, what=""):
    """Each gradient (host arrays) within ``tol`` of the reference's, relative
    to its largest entry or to ``floor_fraction`` of the problem's largest
    gradient (``dS = P * (dP - D)`` is a cancellation); 10x where the exact
    gradient is zero."""
    zero = _zero_gradients(arrays, k_size)
    floor = _floor(want, floor_fraction)
    for name, a, g, w in zip(NAMES, arrays, got, want):
        if a is None:
            assert g is None and w is None, name
            continue
        assert g.dtype == a.dtype and g.shape == a.shape, f"{name}: {g.dtype} {g.shape} ({what})"
        g64 = np.asarray(g, np.float64)
        assert np.all(np.isfinite(g64)), f"{name}: non-finite ({what})"
        err = _rel_err(g64, np.asarray(w, np.float64), floor)
        assert err <= (10 * tol if zero[name] else tol), f"{name}: {err:.3g} ({what})"


def gpu_vjp(arrays, q_size, k_size, **kw):
    """out (host) and the pullback on the device arrays; the pullback takes and
    returns host arrays (it runs on the device)."""
    dev = [to_device(a) for a in arrays]
    out, pullback = relattn.rel_pos_attention_vjp(*dev, q_size=q_size, k_size=k_size, **kw)
    assert isinstance(out, cupy.ndarray)
    assert pullback.__qualname__.startswith("_pullback_gpu")

    def host_pullback(dout):
        grads = pullback(to_device(dout))
        for g, a in zip(grads, dev):
            assert (g is None) == (a is None)
            if g is not None:
                assert isinstance(g, cupy.ndarray) and g.device.id == a.device.id
        return [to_host(g) for g in grads]

    return to_host(out), host_pullback


def reference_vjp(arrays, q_size, k_size, **kw):
    return relattn.rel_pos_attention_vjp(*arrays, q_size=q_size, k_size=k_size, backend="numpy", **kw)


# ------------------------------------------------------------------ cases
# (B, heads, q grid, k grid, head_dim, tables): tables None (plain attention),
# "grid" (2 * max - 1 rows: no resize) or (rows_h, rows_w) (interpolated).
CASES = {
    "no_tables": (2, 2, (6, 7), (6, 7), 32, None),
    "grid_tables": (2, 3, (8, 8), (8, 8), 64, "grid"),
    "interpolated": (1, 2, (12, 10), (12, 10), 64, (15, 31)),
    "q_grid_ne_k_grid": (2, 2, (8, 8), (4, 4), 48, "grid"),
    "thin_grids_interpolated": (1, 2, (3, 50), (5, 30), 48, (7, 77)),
    "sam_windows": (50, 3, (14, 14), (14, 14), 64, "grid"),   # 2 images x 25 windows of 14 x 14
    "length_667": (1, 2, (23, 29), (23, 29), 80, (27, 27)),   # Sq = Sk = 667, tables trained at 14 x 14
}


def make_case(name, seed=0):
    batch, heads, (q_h, q_w), (k_h, k_w), head_dim, tables = CASES[name]
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, q_h * q_w, head_dim))
    k = rng.standard_normal((batch, heads, k_h * k_w, head_dim))
    v = rng.standard_normal((batch, heads, k_h * k_w, head_dim))
    th = tw = None
    if tables is not None:
        rows = (2 * max(q_h, k_h) - 1, 2 * max(q_w, k_w) - 1) if tables == "grid" else tables
        th, tw = (0.5 * rng.standard_normal((n, head_dim)) for n in rows)
    return [q, k, v, th, tw], (q_h, q_w), (k_h, k_w), tables not in (None, "grid")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_match_the_reference(case, dtype):
    arrays, q_size, k_size, _ = make_case(case)
    arrays = _cast(arrays, np.dtype(dtype))
    out, pullback = gpu_vjp(arrays, q_size, k_size)
    out_ref, pullback_ref = reference_vjp(arrays, q_size, k_size)
    tol = 1e-10 if dtype == "float64" else 1e-5
    assert out.dtype == out_ref.dtype and _rel_err(out, out_ref) <= tol, case
    dout = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
    assert_grads_close(pullback(dout), pullback_ref(dout), arrays, k_size, tol,
                       1e-3 if dtype == "float64" else 1e-1, case)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_half_precision_matches_the_reference(case, dtype):
    """Differentiated in float32 and rounded once: within 1e-2 of the
    reference on the same half-precision values (also float32 inside, one
    rounding), and of the float32 reference of those values where no table
    is resized (a resized half table is rounded to the half type on both
    half paths, not in float32)."""
    dt = _dtype(dtype)
    arrays, q_size, k_size, resized = make_case(case)
    arrays = _cast(arrays, dt)
    out, pullback = gpu_vjp(arrays, q_size, k_size)
    assert out.dtype == dt
    dout = np.random.default_rng(1).standard_normal(out.shape).astype(dt)
    grads = pullback(dout)
    out_half, pullback_half = reference_vjp(arrays, q_size, k_size)
    assert _rel_err(out, out_half) <= 1e-2, case
    assert_grads_close(grads, pullback_half(dout), arrays, k_size, 1e-2, 1e-1, f"{case}, half reference")
    if not resized:
        arrays32 = _cast(arrays, np.float32)
        want = reference_vjp(arrays32, q_size, k_size)[1](dout.astype(np.float32))
        got32 = [None if g is None else g.astype(np.float32) for g in grads]
        assert_grads_close(got32, want, arrays32, k_size, 1e-2, 1e-1, f"{case}, float32 reference")


@settings(SLOW, max_examples=15)
@given(problem=reference_problems(max_side=6, max_heads=3, head_dims=(1, 3, 8, 16)),
       dtype=st.sampled_from(["float64", "float32"]), resize_dtype=st.sampled_from(["float32", "table"]))
def test_random_problems_match_the_reference(problem, dtype, resize_dtype):
    arrays = _cast(problem["arrays"], np.dtype(dtype))
    q_size, k_size = problem["q_size"], problem["k_size"]
    out, pullback = gpu_vjp(arrays, q_size, k_size, resize_dtype=resize_dtype)
    out_ref, pullback_ref = reference_vjp(arrays, q_size, k_size, resize_dtype=resize_dtype)
    tol = 1e-10 if dtype == "float64" else 1e-5
    assert _rel_err(out, out_ref) <= tol, problem["what"]
    dout = np.random.default_rng(2).standard_normal(out.shape).astype(dtype)
    assert_grads_close(pullback(dout), pullback_ref(dout), arrays, k_size, tol,
                       1e-3 if dtype == "float64" else 1e-1, problem["what"])


@pytest.mark.parametrize("chunk", ["rows", "heads"])
@pytest.mark.parametrize("case", ["interpolated", "q_grid_ne_k_grid", "grid_tables"])
def test_chunks_of_rows_and_of_heads(monkeypatch, case, chunk):
    """Tiny budgets: chunks of 5 query rows of one head, or blocks of all
    heads but one (B * heads - 1 heads, then the last one alone); the
    statistics and the gradients come out as with whole problems."""
    arrays, q_size, k_size, _ = make_case(case, seed=3)
    batch, heads, q_len, _ = arrays[0].shape
    k_len = arrays[1].shape[2]
    per_block = max(1, batch * heads - 1)
    budget = 5 * k_len * 8 if chunk == "rows" else per_block * q_len * k_len * 8 + 7
    monkeypatch.setattr(backward, "CHUNK_BYTES", budget)
    assert backward.chunk_shape(batch * heads, q_len, k_len, 8) == (
        (1, 5) if chunk == "rows" else (per_block, q_len))
    out, pullback = gpu_vjp(arrays, q_size, k_size)
    _, pullback_ref = reference_vjp(arrays, q_size, k_size)
    dout = np.random.default_rng(4).standard_normal(out.shape)
    assert_grads_close(pullback(dout), pullback_ref(dout), arrays, k_size, 1e-10, 1e-3, f"{case} {chunk}")


def test_row_stats_are_the_reference_forwards():
    """Each logit row's max and sum of exponentials, as the numpy forward keeps them."""
    arrays, q_size, k_size, _ = make_case("interpolated", seed=5)
    q, k, v, th, tw = arrays
    scale = q.shape[3] ** -0.5
    _, stats_ref = autodiff._forward(q, k, v, th, tw, q_size, k_size, scale)
    qd, kd = cupy.asarray(q), cupy.asarray(k)
    rel_h, rel_w = relattn.relpos.terms(qd, cupy.asarray(th), cupy.asarray(tw), q_size, k_size)
    stats = backward.row_stats(qd, kd, rel_h, rel_w, k_size, scale).get()
    assert stats.shape == stats_ref.shape and stats.dtype == stats_ref.dtype
    np.testing.assert_allclose(stats, stats_ref, rtol=1e-12, atol=1e-12 * np.abs(stats_ref).max())


@settings(SLOW, max_examples=12)
@given(problem=reference_problems(max_side=5), data=st.data())
def test_masked_keys_match_the_reference(problem, data):
    """Keys masked with -inf through k (a channel every query weights
    positively; at least one key left): the same finite entries as the
    reference, equal there (dq's masked channel is NaN on both: 0 * -inf),
    and the masked keys' dk / dv rows are zero."""
    masked = _draw_mask(data, problem["arrays"][1].shape[2])
    arrays = _mask_keys(problem["arrays"], masked)
    q_size, k_size = problem["q_size"], problem["k_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # 0 * inf in the reference's matmuls
        out, pullback = gpu_vjp(arrays, q_size, k_size)
        out_ref, pullback_ref = reference_vjp(arrays, q_size, k_size)
        dout = np.random.default_rng(7).standard_normal(out.shape)
        grads, ref = pullback(dout), pullback_ref(dout)
    assert np.all(np.isfinite(out)) and _rel_err(out, out_ref) <= 1e-10, problem["what"]
    _assert_close_where_finite(grads, ref, _floor(ref, 1e-3), 1e-10, problem["what"])
    dk, dv = grads[1], grads[2]
    assert np.all(dk[:, :, masked] == 0) and np.all(dv[:, :, masked] == 0)


def test_masked_keys_float32():
    rng = np.random.default_rng(8)
    arrays, q_size, k_size, _ = make_case("grid_tables", seed=8)
    arrays = _cast(arrays, np.float32)
    masked = rng.random(arrays[1].shape[2]) < 0.3
    masked[0] = False
    arrays = _mask_keys(arrays, masked)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out, pullback = gpu_vjp(arrays, q_size, k_size)
        _, pullback_ref = reference_vjp(arrays, q_size, k_size)
        dout = rng.standard_normal(out.shape).astype(np.float32)
        grads, ref = pullback(dout), pullback_ref(dout)
    assert np.all(np.isfinite(out))
    _assert_close_where_finite(grads, ref, _floor(ref, 1e-1), 1e-5, "float32")
    assert np.all(grads[1][:, :, masked] == 0) and np.all(grads[2][:, :, masked] == 0)


# ------------------------------------------------------------------ forward and contract
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("resize_dtype", ["float32", "table"])
def test_out_is_the_cupy_forward_bit_for_bit(dtype, resize_dtype):
    dt = _dtype(dtype)
    arrays, q_size, k_size, _ = make_case("interpolated", seed=9)
    dev = [to_device(a) for a in _cast(arrays, dt)]
    want = relattn.rel_pos_attention(*dev, q_size=q_size, k_size=k_size, backend="cupy",
                                     resize_dtype=resize_dtype)
    for name in ("cupy", "auto"):
        out, pullback = relattn.rel_pos_attention_vjp(*dev, q_size=q_size, k_size=k_size, backend=name,
                                                      resize_dtype=resize_dtype)
        assert out.dtype == want.dtype and out.shape == want.shape
        assert cupy.array_equal(out.view(cupy.uint8), want.view(cupy.uint8)), name
        assert pullback.__qualname__.startswith("_pullback_gpu"), name


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_core_backward_contract(monkeypatch, dtype):
    """The pullback's one call into the core: its arguments and what it
    returns; the statistics are the chunks' (max, sum) pairs in float64 and
    the float32 fused kernels' log-sum-exp in float32; the 16-bit ones keep
    nothing (they take the log-sum-exp in the pullback) and differentiate in float32."""
    arrays, q_size, k_size, _ = make_case("q_grid_ne_k_grid", seed=10)
    dt = _dtype(dtype)
    arrays = _cast(arrays, dt)
    seen = []
    core = autodiff._core_backward_gpu

    def spy(q, k, v, rel_h, rel_w, k_size_, scale, out, dout, stats):
        result = core(q, k, v, rel_h, rel_w, k_size_, scale, out, dout, stats)
        seen.append((q, k, v, rel_h, rel_w, k_size_, stats, result))
        return result

    monkeypatch.setattr(autodiff, "_core_backward_gpu", spy)
    out, pullback = gpu_vjp(arrays, q_size, k_size)
    pullback(np.ones(out.shape, out.dtype))
    assert len(seen) == 1
    q, k, v, rel_h, rel_w, ks, stats, (dq, dk, dv, dh, dw) = seen[0]
    batch, heads, q_len, _ = q.shape
    assert ks == k_size
    assert rel_h.shape == (batch, heads, q_len, k_size[0]) and rel_w.shape == (batch, heads, q_len, k_size[1])
    work = np.dtype(np.float64 if dtype == "float64" else np.float32)
    if dtype == "bfloat16":
        assert stats is None
    else:
        fused = dtype == "float32"
        assert stats.shape == ((batch, heads, q_len) if fused else (batch, heads, q_len, 2))
        assert stats.dtype == work
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dh.shape == rel_h.shape and dw.shape == rel_w.shape
    assert all(g.dtype == work and g.flags.c_contiguous for g in (dq, dh, dw))
    assert all(g.dtype == (dt if dtype == "bfloat16" else work) and g.flags.c_contiguous for g in (dk, dv))


def test_pullback_is_repeatable():
    arrays, q_size, k_size, _ = make_case("interpolated", seed=11)
    out, pullback = gpu_vjp(_cast(arrays, np.float32), q_size, k_size)
    dout = np.random.default_rng(11).standard_normal(out.shape).astype(np.float32)
    first, second = pullback(dout), pullback(dout)
    for a, b in zip(first, second):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _bits(a):
    return to_host(a).view(np.uint8)


def test_calls_of_one_signature_reuse_its_plan():
    """A second vjp of a signature reuses the first one's plan (resize,
    terms run, forward plan; ``autodiff._gpu_vjps``) and computes from the
    arrays it is given: on new values of q, k, v and the tables, the bits a
    fresh plan gives them, and other values than the first call's."""
    dt = _bf16_on_device()
    arrays, q_size, k_size, _ = make_case("interpolated", seed=31)
    rng = np.random.default_rng(32)
    first = [to_device(a.astype(dt)) for a in arrays]
    second = [to_device(rng.standard_normal(a.shape).astype(dt)) for a in arrays]
    autodiff._gpu_vjps.clear()
    out1, _ = relattn.rel_pos_attention_vjp(*first, q_size=q_size, k_size=k_size)
    assert len(autodiff._gpu_vjps) == 1
    planned = next(iter(autodiff._gpu_vjps.values()))
    out2, pullback2 = relattn.rel_pos_attention_vjp(*second, q_size=q_size, k_size=k_size)
    assert list(autodiff._gpu_vjps.values()) == [planned]
    dout = to_device(rng.standard_normal(out2.shape).astype(dt))
    grads2 = pullback2(dout)
    autodiff._gpu_vjps.clear()
    out3, pullback3 = relattn.rel_pos_attention_vjp(*second, q_size=q_size, k_size=k_size)
    assert next(iter(autodiff._gpu_vjps.values())) is not planned
    grads3 = pullback3(dout)
    assert not np.array_equal(_bits(out1), _bits(out2))
    assert np.array_equal(_bits(out2), _bits(out3))
    for name, a, b in zip(NAMES, grads2, grads3):
        assert np.array_equal(_bits(a), _bits(b)), name
    # another signature (q strided as a layer's projections give it): another plan
    strided = cupy.ascontiguousarray(second[0].transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    relattn.rel_pos_attention_vjp(strided, *second[1:], q_size=q_size, k_size=k_size)
    assert len(autodiff._gpu_vjps) == 2


def test_non_contiguous_inputs():
    arrays, q_size, k_size, _ = make_case("grid_tables", seed=12)
    arrays = _cast(arrays, np.float32)
    dev = [to_device(a) for a in arrays]
    # q, k, v as transposed views of (B, S, H, d) buffers, as a layer's projections give them
    views = [cupy.ascontiguousarray(a.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) for a in dev[:3]]
    assert not views[0].flags.c_contiguous
    out, pullback = relattn.rel_pos_attention_vjp(*views, *dev[3:], q_size=q_size, k_size=k_size)
    dout = np.random.default_rng(12).standard_normal(out.shape).astype(np.float32)
    got = [to_host(g) for g in pullback(cupy.asarray(dout))]
    _, pullback_ref = reference_vjp(arrays, q_size, k_size)
    assert_grads_close(got, pullback_ref(dout), arrays, k_size, 1e-5, 1e-1, "non-contiguous")


def _pool_growth(pool, pullback, dout):
    """``pullback(dout)`` after a warm-up call (kernels compiled, caches
    filled) and the growth of CuPy's pool it caused (the pool keeps freed
    blocks, so its growth is the call's peak)."""
    pullback(dout)
    cupy.cuda.get_current_stream().synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()
    grads = pullback(dout)
    cupy.cuda.get_current_stream().synchronize()
    return grads, pool.total_bytes() - before


def test_pullback_allocates_no_sq_by_sk_buffer(monkeypatch):
    """9216 x 9216 float64 logits (the chunked path) are 648 MiB. With 4 MiB
    chunks the pullback's growth of CuPy's memory pool (which keeps freed
    blocks, so its total is the pullback's peak) stays under a quarter of
    that: the chunks and the input-sized buffers (2.3 MiB each here)."""
    pool = cupy.get_default_memory_pool()
    if cupy.cuda.get_allocator() != pool.malloc:
        pytest.skip("CuPy's default memory pool is not the allocator")
    monkeypatch.setattr(backward, "CHUNK_BYTES", 4 * 2**20)
    rng = np.random.default_rng(13)
    side, head_dim = 96, 32
    q, k, v = (cupy.asarray(rng.standard_normal((1, 1, side * side, head_dim))) for _ in range(3))
    th, tw = (cupy.asarray(0.5 * rng.standard_normal((2 * side - 1, head_dim))) for _ in range(2))
    out, pullback = relattn.rel_pos_attention_vjp(q, k, v, th, tw, q_size=(side, side))
    dout = cupy.asarray(rng.standard_normal(out.shape))
    grads, growth = _pool_growth(pool, pullback, dout)
    sxs = (side * side) ** 2 * 8
    assert growth < sxs / 4, (growth, sxs)
    assert all(bool(cupy.isfinite(g).all()) for g in grads)


# ------------------------------------------------------------------ fused kernels
def _core_inputs(q, k, v, th, tw, q_size, k_size, dtype, seed):
    """Device q, k, v of ``dtype``, the float32 terms of the tables and a dO."""
    dev = [to_device(a) for a in _cast([q, k, v], dtype)]
    rel_h = rel_w = None
    if th is not None:   # the terms of the 16-bit values the forward sees, in float32
        q32, th32, tw32 = (cupy.asarray(a.astype(dtype).astype(np.float32)) for a in (q, th, tw))
        rel_h, rel_w = relattn.relpos.terms(q32, th32, tw32, q_size, k_size)
    out = relattn.rel_pos_attention(*dev, None if th is None else to_device(th.astype(dtype)),
                                    None if tw is None else to_device(tw.astype(dtype)),
                                    q_size=q_size, k_size=k_size, backend="cupy")
    dout = to_device(np.random.default_rng(seed).standard_normal(out.shape).astype(dtype))
    return dev, rel_h, rel_w, out, dout


def _both_cores(case, dtype, seed=20, kernels="mma", warpgroups=None):
    """(fused, chunked) core gradients on the same device inputs, host float64;
    ``kernels`` the fused 16-bit dq and dk / dv kernels' form (a skip where
    the wgmma form cannot run), ``warpgroups`` the wgmma kernels' per block."""
    arrays, q_size, k_size, _ = make_case(case, seed=seed) if isinstance(case, str) else case
    q, k, v, th, tw = arrays
    scale = q.shape[3] ** -0.5
    (qd, kd, vd), rel_h, rel_w, out, dout = _core_inputs(q, k, v, th, tw, q_size, k_size, dtype, seed)
    assert not backward.fused_reasons(qd, kd, vd, rel_h, k_size)
    if kernels == "wg" and backward.wg_reasons(qd, kd, vd, rel_h, k_size):
        pytest.skip("; ".join(backward.wg_reasons(qd, kd, vd, rel_h, k_size)))
    lse = backward.row_lse(qd, kd, rel_h, rel_w, k_size, scale)
    stats = backward.row_stats(qd, kd, rel_h, rel_w, k_size, scale)
    want_lse = (stats[..., 0] + cupy.log(stats[..., 1])) * np.log2(np.e)
    assert lse.shape == stats.shape[:3] and lse.dtype == np.float32
    np.testing.assert_allclose(lse.get(), want_lse.get(), rtol=1e-4, atol=1e-4)
    # float32 takes the forward's log-sum-exp; 16-bit computes it (and delta) in the pullback
    given = lse if dtype == np.float32 else None
    fused = backward.fused_core_backward(qd, kd, vd, rel_h, rel_w, k_size, scale, out, dout, given, kernels=kernels,
                                         warpgroups=warpgroups)
    chunked = backward.core_backward(qd, kd, vd, rel_h, rel_w, k_size, scale, out, dout, stats)
    for name, g in zip(("dq", "dk", "dv", "d_rel_h", "d_rel_w"), fused):
        # dk and dv of 16-bit inputs come rounded to their type, the rest in float32
        want = dtype if name in ("dk", "dv") else np.dtype(np.float32)
        assert g is None or (g.dtype == want and g.flags.c_contiguous), name
    host = [[None if g is None else to_host(g).astype(np.float64) for g in r] for r in (fused, chunked)]
    return host[0], host[1]


def _fused_tol(dtype):
    return 1e-5 if dtype == "float32" else 1e-2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_core_matches_the_chunked_core(case, dtype):
    """The fused kernels' gradients within 1e-2 (16-bit: P and dS rounded to
    16 bits on the tensor cores) or 1e-5 (float32, FMA) of the chunked
    float32 core on the same inputs, gradient by gradient; the row
    log-sum-exp as the chunked (max, sum) pairs give it."""
    fused, chunked = _both_cores(case, _dtype(dtype))
    floor, tol = _floor(chunked, 1e-2), _fused_tol(dtype)
    for name, got, want in zip(("dq", "dk", "dv", "d_rel_h", "d_rel_w"), fused, chunked):
        assert (got is None) == (want is None), name
        if got is not None:
            assert got.shape == want.shape, name
            assert np.all(np.isfinite(got)), name
            assert _rel_err(got, want, floor) <= tol, f"{name} ({case}, {dtype})"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("k_grid", [(3, 64), (2, 64), (5, 13)])
def test_fused_core_bias_modes(k_grid, dtype):
    """k_w == 64 with whole 64-key tiles (the key-rows mode: one key row per
    tile), and a grid whose rows straddle the tiles (generic), q grid != k grid."""
    rng = np.random.default_rng(21)
    q_size, k_size, d = (4, 9), k_grid, 64
    q = rng.standard_normal((2, 2, q_size[0] * q_size[1], d))
    k, v = (rng.standard_normal((2, 2, k_size[0] * k_size[1], d)) for _ in range(2))
    th = 0.5 * rng.standard_normal((2 * max(q_size[0], k_size[0]) - 1, d))
    tw = 0.5 * rng.standard_normal((2 * max(q_size[1], k_size[1]) - 1, d))
    assert backward._bias(th, k_size, k_size[0] * k_size[1]) == (
        backward.Bias.KEY_ROWS if k_size[1] == 64 else backward.Bias.GENERIC)
    fused, chunked = _both_cores(([q, k, v, th, tw], q_size, k_size, False), _dtype(dtype))
    floor = _floor(chunked, 1e-2)
    for name, got, want in zip(("dq", "dk", "dv", "d_rel_h", "d_rel_w"), fused, chunked):
        assert _rel_err(got, want, floor) <= _fused_tol(dtype), f"{name} {k_grid} {dtype}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, (4, 64), 64, (7, 127)), (2, (4, 64), 80, (7, 127)),
                                   (6, (14, 14), 64, (27, 27)), (3, (7, 9), 80, (13, 17))])
def test_the_16bit_vjp_keeps_the_forward_log_sum_exp(shape, dtype):
    """Where the forward kernel keeps each row's log-sum-exp (relattn_ws, on
    Hopper: global grids of 64-key rows and small windows), the 16-bit vjp
    keeps it (the pullback then takes delta = rowsum(dO * O) and skips its
    row pass): the same values as the backward's own row pass, ``out`` the
    bits of rel_pos_attention, and gradients within 1e-2 of the row-pass
    pullback's and of the float32 chunked core's."""
    dt = _dtype(dtype)
    heads, q_size, d, rows = shape
    rng = np.random.default_rng(23)
    S = q_size[0] * q_size[1]
    q, k, v = (to_device(rng.standard_normal((1, heads, S, d)).astype(dt)) for _ in range(3))
    th, tw = (to_device((0.5 * rng.standard_normal((n, d))).astype(dt)) for n in rows)
    scale = d ** -0.5
    if autodiff._lse_plan(q, k, v, th, tw, q_size, q_size, scale) is None:
        pytest.skip("the forward kernel here keeps no log-sum-exp (relattn_ws: Hopper)")
    vjp = autodiff._GpuVjp(q, k, v, th, tw, q_size, q_size, scale, "float32")
    out, rel_h, rel_w, lse = vjp._forward(q, k, v, (th, tw), th, tw)
    assert lse is not None and lse.shape == (1, heads, S) and lse.dtype == np.float32
    np.testing.assert_allclose(lse.get(), backward.row_lse(q, k, rel_h, rel_w, q_size, scale).get(),
                               rtol=1e-5, atol=1e-4)
    plain = relattn.rel_pos_attention(q, k, v, th, tw, q_size, backend="cupy")
    assert cupy.array_equal(out.view(cupy.uint16), plain.view(cupy.uint16))
    dout = to_device(rng.standard_normal(out.shape).astype(dt))
    kept = backward.fused_core_backward(q, k, v, rel_h, rel_w, q_size, scale, out, dout, lse)
    passed = backward.fused_core_backward(q, k, v, rel_h, rel_w, q_size, scale, out, dout, None)
    stats = backward.row_stats(q, k, rel_h, rel_w, q_size, scale)
    chunked = backward.core_backward(q, k, v, rel_h, rel_w, q_size, scale, out, dout, stats)
    host = [[to_host(g).astype(np.float64) for g in r] for r in (kept, passed, chunked)]
    floor = _floor(host[2], 1e-2)
    for i, name in enumerate(("dq", "dk", "dv", "d_rel_h", "d_rel_w")):
        assert np.all(np.isfinite(host[0][i])), name
        assert _rel_err(host[0][i], host[1][i], floor) <= 1e-2, f"{name} against the row pass"
        assert _rel_err(host[0][i], host[2][i], floor) <= 1e-2, f"{name} against the float32 core"


# The wgmma form of the 16-bit dq and dk / dv kernels (Hopper): SAM's global
# grids (key rows of 64) at head_dim 64 and 80, a window (generic mode, a
# 4-row last tile), q grid != k grid, partial tiles, head_dim 72 and 56
# (padded to 80 and 64), no terms.
WG_SHAPES = {
    "global-d64": (2, (64, 64), (64, 64), 64, True),
    "window-d64": (3, (14, 14), (14, 14), 64, True),
    "global-d80": (2, (64, 64), (64, 64), 80, True),
    "q-ne-k": (2, (9, 11), (13, 7), 64, True),
    "key-rows-d80": (2, (3, 50), (2, 64), 80, True),
    "d72": (2, (8, 8), (8, 8), 72, True),
    "d56": (1, (7, 8), (7, 8), 56, True),
    "no-terms": (2, (12, 12), (9, 9), 64, False),
}


def _wg_case(name, seed=24):
    heads, q_size, k_size, d, terms = WG_SHAPES[name]
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, heads, q_size[0] * q_size[1], d))
    k, v = (rng.standard_normal((1, heads, k_size[0] * k_size[1], d)) for _ in range(2))
    th = tw = None
    if terms:
        th = 0.5 * rng.standard_normal((2 * max(q_size[0], k_size[0]) - 1, d))
        tw = 0.5 * rng.standard_normal((2 * max(q_size[1], k_size[1]) - 1, d))
    return [q, k, v, th, tw], q_size, k_size, False


@pytest.mark.parametrize("nwg", [1, 2])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", sorted(WG_SHAPES))
def test_wgmma_kernels_match_the_mma_kernels(shape, dtype, nwg):
    """kernels="wg" (one or two warpgroups per block): the same gradients as
    the mma.sync kernels within 1e-2 (they compute the same products in the
    same order, and have given the same bits), and within 1e-2 of the float32
    chunked core, as the mma.sync ones."""
    case = _wg_case(shape)
    wg, chunked = _both_cores(case, _dtype(dtype), kernels="wg", warpgroups=nwg)
    mma, _ = _both_cores(case, _dtype(dtype), kernels="mma")
    floor = _floor(chunked, 1e-2)
    for name, got, ref, want in zip(("dq", "dk", "dv", "d_rel_h", "d_rel_w"), wg, mma, chunked):
        assert (got is None) == (want is None), name
        if got is not None:
            assert np.all(np.isfinite(got)), name
            assert _rel_err(got, ref, floor) <= 1e-2, f"{name} against mma.sync ({shape}, {dtype}, {nwg})"
            assert _rel_err(got, want, floor) <= 1e-2, f"{name} against float32 ({shape}, {dtype}, {nwg})"


def test_automatic_kernel_forms():
    """kernels="auto" on Hopper: the wgmma dk / dv kernel wherever it can run,
    its dq from 1024 keys on (SAM's global grids, not its windows); bwd.cu's
    elsewhere, and for float32 the SIMT kernels."""
    bf16 = _bf16_on_device()
    rng = np.random.default_rng(26)

    def forms(S, d, dtype, kernels="auto"):
        q, k, v = (to_device(rng.standard_normal((1, 2, S, d)).astype(dtype)) for _ in range(3))
        return backward.kernel_forms(q, k, v, None, None, kernels), backward.wg_reasons(q, k, v, None, None)

    (glob, why), (win, _), (d32, _) = forms(4096, 64, bf16), forms(196, 80, bf16), forms(4096, 32, bf16)
    if why:
        assert glob == win == d32 == {"dq": "mma", "dkv": "mma"}
    else:
        assert glob == {"dq": "wg", "dkv": "wg"} and win == {"dq": "mma", "dkv": "wg"}
        assert d32 == {"dq": "mma", "dkv": "mma"}   # head_dim 32: bwd.cu's alone
        assert forms(196, 64, bf16, "wg")[0] == {"dq": "wg", "dkv": "wg"}
    assert forms(4096, 64, bf16, "mma")[0] == {"dq": "mma", "dkv": "mma"}
    assert forms(196, 64, np.float32)[0] == {"dq": "simt", "dkv": "simt"}


@settings(SLOW, max_examples=15)
@given(problem=reference_problems(max_side=12, max_heads=2, head_dims=(56, 64, 72, 80)),
       dtype=st.sampled_from(["float16", "bfloat16"]))
def test_wgmma_kernels_random_problems(problem, dtype):
    """kernels="wg" on random grids (q != k, resized tables, none) within 1e-2
    of the float32 chunked core."""
    case = (problem["arrays"], problem["q_size"], problem["k_size"], False)
    wg, chunked = _both_cores(case, _dtype(dtype), kernels="wg")
    floor = _floor(chunked, 1e-2)
    for name, got, want in zip(("dq", "dk", "dv", "d_rel_h", "d_rel_w"), wg, chunked):
        if got is not None:
            assert _rel_err(got, want, floor) <= 1e-2, f"{name} {problem['what']} {dtype}"


def test_kernels_argument_is_checked():
    """A kernels value other than "auto" / "mma" / "wg" and a problem the
    wgmma form cannot take (float32 here; head_dim 16) are ValueErrors naming
    why."""
    rng = np.random.default_rng(25)
    q, k, v = (to_device(rng.standard_normal((1, 1, 16, 16)).astype(np.float32)) for _ in range(3))
    out = relattn.rel_pos_attention(q, k, v, None, None, q_size=(4, 4), backend="cupy")
    lse = backward.row_lse(q, k, None, None, (4, 4), 0.25)
    with pytest.raises(ValueError, match="kernels: expected 'auto', 'mma' or 'wg', got 'fast'"):
        backward.fused_core_backward(q, k, v, None, None, (4, 4), 0.25, out, out, lse, kernels="fast")
    with pytest.raises(ValueError, match="kernels='wg' cannot take this problem: dtype float32.*head_dim 16"):
        backward.fused_core_backward(q, k, v, None, None, (4, 4), 0.25, out, out, lse, kernels="wg")


@settings(SLOW, max_examples=15)
@given(problem=reference_problems(max_side=9, max_heads=2, head_dims=(8, 16, 24)),
       dtype=st.sampled_from(["float16", "bfloat16", "float32"]))
def test_fused_path_random_problems(problem, dtype):
    """rel_pos_attention_vjp on random problems (grids, q != k, resized
    tables, none) takes the fused kernels and matches the reference pullback
    on the same values within 1e-2 (16-bit) or 1e-5 (float32)."""
    dt = _dtype(dtype)
    arrays = _cast(problem["arrays"], dt)
    q_size, k_size = problem["q_size"], problem["k_size"]
    out, pullback = gpu_vjp(arrays, q_size, k_size)
    dout = np.random.default_rng(22).standard_normal(out.shape).astype(dt)
    calls = []
    real = backward.fused_core_backward
    try:
        backward.fused_core_backward = lambda *a: calls.append(1) or real(*a)
        grads = pullback(dout)
    finally:
        backward.fused_core_backward = real
    assert calls == [1], problem["what"]
    _, pullback_ref = reference_vjp(arrays, q_size, k_size)
    assert_grads_close(grads, pullback_ref(dout), arrays, k_size, _fused_tol(dtype), 1e-1, problem["what"])


def test_fused_path_memory():
    """bf16, 9216 tokens: the fused pullback's pool growth is the size of
    its inputs and gradients, far below one head's 324 MiB of logits."""
    pool = cupy.get_default_memory_pool()
    if cupy.cuda.get_allocator() != pool.malloc:
        pytest.skip("CuPy's default memory pool is not the allocator")
    bf16 = _bf16_on_device()
    rng = np.random.default_rng(23)
    side, head_dim = 96, 64
    q, k, v = (to_device(rng.standard_normal((1, 1, side * side, head_dim)).astype(bf16)) for _ in range(3))
    th, tw = (to_device((0.5 * rng.standard_normal((2 * side - 1, head_dim))).astype(bf16)) for _ in range(2))
    out, pullback = relattn.rel_pos_attention_vjp(q, k, v, th, tw, q_size=(side, side))
    dout = to_device(rng.standard_normal(out.shape).astype(bf16))
    grads, growth = _pool_growth(pool, pullback, dout)
    assert growth < 32 * 2**20, growth
    assert all(np.isfinite(to_host(g).astype(np.float32)).all() for g in grads)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_fused_plain_attention_without_sizes(dtype):
    """No tables and no grid sizes: the fused kernels without terms, against
    the reference pullback on the same values."""
    dt = _dtype(dtype)
    rng = np.random.default_rng(24)
    arrays = [rng.standard_normal((2, 3, 100, 32)).astype(dt) for _ in range(3)]
    dev = [to_device(a) for a in arrays]
    out, pullback = relattn.rel_pos_attention_vjp(*dev)
    dout = rng.standard_normal(out.shape).astype(dt)
    grads = [to_host(g) for g in pullback(to_device(dout))]
    assert grads[3] is None and grads[4] is None
    _, pullback_ref = relattn.rel_pos_attention_vjp(*arrays, backend="numpy")
    assert_grads_close(grads, pullback_ref(dout), arrays + [None, None], (10, 10), _fused_tol(dtype), 1e-1,
                       "plain")


def test_fused_reasons():
    """What sends a problem to the chunked path."""
    dev, q_size, k_size = _small_device(np.float64)
    q, k, v = dev[:3]
    assert any("dtype float64" in r for r in backward.fused_reasons(q, k, v, None, k_size))
    assert backward.fused_reasons(q.astype(cupy.float32), k.astype(cupy.float32), v.astype(cupy.float32),
                                  None, k_size) == []
    h = q.astype(cupy.float16)
    assert backward.fused_reasons(h, k.astype(cupy.float16), v.astype(cupy.float16), None, k_size) == []
    h12 = cupy.zeros(q.shape[:3] + (12,), cupy.float16)
    assert any("head_dim 12" in r for r in backward.fused_reasons(h12, h12, h12, None, k_size))
    big = cupy.zeros((1, 1, 4, 8), cupy.float16)
    assert any("k_h + k_w" in r for r in backward.fused_reasons(big, big, big, big, (200, 100)))


# ------------------------------------------------------------------ errors
def _small_device(dtype=np.float64):
    arrays, q_size, k_size, _ = make_case("no_tables", seed=14)
    rng = np.random.default_rng(14)
    th, tw = (rng.standard_normal((n, 32)) for n in (11, 13))
    return [to_device(a.astype(dtype)) for a in (*arrays[:3], th, tw)], q_size, k_size


def test_bad_dout_is_refused_naming_it():
    dev, q_size, k_size = _small_device()
    out, pullback = relattn.rel_pos_attention_vjp(*dev, q_size=q_size, k_size=k_size)
    with pytest.raises(TypeError, match="dout"):
        pullback(out.get())                                   # a numpy array
    with pytest.raises(TypeError, match="dout"):
        pullback(out.astype(cupy.float32))                    # another dtype
    with pytest.raises(TypeError, match="dout"):
        pullback(out.get().tolist())
    with pytest.raises(ValueError, match="dout"):
        pullback(out[..., :-1])                               # another shape


@pytest.mark.skipif(_NDEV < 2, reason="needs two CUDA devices")
def test_dout_on_another_device_is_refused():
    dev, q_size, k_size = _small_device()
    out, pullback = relattn.rel_pos_attention_vjp(*dev, q_size=q_size, k_size=k_size)
    with cupy.cuda.Device(1):
        elsewhere = cupy.asarray(out.get())
    with pytest.raises(ValueError, match="dout.*device"):
        pullback(elsewhere)


@pytest.mark.parametrize("host_backend", ["numpy", "numba"])
def test_host_backends_refuse_cupy_arrays(host_backend):
    dev, q_size, k_size = _small_device()
    with pytest.raises(relattn.BackendError, match="host"):
        relattn.rel_pos_attention_vjp(*dev, q_size=q_size, k_size=k_size, backend=host_backend)


def test_cupy_backend_refuses_numpy_arrays():
    dev, q_size, k_size = _small_device()
    with pytest.raises(relattn.BackendError, match="CuPy arrays"):
        relattn.rel_pos_attention_vjp(*[a.get() for a in dev], q_size=q_size, k_size=k_size, backend="cupy")


def test_unknown_backend():
    dev, q_size, k_size = _small_device()
    with pytest.raises(ValueError, match="backend"):
        relattn.rel_pos_attention_vjp(*dev, q_size=q_size, k_size=k_size, backend="nope")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("sizes", [(14, 14), (5, 9), (9, 5), (64, 64)])
def test_gathered_tables_kernel_is_get_rel_pos(sizes, dtype):
    """The pullback's float32 gathered tables (one kernel) are get_rel_pos's
    gather of the same table, widened exactly."""
    q_len, k_len = sizes
    dt = _dtype(dtype)
    table = np.random.default_rng(24).standard_normal((2 * max(sizes) - 1, 40)).astype(dt)
    got = backward.gathered_f32(to_device(table), q_len, k_len)
    want = relattn.get_rel_pos(q_len, k_len, table.astype(np.float32))
    assert got.dtype == np.float32 and got.shape == (q_len, k_len, 40)
    assert np.array_equal(got.get(), want)
