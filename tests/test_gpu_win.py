"""The small-grid kernel relattn_win with the relative terms computed inside it
(fuse 1: SAM's 14 x 14 windows). Skipped without CuPy or a CUDA device.

On a Hopper GPU relattn_ws's 16-slot key rows come first, so these tests
force relattn_win by name (``relattn.plan(..., kernel="win")``). Cases are
compared with the float64 numpy evaluation of tests/test_gpu.py.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

# test_gpu skips the whole module where CuPy or a CUDA device is missing
from test_gpu import cupy  # noqa: E402

pytestmark = pytest.mark.gpu

import relattn  # noqa: E402
from relattn import functional  # noqa: E402
from relattn.backends import gpu  # noqa: E402
from relattn.backends.gpu import _device, families, terms  # noqa: E402
from test_gpu import TOL, from_dev, replayed_from_graph, reference, rel_l2, to_dev  # noqa: E402
from test_gpu_ws import _tables  # noqa: E402


@pytest.fixture
def win():
    if gpu.unavailable_reason() is not None:
        pytest.skip(gpu.unavailable_reason())
    if int(cupy.cuda.Device().compute_capability) < 80:
        pytest.skip("bfloat16 mma.sync needs compute capability 8.0")


def win_plan(q, k, v, th, tw, q_size, k_size=None, **options):
    """relattn.plan with relattn_win forced, ``options`` its kernel_options."""
    return relattn.plan(q, k, v, th, tw, q_size, k_size, kernel="win", kernel_options=options or None)


def _is_window_plan(p, terms="fused"):
    """Whether plan ``p`` runs relattn_win, with the terms computed inside it (or as ``terms`` says)."""
    return p.kernel.startswith("relattn_win (") and p.kernel.endswith(f"terms: {terms}")


CASES = [  # B, H, q grid, k grid, head_dim, table rows (None: 2 * max - 1), slices per block (kernel_options spb)
    (25, 2, (14, 14), (14, 14), 64, None, None),   # SAM-B windows
    (2, 2, (14, 14), (14, 14), 80, None, None),    # SAM-H windows (head_dim 80)
    (2, 3, (14, 14), (14, 14), 72, None, None),
    (2, 2, (14, 14), (14, 14), 56, None, None),    # head_dim 56 read as 64
    (2, 3, (14, 14), (14, 14), 64, 20, None),      # tables resized (SAM's rule) first
    (2, 3, (7, 9), (14, 14), 64, None, None),      # q grid != key grid
    (1, 2, (16, 16), (5, 11), 64, None, None),     # the largest q grid, a small key grid
    (1, 2, (16, 16), (16, 16), 64, None, None),    # 256 key slots
    (1, 2, (1, 1), (1, 1), 64, None, None),
    (1, 2, (3, 5), (4, 2), 64, None, None),        # fewer than 4 query slices
    (2, 2, (14, 14), (14, 14), 64, None, 4),       # 4 blocks per window
    (2, 2, (14, 14), (14, 14), 64, None, 5),       # a partial second round of slices
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-q{c[2][0]}x{c[2][1]}-k{c[3][0]}x{c[3][1]}"
                                                      f"-d{c[4]}-r{c[5]}-spb{c[6]}")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fused_window_terms(case, dtype, win):
    """A call with 16-bit tables on a small grid runs relattn_win with the
    terms inside: the plan's calls give the same bits, within float64
    accuracy (the reference takes the same resized 16-bit tables), close to
    the unfused path (terms kernel + relattn_win), inputs unmodified."""
    from relattn.relpos import resize_rel_pos

    B, H, qg, kg, D, rows, spb = case
    options = {"spb": spb} if spb else {}
    rng = np.random.default_rng(zlib.crc32(repr((case, dtype)).encode()))
    (q, qr), (k, kr), (v, vr) = (to_dev(rng.standard_normal((B, H, g[0] * g[1], D)), dtype)
                                 for g in (qg, kg, kg))
    Lh, Lw = 2 * max(qg[0], kg[0]) - 1, 2 * max(qg[1], kg[1]) - 1
    (th, _), (tw, _) = _tables(rng, rows or Lh, rows or Lw, D, dtype)
    before = [from_dev(a).copy() for a in (q, k, v, th, tw)]
    p = win_plan(q, k, v, th, tw, qg, kg, **options)
    assert _is_window_plan(p), p.kernel
    assert f"spb={spb or min((qg[0] * qg[1] + 15) // 16, 16)} " in p.kernel
    first = p(q, k, v, th, tw)
    for _ in range(2):
        np.testing.assert_array_equal(from_dev(p(q, k, v, th, tw)), from_dev(first))
    rth = from_dev(resize_rel_pos(th, Lh) if rows else th)
    rtw = from_dev(resize_rel_pos(tw, Lw) if rows else tw)
    rh, rw = relattn.decomposed_rel_pos(qr, rth, rtw, qg, kg)
    ref = reference(qr, kr, vr, rh, rw, kg, D ** -0.5)
    assert rel_l2(from_dev(first), ref) <= TOL[dtype]
    for a, b in zip((q, k, v, th, tw), before):
        np.testing.assert_array_equal(from_dev(a), b)
    p = win_plan(q, k, v, th, tw, qg, kg, fused=False, **options)
    assert _is_window_plan(p, "kernel"), p.kernel
    unfused = p(q, k, v, th, tw)
    assert rel_l2(from_dev(unfused), ref) <= TOL[dtype]
    assert rel_l2(from_dev(unfused), from_dev(first)) <= TOL[dtype]


def test_fused_window_logits_near_float16_overflow(win):
    """bf16 inputs whose logits reach ~1e4 (bias included): finite and exact
    to bf16 accuracy."""
    rng = np.random.default_rng(5)
    g, D = (14, 14), 64
    (q, qr), (k, kr), (v, vr) = (to_dev(x, "bfloat16") for x in
                                 (30 * rng.standard_normal((2, 2, 196, D)), 30 * rng.standard_normal((2, 2, 196, D)),
                                  rng.standard_normal((2, 2, 196, D))))
    (th, thr), (tw, twr) = (to_dev(40 * rng.standard_normal((27, D)), "bfloat16") for _ in range(2))
    p = win_plan(q, k, v, th, tw, g)
    assert _is_window_plan(p), p.kernel
    out = from_dev(p(q, k, v, th, tw))
    rh, rw = relattn.decomposed_rel_pos(qr, thr, twr, g, g)
    assert np.abs(rh).max() > 1e4
    assert np.isfinite(out).all()
    assert rel_l2(out, reference(qr, kr, vr, rh, rw, g, D ** -0.5)) <= TOL["bfloat16"]


@pytest.mark.parametrize("why", ["q_grid_17", "k_w_20", "float32_tables", "float16_tables_bf16_q"])
def test_fused_window_not_taken(why, win):
    """Small grids the fused window kernel does not serve run the terms kernel
    first (tables over 32 rows, 32-slot key rows, tables of another dtype)."""
    qg, kg, D = (14, 14), (14, 14), 64
    dtype, tdtype = "bfloat16", "bfloat16"
    if why == "q_grid_17":
        qg = (17, 14)
    elif why == "k_w_20":
        qg = kg = (8, 20)
    elif why == "float32_tables":
        tdtype = "float32"
    else:
        tdtype = "float16"
    rng = np.random.default_rng(zlib.crc32(why.encode()))
    (q, qr), (k, kr), (v, vr) = (to_dev(rng.standard_normal((2, 2, g[0] * g[1], D)), dtype) for g in (qg, kg, kg))
    (th, thr), (tw, twr) = _tables(rng, 2 * max(qg[0], kg[0]) - 1, 2 * max(qg[1], kg[1]) - 1, D, tdtype)
    assert not gpu.make_plan(q, k, v, th, tw, qg, kg, D ** -0.5).fused   # no fused kernel at all
    p = win_plan(q, k, v, th, tw, qg, kg)
    assert _is_window_plan(p, "kernel"), p.kernel
    rh, rw = relattn.decomposed_rel_pos(qr, thr, twr, qg, kg)
    ref = reference(qr, kr, vr, rh, rw, kg, D ** -0.5)
    assert rel_l2(from_dev(p(q, k, v, th, tw)), ref) <= TOL[dtype]
    assert rel_l2(from_dev(relattn.rel_pos_attention(q, k, v, th, tw, qg, kg)), ref) <= TOL[dtype]


def test_fused_window_runs_no_terms_kernel(win, monkeypatch):
    """First, planned and DLPack (unplannable) calls compute no separate terms
    and give the same bits, on relattn_win and on the planner's choice."""
    rng = np.random.default_rng(7)
    g = (14, 14)
    (q, _), (k, _), (v, _) = (to_dev(rng.standard_normal((4, 2, 196, 64)), "bfloat16") for _ in range(3))
    (th, _), (tw, _) = _tables(rng, 27, 27, 64, "bfloat16")
    functional._plans.clear()
    relattn.rel_pos_attention(q, k, v, th, tw, g)
    want = from_dev(relattn.rel_pos_attention(q, k, v, th, tw, g))
    want_win = from_dev(win_plan(q, k, v, th, tw, g)(q, k, v, th, tw))

    def no_terms(*args, **kwargs):
        raise AssertionError("the separate terms kernel ran")

    for name in ("plan", "terms_plan", "rel_terms"):
        monkeypatch.setattr(terms, name, no_terms)
    p = win_plan(q, k, v, th, tw, g)
    for _ in range(2):
        np.testing.assert_array_equal(from_dev(p(q, k, v, th, tw)), want_win)
    functional._plans.clear()
    for _ in range(2):
        np.testing.assert_array_equal(from_dev(relattn.rel_pos_attention(q, k, v, th, tw, g)), want)
    torch = pytest.importorskip("torch")
    args = tuple(torch.from_dlpack(a.view(cupy.uint16)).view(torch.bfloat16) for a in (q, k, v, th, tw))
    got = relattn.rel_pos_attention(*args, g)
    assert type(got).__module__.startswith("torch")
    np.testing.assert_array_equal(from_dev(cupy.from_dlpack(got.view(torch.uint16)).view(q.dtype)), want)


