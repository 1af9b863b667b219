"""The warp-specialised Hopper kernel relattn_ws and its fused relative terms
(skipped without CuPy, a CUDA device or an sm_90a-capable one).

Cases are compared with the float64 numpy evaluation of tests/test_gpu.py.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import pytest

# test_gpu skips the whole module where CuPy or a CUDA device is missing
from test_gpu import cupy  # noqa: E402

pytestmark = pytest.mark.gpu

import relattn  # noqa: E402
from relattn import functional  # noqa: E402
from relattn.backends import gpu  # noqa: E402
from relattn.backends.gpu import _build, terms, tuning  # noqa: E402
from relattn.backends.gpu.families import wg, ws  # noqa: E402
from test_gpu import (TOL, core_plan, from_dev, make_case, options_id, problem, reference,  # noqa: E402
                      rel_l2, replayed_from_graph, run_and_check, to_dev)


@pytest.fixture
def sm90():
    """The device, where the sm_90a kernels can run on it (else the test is skipped)."""
    from test_gpu import hopper

    return hopper()


def cfg(nc, bn, stages, pp, rg, mb=None):
    """kernel_options of a relattn_ws configuration."""
    return dict(nc=nc, bn=bn, stages=stages, pp=pp, rg=rg, **({} if mb is None else {"mb": mb}))


def ws_config(options, bias):
    """The ws.Config of kernel_options ``options`` (defaults of the dataclass: mb 1)."""
    return ws.Config(options["nc"], options["bn"], bias, options["stages"], options["pp"], options["rg"],
                     options.get("mb", 1), options.get("persist", 1))


def fused_plan(q, k, v, th, tw, qg, kg, **options):
    """The backend's plan of a call with tables (the planner's choice, or with
    ``options`` relattn_ws forced with them as kernel_options)."""
    kernel = "ws" if options else None
    return gpu.make_plan(q, k, v, th, tw, qg, kg, q.shape[-1] ** -0.5, kernel, options or None)


WS_CFGS = [cfg(3, 64, 4, 1, 160), cfg(3, 64, 3, 0, 160), cfg(2, 128, 3, 1, 240), cfg(2, 64, 4, 1, 0),
           cfg(2, 64, 2, 0, 0)]
WS_SHAPES = [  # B, H, q grid, k grid, head_dim
    (1, 2, (16, 64), (16, 64), 64),
    (2, 3, (9, 64), (5, 64), 64),      # q/k grids of different sizes, partial tiles
    (1, 2, (7, 64), (3, 64), 56),      # head_dim 56 read as 64 (zero columns)
    (1, 1, (1, 64), (1, 64), 64),      # one key tile, one query row block
    (1, 2, (3, 64), (11, 64), 64),     # more keys than queries
    (1, 2, (16, 64), (16, 64), 80),    # SAM-H's head_dim: a second, unswizzled column part
    (2, 1, (9, 64), (5, 64), 72),      # head_dim 72 read as 80
]


@pytest.mark.parametrize("options", WS_CFGS, ids=options_id)
@pytest.mark.parametrize("shape", WS_SHAPES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_ws_kernel_configs(shape, dtype, options, sm90):
    """Every consumer / tile / stage / round-robin / register configuration
    (forced: kernel="ws" with kernel_options), with the terms (KEY_ROWS) and
    without (NONE), against float64."""
    B, H, qg, kg, D = shape
    rng = np.random.default_rng(zlib.crc32(repr((shape, dtype, options_id(options))).encode()))
    dev, host = make_case(rng, B, H, qg, kg, D, dtype)
    assert core_plan(dev, kg, D ** -0.5, "ws", **options).config == ws_config(options, ws.Bias.KEY_ROWS)
    run_and_check(dev, host, kg, D ** -0.5, dtype, kernel="ws", **options)
    q, k, v, _, _ = dev
    plain = core_plan((q, k, v, None, None), kg, D ** -0.5, "ws", **options)
    assert plain.config == ws_config(options, ws.Bias.NONE)
    out = plain.run(q, k, v, None, None)
    assert rel_l2(from_dev(out), reference(*host[:3], None, None, kg, D ** -0.5)) <= TOL[dtype]


ROW80_SHAPES = [  # B, H, q grid, k grid, head_dim
    (1, 2, (80, 80), (80, 80), 64),    # SAM-B / SAM-L at 1280 px
    (2, 1, (7, 80), (3, 80), 64),      # partial row tiles, three key rows
    (1, 2, (40, 40), (20, 80), 64),    # q grid != key grid
    (1, 1, (5, 80), (9, 80), 56),      # head_dim 56 read as 64
    (1, 2, (1, 80), (1, 80), 64),      # one key tile, one row tile
]


@pytest.mark.parametrize("options", [None, cfg(3, 80, 3, 1, 160), cfg(2, 80, 2, 0, 240), cfg(1, 80, 4, 0, 0, 2)],
                         ids=lambda o: options_id(o or {}))
@pytest.mark.parametrize("shape", ROW80_SHAPES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_ws_80_key_rows(shape, dtype, options, sm90):
    """k_w = 80: key tiles of one 80-key row (rel_w in registers) against
    float64, chosen by the planner and in other consumer / stage / register
    settings (kernel="ws" with kernel_options); the kernel that runs is the
    80-key one (no silent fallback)."""
    B, H, qg, kg, D = shape
    rng = np.random.default_rng(zlib.crc32(repr((shape, dtype, options and options_id(options))).encode()))
    dev, host = make_case(rng, B, H, qg, kg, D, dtype, relmag=3.0)
    if options is None:
        nc, bn, st, pp, rg, mb = tuning.WS[("row80", 64)]
        want = ws.Config(nc, 80, ws.Bias.KEY_ROWS, st, pp, rg, mb)
        plan = core_plan(dev, kg, D ** -0.5)
    else:
        want = ws_config(options, ws.Bias.KEY_ROWS)
        plan = core_plan(dev, kg, D ** -0.5, "ws", **options)
    assert (plan.family, plan.config) == ("ws", want)
    q, k, v, rh, rw = dev
    out = plan.run(q, k, v, rh, rw)
    assert rel_l2(from_dev(out), reference(*host, kg, D ** -0.5)) <= TOL[dtype]


@pytest.mark.parametrize("why", ["head_dim 80", "relattn_wg forced", "k_w 64", "keys not whole rows"])
def test_ws_80_key_rows_not_taken(why, sm90):
    """80-key tiles only where they are key rows of k_w = 80 at head_dim 64."""
    hd, Sq, kh, kw = 64, 1600, 20, 80
    Sk = kh * kw
    options = {}
    if why == "head_dim 80":
        hd = 80
    elif why == "relattn_wg forced":   # relattn_wg's whole key rows serve it
        p = problem(hd, Sq, Sk, kh, kw)
        assert wg.not_supported_reasons(p, sm90, False) == []
        assert wg.config(p, sm90, False, {}) == wg.Config(1, 80, wg.Bias.WHOLE_ROW, 2)
        return
    elif why == "k_w 64":
        options = cfg(2, 80, 4, 1, 240)
        kw, Sk = 64, kh * 64
    else:
        Sk -= 1
    p = problem(hd, Sq, Sk, kh, kw)
    reasons = ws.not_supported_reasons(p, sm90, False)
    assert reasons or ws.config_reasons(p, ws.config(p, sm90, False, options))


@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("sizes", [(1, 3), (300, 1000), (1000, 77), (64, 129)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_ws_plain_attention_any_length(sizes, dtype, D, sm90):
    """No terms: any Sq / Sk, key tiles past the end zero-filled by TMA and masked."""
    Sq, Sk = sizes
    rng = np.random.default_rng(zlib.crc32(repr((sizes, dtype, D)).encode()))
    (q, qr), (k, kr), (v, vr) = (to_dev(rng.standard_normal((2, 2, n, D)), dtype) for n in (Sq, Sk, Sk))
    plan = core_plan((q, k, v, None, None), None, D ** -0.5)
    assert plan.family == "ws" and plan.config.bias == ws.Bias.NONE
    out = plan.run(q, k, v, None, None)
    assert rel_l2(from_dev(out), reference(qr, kr, vr, None, None, None, D ** -0.5)) <= TOL[dtype]


@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("layout", ["sam_qkv", "misaligned", "head_dim_slice"])
def test_ws_operand_layouts(layout, D, sm90):
    """Views of SAM's packed qkv (head stride below the row stride), inputs
    one element off 16 bytes (copied first) and a head-dim slice (row stride
    twice the width): the tensor maps describe each, the inputs stay as they were."""
    rng = np.random.default_rng(zlib.crc32(repr((layout, D)).encode()))
    B, H, g = 2, 3, (8, 64)
    S = g[0] * g[1]
    if layout == "sam_qkv":
        qkv, qkvr = to_dev(rng.standard_normal((B, S, 3, H, D)), "bfloat16")
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        qr, kr, vr = (qkvr[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    elif layout == "misaligned":
        from test_gpu import _misaligned

        (q, qr), (k, kr), (v, vr) = (to_dev(rng.standard_normal((B, H, S, D)), "bfloat16") for _ in range(3))
        q, k, v = (_misaligned(a) for a in (q, k, v))
        assert q.data.ptr % 16
    else:
        (q, qr), (k, kr), (v, vr) = (to_dev(rng.standard_normal((B, H, S, 2 * D)), "bfloat16") for _ in range(3))
        q, k, v, qr, kr, vr = (a[..., :D] for a in (q, k, v, qr, kr, vr))
    before = [from_dev(a) for a in (q, k, v)]
    (rh, rhr), (rw, rwr) = (to_dev(rng.standard_normal((B, H, S, n)), "float32") for n in g)
    out = gpu.attention(q, k, v, rh, rw, g, D ** -0.5)
    assert rel_l2(from_dev(out), reference(qr, kr, vr, rhr, rwr, g, D ** -0.5)) <= TOL["bfloat16"]
    for a, b in zip(before, (q, k, v)):
        np.testing.assert_array_equal(a, from_dev(b))


# ------------------------------------------- small key grids (16-slot key rows)
WIN_SHAPES = [  # B, H, q grid, k grid, head_dim
    (3, 2, (14, 14), (14, 14), 64),    # SAM's windows: 4 key tiles, the last with 2 key rows
    (2, 2, (14, 14), (14, 14), 80),
    (2, 3, (10, 10), (10, 10), 64),    # 3 key tiles
    (1, 2, (16, 16), (16, 16), 64),    # k_w == 16: no padding slot
    (2, 2, (7, 9), (7, 9), 64),
    (1, 2, (14, 14), (5, 16), 64),     # q and key grids of different sizes
    (2, 2, (3, 3), (1, 1), 64),        # one key
    (2, 1, (12, 12), (13, 11), 72),    # head_dim 72 read as 80
]


@pytest.mark.parametrize("options", [None, cfg(2, 64, 4, 1, 240, 1)], ids=lambda o: options_id(o or {}))
@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("shape", WIN_SHAPES, ids=lambda c: f"B{c[0]}H{c[1]}-q{c[2][0]}x{c[2][1]}-k{c[3][0]}x{c[3][1]}-d{c[4]}")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_ws_small_key_grids(shape, dtype, blocks, options, sm90):
    """k_w <= 16: every key row in 16 slots (WINDOW), terms given, against
    float64, for the default and another configuration; with kernel_options
    persist=2 the two blocks loop over the row tiles."""
    B, H, qg, kg, D = shape
    options = dict(options or {}, **({"persist": 2} if blocks == 2 else {}))
    rng = np.random.default_rng(zlib.crc32(repr((shape, dtype)).encode()))
    dev, host = make_case(rng, B, H, qg, kg, D, dtype)
    plan = core_plan(dev, kg, D ** -0.5, "ws", **options)
    assert plan.config.bias == ws.Bias.WINDOW and plan.config.persist == blocks
    if not options:
        assert core_plan(dev, kg, D ** -0.5).config == plan.config   # the planner's choice
    run_and_check(dev, host, kg, D ** -0.5, dtype, kernel="ws", **options)


@pytest.mark.parametrize("bad", ["k_inf", "v_nan"])
def test_ws_small_key_grids_nonfinite_stays_in_its_window(bad, sm90):
    """A non-finite key or value of one window (batch element) does not reach
    the other windows through the ring's stages (the slots past k_w, the key
    rows past k_h): they equal the results without it."""
    rng = np.random.default_rng(3)
    dev, host = make_case(rng, 6, 2, (14, 14), (14, 14), 64, "bfloat16")
    q, k, v, rh, rw = dev
    clean = from_dev(gpu.attention(q, k, v, rh, rw, (14, 14), 0.125))
    k2, v2 = k.copy(), v.copy()
    if bad == "k_inf":
        k2.view(cupy.uint16)[0, 1, 100, 3] = 0x7F80
    else:
        v2.view(cupy.uint16)[0, 1, 100, 3] = 0x7FC0
    # two blocks carry stages from window to window
    plan = core_plan((q, k2, v2, rh, rw), (14, 14), 0.125, "ws", persist=2)
    assert plan.config.bias == ws.Bias.WINDOW
    got = from_dev(plan.run(q, k2, v2, rh, rw))
    np.testing.assert_array_equal(got[1:], clean[1:])
    np.testing.assert_array_equal(got[0, 0], clean[0, 0])
    assert np.isnan(got[0, 1]).any()


_POISON_SRC = r"""
extern "C" __global__ void poison_smem(unsigned int n) {
    extern __shared__ unsigned int sm[];
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) sm[i] = 0xFFFFFFFFu;
    __syncthreads();
}
extern "C" __global__ void probe_smem(unsigned int n, unsigned int* out) {
    extern __shared__ unsigned int sm[];
    unsigned int bad = 0;
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) bad |= (sm[i] == 0xFFFFFFFFu);
    if (bad) atomicAdd(out, 1u);
}
"""


@functools.lru_cache(maxsize=None)
def _poison_kernels():
    kernels = tuple(cupy.RawKernel(_POISON_SRC, name) for name in ("poison_smem", "probe_smem"))
    for fn in kernels:
        fn.max_dynamic_shared_size_bytes = _build.MAX_SMEM_SM90   # one block takes a whole SM's shared memory
    return kernels


def _poison_shared_memory(check=False):
    """Fill the shared memory of every SM with all-ones words (NaN in bf16 /
    fp16); with ``check``, whether a later kernel's uninitialised shared
    memory still holds them."""
    poison, probe = _poison_kernels()
    n_sm = int(cupy.cuda.Device().attributes["MultiProcessorCount"])
    nbytes = _build.MAX_SMEM_SM90
    poison((2 * n_sm,), (1024,), (np.uint32(nbytes // 4),), shared_mem=nbytes)
    if not check:
        return True
    out = cupy.zeros((1,), dtype=cupy.uint32)
    probe((2 * n_sm,), (1024,), (np.uint32(nbytes // 4), out), shared_mem=nbytes)
    return int(out.get()[0]) > 0


@pytest.mark.parametrize("fused", [False, True])
def test_ws_small_key_grids_stale_nan_shared_memory(fused, sm90):
    """Shared memory left full of NaN bits by an earlier kernel does not reach
    the output: relattn_ws zeroes the key rows' padding slots (k_w .. 15),
    which no TMA box writes and whose rel_w is -inf (0 x NaN would be NaN),
    once per block. Same bits as the run on clean shared memory."""
    if not _poison_shared_memory(check=True):
        pytest.skip("this device clears shared memory between kernels: nothing stale to guard against")
    rng = np.random.default_rng(11)
    B, H, g, D = 6, 2, (14, 14), 64
    (q, _), (k, _), (v, _) = (to_dev(rng.standard_normal((B, H, 196, D)), "bfloat16") for _ in range(3))
    if fused:
        (th, _), (tw, _) = _tables(rng, 27, 27, D, "bfloat16")
        assert fused_plan(q, k, v, th, tw, g, g).config.bias == ws.Bias.FUSED_WINDOW

        def plan(blocks):
            p = relattn.plan(q, k, v, th, tw, g, g, kernel="ws", kernel_options={"persist": blocks, "fused": True})
            return lambda: p(q, k, v, th, tw)
    else:
        (rh, _), (rw, _) = (to_dev(rng.standard_normal((B, H, 196, 14)), "float32") for _ in range(2))

        def plan(blocks):
            p = core_plan((q, k, v, rh, rw), g, D ** -0.5, "ws", persist=blocks)
            assert p.config.bias == ws.Bias.WINDOW
            return lambda: p.run(q, k, v, rh, rw)
    for blocks in (1, 2):
        call = plan(blocks)
        clean = from_dev(call())
        outs = []
        for _ in range(3):
            _poison_shared_memory()
            outs.append(from_dev(call()))
        assert np.isfinite(clean).all()
        for out in outs:
            np.testing.assert_array_equal(out, clean)


# ------------------------------------------------------------ fused terms
def _tables(rng, rows_h, rows_w, D, dtype):
    return [to_dev(0.5 * rng.standard_normal((n, D)), dtype) for n in (rows_h, rows_w)]

PERSIST_CASES = [  # relattn_ws kernel_options (None: default), B, H, q grid, k grid, head_dim, fused terms
    (None, 2, 3, (9, 64), (5, 64), 64, False),                # partial row and key tiles
    (cfg(2, 64, 2, 0, 0), 2, 3, (9, 64), (7, 64), 64, False),  # 2 stages, 7 key tiles: ring positions cross tiles
    (cfg(2, 128, 3, 1, 240), 1, 3, (16, 64), (5, 64), 80, False),
    (cfg(3, 64, 4, 1, 160), 1, 2, (9, 64), (9, 64), 64, None),  # no terms
    (None, 1, 2, (16, 64), (16, 64), 64, True),               # fused: tables loaded once per block
    (None, 2, 2, (9, 64), (5, 64), 72, True),                 # head_dim 72 read as 80 (two table passes)
    (None, 3, 2, (14, 14), (14, 14), 64, True),               # SAM's windows, fused (FUSED_WINDOW)
    (cfg(2, 64, 4, 1, 240, 1), 3, 2, (14, 14), (14, 14), 80, True),
]


@pytest.mark.parametrize("blocks", [2, 3])
@pytest.mark.parametrize("case", PERSIST_CASES,
                         ids=lambda c: f"{options_id(c[0] or {})}-B{c[1]}H{c[2]}-q{c[3][0]}-k{c[4][0]}-d{c[5]}-{c[6]}")
def test_ws_persistent_blocks(case, blocks, sm90):
    """Blocks that loop over several row tiles (the K/V ring, Q's mbarriers,
    the round robin and the fused tables carried from tile to tile; the
    kernel_options persist cap forces it on small problems) give the bits of
    one block per tile (persist=0), and the float64 result."""
    options, B, H, qg, kg, D, fused = case
    options = options or {}
    dtype = "bfloat16"
    rng = np.random.default_rng(zlib.crc32(repr((options_id(options),) + case[1:]).encode()))
    (q, qr), (k, kr), (v, vr) = (to_dev(rng.standard_normal((B, H, g[0] * g[1], D)), dtype) for g in (qg, kg, kg))
    scale = D ** -0.5
    if fused:
        (th, _), (tw, _) = _tables(rng, 2 * max(qg[0], kg[0]) - 1, 2 * max(qg[1], kg[1]) - 1, D, dtype)
        assert fused_plan(q, k, v, th, tw, qg, kg, **options).fused

        def call(persist):
            p = relattn.plan(q, k, v, th, tw, qg, kg, kernel="ws",
                             kernel_options=dict(options, persist=persist, fused=True))
            assert p.kernel.startswith("relattn_ws (") and p.kernel.endswith("terms: fused")
            return p(q, k, v, th, tw)
        rh, rw = relattn.decomposed_rel_pos(qr, from_dev(th), from_dev(tw), qg, kg)
    else:
        if fused is None:
            dev = (q, k, v, None, None)
            rh = rw = None
        else:
            (rhd, rh), (rwd, rw) = (to_dev(rng.standard_normal((B, H, q.shape[2], n)), "float32") for n in kg)
            dev = (q, k, v, rhd, rwd)

        def call(persist):
            p = core_plan(dev, kg, scale, "ws", **options, persist=persist)
            assert p.config.persist == persist
            return p.run(*dev)
    outs = {p: from_dev(call(p)) for p in (0, blocks)}
    np.testing.assert_array_equal(outs[blocks], outs[0])
    assert rel_l2(outs[blocks], reference(qr, kr, vr, rh, rw, kg, scale)) <= TOL[dtype]



FUSED_CASES = [  # B, H, q grid, k grid, head_dim, table rows (None: 2 * max - 1)
    (1, 2, (64, 64), (64, 64), 64, None),   # SAM-B global
    (2, 3, (16, 64), (16, 64), 64, None),
    (1, 2, (9, 64), (5, 64), 64, None),     # q/k grids of different sizes
    (1, 2, (5, 64), (9, 64), 64, None),
    (1, 2, (12, 64), (12, 64), 64, 40),     # tables resized (SAM's rule) first
    (1, 2, (6, 64), (6, 64), 56, None),     # head_dim 56
    (1, 1, (1, 64), (1, 64), 64, None),
    (1, 2, (64, 64), (64, 64), 80, None),   # SAM-H global
    (1, 2, (9, 64), (5, 64), 72, None),
    (1, 2, (12, 64), (12, 64), 80, 40),
    (3, 2, (14, 14), (14, 14), 64, None),   # SAM's windows: 16-slot key rows (FUSED_WINDOW)
    (2, 2, (14, 14), (14, 14), 80, None),
    (1, 2, (14, 14), (5, 16), 64, None),
    (2, 2, (10, 10), (10, 10), 72, 15),     # tables resized from 15 to 19 rows
]


# head_dim 72 / 80 on global grids: FUSED_H72 by default, FUSED forced by kernel_options bias
FUSED_RUNS = [(c, "h72") for c in FUSED_CASES] + [(c, "two_passes") for c in FUSED_CASES
                                                 if c[4] > 64 and c[3][1] == 64]


@pytest.mark.parametrize("case,rel_h", FUSED_RUNS,
                         ids=lambda c: f"B{c[0]}-q{c[2][0]}x{c[2][1]}-k{c[3][0]}-d{c[4]}-r{c[5]}" if isinstance(c, tuple)
                         else c)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fused_terms(case, rel_h, dtype, sm90):
    """rel_pos_attention with 16-bit tables of q's dtype runs the fused plan:
    the first call and the planned ones give the same bits, within float64
    accuracy (the reference takes the same resized 16-bit tables), and close
    to the unfused kernel (kernel_options fused=False). Head dims 72 / 80 on
    global grids run FUSED_H72 (rel_h in one pass of 72 table rows) and, with
    kernel_options bias=FUSED, two passes."""
    from relattn.relpos import resize_rel_pos

    B, H, qg, kg, D, rows = case
    rng = np.random.default_rng(zlib.crc32(repr((case, dtype)).encode()))
    (q, qr), (k, kr), (v, vr) = (to_dev(rng.standard_normal((B, H, g[0] * g[1], D)), dtype)
                                 for g in (qg, kg, kg))
    Lh, Lw = 2 * max(qg[0], kg[0]) - 1, 2 * max(qg[1], kg[1]) - 1
    (th, _), (tw, _) = _tables(rng, rows or Lh, rows or Lw, D, dtype)
    functional._plans.clear()
    if rel_h == "h72":
        plan = fused_plan(q, k, v, th, tw, qg, kg)
        call = lambda: relattn.rel_pos_attention(q, k, v, th, tw, qg, kg)  # noqa: E731
    else:
        plan = fused_plan(q, k, v, th, tw, qg, kg, bias=ws.Bias.FUSED)
        forced = relattn.plan(q, k, v, th, tw, qg, kg, kernel="ws", kernel_options={"bias": ws.Bias.FUSED})
        call = lambda: forced(q, k, v, th, tw)  # noqa: E731
    assert plan.family == "ws" and plan.fused and plan.terms == "fused"
    if D > 64 and kg[1] == 64:
        assert plan.config.bias == (ws.Bias.FUSED_H72 if rel_h == "h72" else ws.Bias.FUSED)
    first = call()
    for _ in range(2):
        np.testing.assert_array_equal(from_dev(call()), from_dev(first))
    rth = from_dev(resize_rel_pos(th, Lh) if rows else th)
    rtw = from_dev(resize_rel_pos(tw, Lw) if rows else tw)
    rh, rw = relattn.decomposed_rel_pos(qr, rth, rtw, qg, kg)
    ref = reference(qr, kr, vr, rh, rw, kg, D ** -0.5)
    assert rel_l2(from_dev(first), ref) <= TOL[dtype]
    unfused = relattn.plan(q, k, v, th, tw, qg, kg, kernel="ws", kernel_options={"fused": False})
    assert unfused.kernel.endswith("terms: kernel")
    assert rel_l2(from_dev(unfused(q, k, v, th, tw)), from_dev(first)) <= TOL[dtype]


@pytest.mark.parametrize("why", ["float32_tables", "k_w_32", "k_h_65", "head_dim_96", "float32_q"])
def test_fused_terms_not_taken(why, sm90):
    """Problems the fused plan does not serve run the separate terms kernel."""
    qg = kg = (8, 64)
    D, dtype, tdtype = 64, "bfloat16", "bfloat16"
    if why == "float32_tables":
        tdtype = "float32"
    elif why == "k_w_32":
        qg = kg = (8, 32)
    elif why == "k_h_65":
        qg = kg = (65, 64)
    elif why == "head_dim_96":
        D = 96
    else:
        dtype = tdtype = "float32"
    rng = np.random.default_rng(zlib.crc32(why.encode()))
    S = qg[0] * qg[1]
    (q, qr), (k, kr), (v, vr) = (to_dev(rng.standard_normal((1, 2, S, D)), dtype) for _ in range(3))
    (th, thr), (tw, twr) = _tables(rng, 2 * qg[0] - 1, 2 * qg[1] - 1, D, tdtype)
    plan = gpu.make_plan(q, k, v, th, tw, qg, kg, D ** -0.5)
    assert not plan.fused and plan.terms == "kernel"
    assert "terms: kernel" in relattn.explain(q, k, v, th, tw, qg, kg)
    out = relattn.rel_pos_attention(q, k, v, th, tw, qg, kg)
    rh, rw = relattn.decomposed_rel_pos(qr, thr, twr, qg, kg)
    assert rel_l2(from_dev(out), reference(qr, kr, vr, rh, rw, kg, D ** -0.5)) <= TOL[dtype]


@pytest.mark.parametrize("interop", ["cupy", "torch"])
def test_fused_call_runs_no_terms_kernel(interop, sm90, monkeypatch):
    """A call the fused kernel serves computes no separate terms, also on its
    first (unplanned) call and when its arguments cannot be planned (DLPack
    tensors): same bits as the planned CuPy call."""
    rng = np.random.default_rng(47)
    qg = (8, 64)
    (q, _), (k, _), (v, _) = (to_dev(rng.standard_normal((1, 2, 512, 64)), "bfloat16") for _ in range(3))
    (th, _), (tw, _) = _tables(rng, 15, 127, 64, "bfloat16")
    functional._plans.clear()
    want = relattn.rel_pos_attention(q, k, v, th, tw, qg)
    want = relattn.rel_pos_attention(q, k, v, th, tw, qg)   # the planned call

    def no_terms(*args, **kwargs):
        raise AssertionError("the separate terms kernel ran")

    for name in ("plan", "terms_plan", "rel_terms"):
        monkeypatch.setattr(terms, name, no_terms)
    functional._plans.clear()
    args = (q, k, v, th, tw)
    if interop == "torch":
        torch = pytest.importorskip("torch")
        args = tuple(torch.from_dlpack(a.view(cupy.uint16)).view(torch.bfloat16) for a in args)
    for _ in range(2):
        got = relattn.rel_pos_attention(*args, qg)
        if interop == "torch":
            assert type(got).__module__.startswith("torch")
            got = cupy.from_dlpack(got.view(torch.uint16)).view(q.dtype)
        np.testing.assert_array_equal(from_dev(got), from_dev(want))


def test_fused_plan_follows_new_arrays(sm90):
    """A plan built for one set of arrays serves others of the same signature:
    the tensor maps are rebuilt from each call's addresses."""
    rng = np.random.default_rng(41)
    qg = (8, 64)
    S = qg[0] * qg[1]
    (th, thr), (tw, twr) = _tables(rng, 15, 127, 64, "bfloat16")
    functional._plans.clear()
    for _ in range(3):
        (q, qr), (k, kr), (v, vr) = (to_dev(rng.standard_normal((2, 2, S, 64)), "bfloat16") for _ in range(3))
        out = relattn.rel_pos_attention(q, k, v, th, tw, qg)
        rh, rw = relattn.decomposed_rel_pos(qr, thr, twr, qg, qg)
        assert rel_l2(from_dev(out), reference(qr, kr, vr, rh, rw, qg, 0.125)) <= TOL["bfloat16"]
    assert len(functional._plans) == 1


def test_fused_call_captured_in_a_cuda_graph(sm90):
    """The fused planned call (tensor maps passed by value) replays from a CUDA graph."""
    rng = np.random.default_rng(43)
    qg = (16, 64)
    (q, _), (k, _), (v, _) = (to_dev(rng.standard_normal((1, 2, 1024, 64)), "bfloat16") for _ in range(3))
    (th, _), (tw, _) = _tables(rng, 31, 127, 64, "bfloat16")
    first = relattn.rel_pos_attention(q, k, v, th, tw, qg)
    out = replayed_from_graph(lambda: relattn.rel_pos_attention(q, k, v, th, tw, qg))
    np.testing.assert_array_equal(from_dev(out), from_dev(first))


def test_layer_on_the_fused_kernel(sm90, monkeypatch):
    """A bf16 layer of SAM's shape class (head_dim 64, 64-wide grid) runs the
    fused plan and matches the float64 layer."""
    built = []   # the relattn_ws configurations planned
    build = ws.build

    def recording_build(p, device, c, *arrays):
        run, why = build(p, device, c, *arrays)
        if run is not None:
            built.append(c)
        return run, why

    monkeypatch.setattr(ws, "build", recording_build)
    layer = relattn.Attention(128, 2, use_rel_pos=True, rel_pos_zero_init=False, input_size=(16, 64),
                              dtype="bfloat16", rng=0)
    layer.rel_pos_h = layer.rel_pos_h * 20  # make the bias matter
    layer.rel_pos_w = layer.rel_pos_w * 20
    x = np.random.default_rng(1).standard_normal((2, 16, 64, 128)).astype(np.float32)
    xd, xr = to_dev(x, "bfloat16")
    functional._plans.clear()
    out = from_dev(layer(xd))
    assert any(c.bias == ws.Bias.FUSED for c in built), built
    ref = relattn.Attention(128, 2, use_rel_pos=True, input_size=(16, 64), dtype="float64", backend="numpy")
    ref.load_state_dict({name: np.asarray(from_dev(a) if hasattr(a, "get") else a, dtype=np.float64)
                         for name, a in layer.state_dict().items()})
    assert rel_l2(out, ref(xr)) <= 8e-3