def test_fused_window_strided_views(win):
    """q / k / v as views of a packed qkv buffer (row stride 3 * heads * d)."""
    rng = np.random.default_rng(9)
    B, H, D, g = 3, 2, 64, (14, 14)
    qkv, qkvr = to_dev(rng.standard_normal((B, 196, 3, H, D)), "bfloat16")
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    qr, kr, vr = (qkvr[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    (th, thr), (tw, twr) = _tables(rng, 27, 27, D, "bfloat16")
    p = win_plan(q, k, v, th, tw, g)
    assert _is_window_plan(p), p.kernel
    out = from_dev(p(q, k, v, th, tw))
    rh, rw = relattn.decomposed_rel_pos(qr, thr, twr, g, g)
    assert rel_l2(out, reference(qr, kr, vr, rh, rw, g, D ** -0.5)) <= TOL["bfloat16"]


def test_fused_window_captured_in_a_cuda_graph(win):
    rng = np.random.default_rng(11)
    g = (14, 14)
    (q, _), (k, _), (v, _) = (to_dev(rng.standard_normal((3, 2, 196, 64)), "bfloat16") for _ in range(3))
    (th, _), (tw, _) = _tables(rng, 27, 27, 64, "bfloat16")
    p = win_plan(q, k, v, th, tw, g)
    assert _is_window_plan(p), p.kernel
    first = p(q, k, v, th, tw)
    out = replayed_from_graph(lambda: p(q, k, v, th, tw))
    np.testing.assert_array_equal(from_dev(out), from_dev(first))


def test_windowed_layer_on_the_fused_kernel(win, monkeypatch):
    """A bf16 windowed layer (SAM's 14 x 14 windows, padded 30 x 30 input)
    runs the fused window plan and matches the float64 layer. (relattn_ws,
    which takes these windows first on a Hopper GPU, is left out of the
    planner's list here, so that relattn_win is the kernel that runs.)"""
    win_family = families.FAMILIES["win"]
    monkeypatch.setitem(families.PRIORITY, "bfloat16",
                        tuple(f for f in families.PRIORITY["bfloat16"] if f is not families.FAMILIES["ws"]))
    built = []   # the relattn_win configurations planned
    build = win_family.build

    def recording_build(p, device, c, *arrays):
        run, why = build(p, device, c, *arrays)
        if run is not None:
            built.append(c)
        return run, why

    monkeypatch.setattr(win_family, "build", recording_build)
    layer = relattn.Attention(128, 2, use_rel_pos=True, rel_pos_zero_init=False, input_size=(14, 14),
                              window_size=14, dtype="bfloat16", rng=0)
    layer.rel_pos_h = layer.rel_pos_h * 20  # make the bias matter
    layer.rel_pos_w = layer.rel_pos_w * 20
    x = np.random.default_rng(1).standard_normal((1, 30, 30, 128)).astype(np.float32)
    xd, xr = to_dev(x, "bfloat16")
    functional._plans.clear()
    try:
        out = from_dev(layer(xd))
    finally:
        functional._plans.clear()   # planned without relattn_ws: not for later calls
    assert any(c.fuse == 1 for c in built), built
    ref = relattn.Attention(128, 2, use_rel_pos=True, input_size=(14, 14), window_size=14, dtype="float64",
                            backend="numpy")
    ref.load_state_dict({name: np.asarray(from_dev(a) if hasattr(a, "get") else a, dtype=np.float64)
                         for name, a in layer.state_dict().items()})
    assert rel_l2(out, ref(xr)) <= 8e-3


@pytest.mark.parametrize("grid", [(14, 14), (8, 64)], ids=["window", "global"])
def test_fused_tables_misaligned(grid, win):
    """Tables that are contiguous views at an address not 16-byte aligned (the
    fused kernels copy table rows 16 bytes at a time) are copied first: no
    misaligned access, the same result as aligned tables."""
    rng = np.random.default_rng(13)
    D = 64
    L = [2 * n - 1 for n in grid]
    (q, _), (k, _), (v, _) = (to_dev(rng.standard_normal((2, 2, grid[0] * grid[1], D)), "bfloat16") for _ in range(3))
    flat = [to_dev(0.5 * rng.standard_normal(n * D + 1), "bfloat16")[0] for n in L]
    th, tw = (f[1:].reshape(n, D) for f, n in zip(flat, L))
    assert th.data.ptr % 16 == 2 and th.flags.c_contiguous
    kernel = "win" if grid == (14, 14) else None   # the windows on relattn_win, the global grid as planned
    ath, atw = th.copy(), tw.copy()
    want = from_dev(relattn.plan(q, k, v, ath, atw, grid, kernel=kernel)(q, k, v, ath, atw))
    p = relattn.plan(q, k, v, th, tw, grid, kernel=kernel)
    if kernel is not None or _device.current().hopper:   # relattn_win, or relattn_ws on the global grid
        assert p.kernel.endswith("terms: fused"), p.kernel
    for _ in range(2):   # the plan's calls
        np.testing.assert_array_equal(from_dev(p(q, k, v, th, tw)), want)
    if kernel is None:   # rel_pos_attention's first and planned calls
        for _ in range(2):
            np.testing.assert_array_equal(from_dev(relattn.rel_pos_attention(q, k, v, th, tw, grid)), want)


@pytest.mark.parametrize("fuse", ["1", "0"])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_window_nonfinite_value_poisons_its_column(bad, fuse, win):
    """A non-finite value in V (key 14: the first of the second key row, which
    sits next to row 0's padding slots) reaches every output row of its
    column as +inf / NaN, as in the reference; the other columns stay finite
    (relattn_win with the terms inside it and computed before)."""
    rng = np.random.default_rng(17)
    g, D = (14, 14), 64
    q, k, v = (rng.standard_normal((1, 2, 196, D)) for _ in range(3))
    v[0, 0, 14, 2] = bad
    (qd, _), (kd, _), (vd, _) = (to_dev(x, "bfloat16") for x in (q, k, v))
    (th, _), (tw, _) = _tables(rng, 27, 27, D, "bfloat16")
    p = win_plan(qd, kd, vd, th, tw, g, fused=fuse == "1")
    assert _is_window_plan(p, "fused" if fuse == "1" else "kernel"), p.kernel
    out = from_dev(p(qd, kd, vd, th, tw)).astype(np.float64)
    col = out[0, 0, :, 2]
    assert (np.isnan(col) if np.isnan(bad) else np.isposinf(col)).all()
    assert np.isfinite(np.delete(out[0, 0], 2, axis=1)).all() and np.isfinite(out[0, 1]).all()
