"""GPU tests of the CuPy backend (skipped where CuPy or a CUDA device is missing).

Every case is compared with a float64 numpy evaluation written here: the full
logits ``scale * q @ k^T + (rel_h[..., :, None] + rel_w[..., None, :])``,
a stable softmax, then ``@ v``.
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

try:
    _NDEV = cupy.cuda.runtime.getDeviceCount()
except Exception:  # no driver / no device
    _NDEV = 0
if _NDEV < 1:
    pytest.skip("no usable CUDA device", allow_module_level=True)

pytestmark = pytest.mark.gpu


from relattn.backends import gpu  # noqa: E402
from relattn.backends.gpu import NoKernel, _device  # noqa: E402
from relattn.backends.gpu.families import wg  # noqa: E402
from relattn.backends.gpu.problem import Problem  # noqa: E402


def _ml_dtypes():
    return pytest.importorskip("ml_dtypes")


def _bf16_dtype():
    try:
        return cupy.dtype("bfloat16")
    except Exception:
        return np.dtype(_ml_dtypes().bfloat16)


# ------------------------------------------------------------------ helpers
def to_dev(x, dtype):
    """float numpy array -> cupy array of dtype name; returns (device, rounded f64 copy)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "bfloat16":
        ml = _ml_dtypes()
        xb = x.astype(ml.bfloat16)
        dev = cupy.asarray(xb.view(np.uint16)).view(_bf16_dtype())
        return dev, xb.astype(np.float64)
    xd = x.astype(dtype)
    return cupy.asarray(xd), xd.astype(np.float64)


def from_dev(a):
    if a.dtype.name == "bfloat16":
        ml = _ml_dtypes()
        return a.view(cupy.uint16).get().view(ml.bfloat16).astype(np.float64)
    return a.get().astype(np.float64)


def replayed_from_graph(call):
    """Run ``call`` once on a side stream, capture a second call as a CUDA
    graph, clear that call's output and replay the graph: the output as the
    replay wrote it."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        call()
        stream.synchronize()
        stream.begin_capture()
        try:
            out = call()
        finally:
            graph = stream.end_capture()
        out.view(cupy.uint8).fill(0)
        graph.launch(stream)
        stream.synchronize()
    return out


def reference(q, k, v, rh, rw, k_size, scale):
    """float64 numpy: materialized logits + stable softmax."""
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    logits = scale * np.einsum("bhid,bhjd->bhij", q, k)
    if rh is not None:
        kh, kw = k_size
        logits = logits + (rh[..., :, :, None] + rw[..., :, None, :]).reshape(B, H, Sq, Sk)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bhij,bhjd->bhid", p, v)


def rel_l2(a, b):
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-300))


TOL = {"float32": 1e-5, "float64": 1e-10, "float16": 4e-3, "bfloat16": 4e-3}


def make_case(rng, B, H, qgrid, kgrid, D, dtype, with_rel=True, qmag=1.0, relmag=1.0):
    Sq = qgrid[0] * qgrid[1]
    Sk = kgrid[0] * kgrid[1]
    q, qr = to_dev(qmag * rng.standard_normal((B, H, Sq, D)), dtype)
    k, kr = to_dev(rng.standard_normal((B, H, Sk, D)), dtype)
    v, vr = to_dev(rng.standard_normal((B, H, Sk, D)), dtype)
    rh = rw = rhr = rwr = None
    if with_rel:
        cdt = "float64" if dtype == "float64" else "float32"
        rh, rhr = to_dev(relmag * rng.standard_normal((B, H, Sq, kgrid[0])), cdt)
        rw, rwr = to_dev(relmag * rng.standard_normal((B, H, Sq, kgrid[1])), cdt)
    return (q, k, v, rh, rw), (qr, kr, vr, rhr, rwr)


def core_plan(dev, k_size, scale, kernel=None, **options):
    """The GPU backend's plan of the attention core (terms given, or None) for
    the arrays ``dev`` = (q, k, v, rel_h, rel_w): the planner's choice, or
    family ``kernel`` forced with ``options`` as its kernel_options. Raises
    NoKernel where the forced family cannot serve the problem."""
    q, k, v, rh, rw = dev
    return gpu.make_plan(q, k, v, rh, rw, None, k_size, scale, kernel, options or None, terms_given=True)


def problem(D, Sq, Sk, kh, kw, terms=True, dtype="bfloat16"):
    """A planner problem (no arrays) with the terms given or absent."""
    return Problem(dtype, 1, 1, Sq, Sk, D, None, (kh, kw), terms, None, D ** -0.5)


def hopper():
    """Skip unless the sm_90a kernels can run on the current device."""
    why = _device.current().hopper_reason
    if why is not None:
        pytest.skip(f"sm_90a kernels unavailable: {why}")
    return _device.current()


def run_and_check(dev, host, k_size, scale, dtype, tol=None, kernel=None, **options):
    """Run the core (the planner's choice, or family ``kernel`` forced with
    ``options``) and compare with float64."""
    q, k, v, rh, rw = dev
    if kernel is None and not options:
        out = gpu.attention(q, k, v, rh, rw, k_size, scale)
    else:
        out = core_plan(dev, k_size, scale, kernel, **options).run(q, k, v, rh, rw)
    cupy.cuda.get_current_stream().synchronize()
    assert out.shape == q.shape
    assert out.dtype == q.dtype
    assert out.flags.c_contiguous
    got = from_dev(out)
    assert np.isfinite(got).all()
    ref = reference(*host, k_size, scale)
    err = rel_l2(got, ref)
    assert err <= (tol if tol is not None else TOL[dtype]), f"relative L2 error {err:.3e}"
    return err


# -------------------------------------------------------------------- tests
def test_interface():
    assert gpu.NAME == "cupy"
    assert gpu.ARRAY_MODULE == "cupy"
    assert gpu.unavailable_reason() is None


SHAPES = [
    # (B, H, q grid, k grid, head_dim)
    (1, 2, (64, 64), (64, 64), 64),    # S = 4096, rel_w fast path
    (2, 3, (14, 14), (14, 14), 64),    # S = 196, windowed
    (1, 1, (80, 80), (80, 80), 64),    # S = 6400
    (1, 2, (1, 1), (1, 1), 64),        # S = 1
    (2, 2, (1, 7), (1, 7), 32),        # S = 7
    (1, 2, (32, 32), (32, 32), 80),    # SAM-H head_dim
    (1, 2, (14, 14), (14, 14), 128),
    (1, 2, (14, 14), (14, 14), 72),    # padded to 80
    (2, 1, (9, 11), (9, 11), 17),      # odd head_dim
    (2, 2, (8, 8), (4, 4), 64),        # Sq != Sk (pooled keys)
    (1, 2, (3, 50), (5, 30), 48),      # Sq != Sk, non-square
]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}q{s[2][0]}x{s[2][1]}k{s[3][0]}x{s[3][1]}d{s[4]}")
def test_matches_float64_reference(shape, dtype):
    B, H, qg, kg, D = shape
    rng = np.random.default_rng(zlib.crc32(repr((shape, dtype)).encode()))
    dev, host = make_case(rng, B, H, qg, kg, D, dtype)
    run_and_check(dev, host, kg, D ** -0.5, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("grid", [(14, 14), (64, 64)])
def test_no_rel_terms(grid, dtype):
    rng = np.random.default_rng(7)
    dev, host = make_case(rng, 2, 2, grid, grid, 64, dtype, with_rel=False)
    run_and_check(dev, host, grid, 0.125, dtype)


@pytest.mark.parametrize("shape", [(2, 2, (14, 14), (14, 14), 64), (1, 1, (8, 8), (4, 4), 80)])
def test_float64(shape):
    B, H, qg, kg, D = shape
    rng = np.random.default_rng(11)
    dev, host = make_case(rng, B, H, qg, kg, D, "float64")
    run_and_check(dev, host, kg, D ** -0.5, "float64")


def test_bf16_logits_near_fp16_overflow():
    """scale * q.k ~ 6e4: fine in float32 accumulation, would overflow float16."""
    rng = np.random.default_rng(3)
    B, H, g, D = 1, 2, (16, 16), 64
    S = g[0] * g[1]
    scale = D ** -0.5
    base = np.sqrt(6e4 / scale / D)
    q, qr = to_dev(base + rng.standard_normal((B, H, S, D)), "bfloat16")
    k, kr = to_dev(base + rng.standard_normal((B, H, S, D)), "bfloat16")
    v, vr = to_dev(rng.standard_normal((B, H, S, D)), "bfloat16")
    rh, rhr = to_dev(100 * rng.standard_normal((B, H, S, g[0])), "float32")
    rw, rwr = to_dev(100 * rng.standard_normal((B, H, S, g[1])), "float32")
    assert float(np.max(scale * np.einsum("bhid,bhjd->bhij", qr, kr))) > 5e4
    run_and_check((q, k, v, rh, rw), (qr, kr, vr, rhr, rwr), g, scale, "bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_noncontiguous_views_and_inputs_unmodified(dtype):
    """q, k, v as the (B, heads, S, hd) views SAM's qkv permute produces."""
    rng = np.random.default_rng(5)
    B, H, g, D = 2, 3, (14, 14), 64
    S = g[0] * g[1]
    qkv, qkvr = to_dev(rng.standard_normal((B, S, 3, H, D)), dtype)
    view = qkv.transpose(2, 0, 3, 1, 4)
    q, k, v = view[0], view[1], view[2]
    hv = qkvr.transpose(2, 0, 3, 1, 4)
    assert not q.flags.c_contiguous
    rh, rhr = to_dev(rng.standard_normal((B, H, S, g[0])), "float32")
    rw, rwr = to_dev(rng.standard_normal((B, H, S, g[1])), "float32")
    before = [a.view(cupy.uint8).copy() for a in (qkv, rh, rw)]
    run_and_check((q, k, v, rh, rw), (hv[0], hv[1], hv[2], rhr, rwr), g, D ** -0.5, dtype)
    for a, b in zip((qkv, rh, rw), before):
        assert bool((a.view(cupy.uint8) == b).all())


def test_every_output_written():
    """Poison the memory pool with NaN first: any unwritten element shows up."""
    rng = np.random.default_rng(9)
    for shape in [(3, 2, (14, 14), (14, 14), 64), (1, 2, (9, 11), (9, 11), 17)]:
        B, H, qg, kg, D = shape
        for dtype in ("bfloat16", "float32"):
            dev, host = make_case(rng, B, H, qg, kg, D, dtype)
            nbytes = B * H * qg[0] * qg[1] * 128 * 4
            junk = cupy.full(nbytes // 4, np.nan, dtype=cupy.float32)
            del junk
            run_and_check(dev, host, kg, D ** -0.5, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_non_default_stream(dtype):
    rng = np.random.default_rng(13)
    g = (32, 32)
    dev, host = make_case(rng, 2, 2, g, g, 64, dtype)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        out = gpu.attention(*dev, g, 0.125)
        stream.synchronize()
        got = from_dev(out)
    ref = reference(*host, g, 0.125)
    assert rel_l2(got, ref) <= TOL[dtype]


def test_batch_zero():
    q = cupy.zeros((0, 2, 16, 64), dtype=cupy.float32)
    rh = cupy.zeros((0, 2, 16, 4), dtype=cupy.float32)
    out = gpu.attention(q, q, q, rh, rh, (4, 4), 0.125)
    assert out.shape == (0, 2, 16, 64)


def test_not_supported_reasons():
    q = cupy.zeros((1, 1, 4, 64), dtype=cupy.float32)
    assert gpu.not_supported_reasons(q, q, q, None, None, (2, 2)) == []
    big = cupy.zeros((1, 1, 4, 256), dtype=cupy.float32)
    assert gpu.not_supported_reasons(big, big, big, None, None, (2, 2))
    qi = cupy.zeros((1, 1, 4, 64), dtype=cupy.int32)
    assert gpu.not_supported_reasons(qi, qi, qi, None, None, (2, 2))
    qn = np.zeros((1, 1, 4, 64), dtype=np.float32)
    assert gpu.not_supported_reasons(qn, qn, qn, None, None, (2, 2))


@pytest.mark.parametrize("mw", [1, 2])
@pytest.mark.parametrize("shape", [(1, 2, (16, 64), (16, 64), 64), (2, 3, (14, 14), (14, 14), 64),
                                   (1, 2, (8, 64), (8, 64), 80), (1, 1, (5, 9), (5, 9), 128)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rows_per_warp_variants(shape, dtype, mw):
    """The portable mma.sync kernel (forced: kernel="mma") with one or two
    16-row tiles per warp."""
    B, H, qg, kg, D = shape
    rng = np.random.default_rng(zlib.crc32(repr((shape, dtype, str(mw))).encode()))
    dev, host = make_case(rng, B, H, qg, kg, D, dtype)
    plan = core_plan(dev, kg, D ** -0.5, "mma", mw=mw)
    assert plan.family == "mma" and plan.config.mw == mw
    run_and_check(dev, host, kg, D ** -0.5, dtype, kernel="mma", mw=mw)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
@pytest.mark.parametrize("grids", [((64, 64), (64, 64)), ((14, 14), (14, 14)), ((8, 12), (4, 6)), ((1, 7), (1, 7))])
def test_rel_terms_helper(grids, dtype):
    (qh, qw), (kh, kw) = grids
    rng = np.random.default_rng(21)
    B, H, D = 2, 3, 80
    q, qr = to_dev(rng.standard_normal((B, H, qh * qw, D)), dtype)
    tdt = "float64" if dtype == "float64" else "float32"
    Rh, Rhr = to_dev(rng.standard_normal((qh, kh, D)), tdt)
    Rw, Rwr = to_dev(rng.standard_normal((qw, kw, D)), tdt)
    rel_h, rel_w = gpu.rel_terms(q, Rh, Rw)
    r = qr.reshape(B, H, qh, qw, D)
    ref_h = np.einsum("bhyxc,ykc->bhyxk", r, Rhr).reshape(B, H, qh * qw, kh)
    ref_w = np.einsum("bhyxc,xkc->bhyxk", r, Rwr).reshape(B, H, qh * qw, kw)
    tol = 1e-12 if dtype == "float64" else 1e-5
    assert rel_l2(rel_h.get().astype(np.float64), ref_h) <= tol
    assert rel_l2(rel_w.get().astype(np.float64), ref_w) <= tol


# ------------------------------------------------------ Hopper (sm_90a) kernel
WG_CFGS = [dict(nwg=1, bn=64), dict(nwg=1, bn=128), dict(nwg=2, bn=64), dict(nwg=2, bn=128),
           dict(nwg=1, bn=64, stages=3), dict(nwg=2, bn=64, stages=3), dict(nwg=3, bn=64)]


def options_id(options):
    return "-".join(f"{name}{value}" for name, value in options.items()) or "default"


@pytest.mark.parametrize("cfg", WG_CFGS, ids=options_id)
@pytest.mark.parametrize("shape", [(1, 2, (16, 64), (16, 64), 64), (2, 3, (14, 14), (14, 14), 64),
                                   (1, 2, (9, 64), (5, 64), 64), (1, 2, (15, 20), (10, 30), 64),
                                   (1, 2, (8, 64), (8, 64), 80), (1, 1, (5, 9), (5, 9), 128),
                                   (2, 2, (7, 7), (7, 7), 40), (1, 1, (1, 1), (1, 3), 64)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sm90_kernel_configs(shape, dtype, cfg):
    """Every warpgroup / key-tile configuration of the wgmma kernel, forced
    (kernel="wg"; head_dim 80 uses split tiles, other head dims than 64 the
    unswizzled layout), against float64."""
    hopper()
    B, H, qg, kg, D = shape
    rng = np.random.default_rng(zlib.crc32(repr((shape, dtype, options_id(cfg))).encode()))
    dev, host = make_case(rng, B, H, qg, kg, D, dtype)
    cupy.cuda.get_current_stream().synchronize()
    plan = core_plan(dev, kg, D ** -0.5, "wg", **cfg)
    assert plan.family == "wg"
    assert (plan.config.nwg, plan.config.bn, plan.config.stages) == (cfg["nwg"], cfg["bn"], cfg.get("stages", 2))
    run_and_check(dev, host, kg, D ** -0.5, dtype, kernel="wg", **cfg)
    q, k, v, _, _ = dev
    plain = core_plan((q, k, v, None, None), kg, D ** -0.5, "wg", **cfg)   # no bias
    assert plain.config.bias == wg.Bias.NONE
    ref = reference(*host[:3], None, None, kg, D ** -0.5)
    assert rel_l2(from_dev(plain.run(q, k, v, None, None)), ref) <= TOL[dtype]


@pytest.mark.parametrize("shape", [(1, 2, (6, 80), (6, 80), 64), (2, 1, (5, 48), (3, 48), 64),
                                   (1, 2, (3, 128), (4, 128), 64), (1, 1, (7, 80), (9, 80), 64),
                                   (1, 3, (2, 96), (2, 96), 64), (1, 1, (1, 112), (2, 112), 64)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sm90_whole_key_row_tiles(shape, dtype):
    """k_w in 48..128 (multiple of 16): key tiles of one whole key row
    (WHOLE_ROW), chosen automatically; q/k grids of different sizes, partial
    query tiles. (k_w = 80 runs on relattn_ws by default: relattn_wg is
    forced here so that this kernel is the one tested.)"""
    hopper()
    B, H, qg, kg, D = shape
    rng = np.random.default_rng(zlib.crc32(repr((shape, dtype)).encode()))
    dev, host = make_case(rng, B, H, qg, kg, D, dtype)
    assert core_plan(dev, kg, D ** -0.5, "wg").config == wg.Config(1, kg[1], wg.Bias.WHOLE_ROW, 2)
    if kg[1] != 80:
        assert core_plan(dev, kg, D ** -0.5).family == "wg"
    run_and_check(dev, host, kg, D ** -0.5, dtype, kernel="wg")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sm90_head_dim_80_key_rows_of_48(dtype):
    """k_w 48 at head_dim 80 with relattn_wg forced: a whole-row tile of 48
    keys (7,680 bytes) would put the next tile off the 1024 bytes the
    128-byte swizzle needs, so the family runs 64-key GENERIC tiles; a
    forced bn of 48 is refused, naming the alignment."""
    hopper()
    B, H, qg, kg, D = 1, 2, (4, 20), (5, 48), 80
    rng = np.random.default_rng(zlib.crc32(repr((qg, kg, dtype, "48")).encode()))
    dev, host = make_case(rng, B, H, qg, kg, D, dtype)
    assert core_plan(dev, kg, D ** -0.5, "wg").config == wg.Config(1, 64, wg.Bias.GENERIC, 2)
    run_and_check(dev, host, kg, D ** -0.5, dtype, kernel="wg")
    with pytest.raises(NoKernel, match="1024-byte alignment"):
        core_plan(dev, kg, D ** -0.5, "wg", bn=48)


@pytest.mark.parametrize("shape", [(1, 2, (64, 64), (64, 64), 80), (2, 1, (9, 64), (5, 64), 72),
                                   (1, 3, (3, 64), (4, 64), 80), (1, 1, (1, 64), (1, 64), 80),
                                   (1, 2, (5, 64), (7, 64), 66)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sm90_head_dim_80_split_tiles(shape, dtype):
    """head_dim 65..80 on the wgmma kernel (64 swizzled columns + 16
    unswizzled ones per tile row), its configuration for k_w == 64 when
    relattn_wg is forced (kernel="wg"; relattn_ws comes first by default);
    with and without the rel terms, q/k grids of different sizes, partial tiles."""
    hopper()
    B, H, qg, kg, D = shape
    rng = np.random.default_rng(zlib.crc32(repr((shape, dtype, "split")).encode()))
    dev, host = make_case(rng, B, H, qg, kg, D, dtype)
    assert core_plan(dev, kg, D ** -0.5, "wg").config == wg.Config(2, 64, wg.Bias.KEY_ROWS, 2)
    run_and_check(dev, host, kg, D ** -0.5, dtype, kernel="wg")
    q, k, v, _, _ = dev
    plain = core_plan((q, k, v, None, None), kg, D ** -0.5, "wg")
    assert plain.config == wg.Config(2, 64, wg.Bias.NONE, 2)
    out = plain.run(q, k, v, None, None)
    assert rel_l2(from_dev(out), reference(*host[:3], None, None, kg, D ** -0.5)) <= TOL[dtype]


def test_sm90_is_chosen_for_head_dim_64():
    from relattn.backends.gpu import _build
    from relattn.backends.gpu.families import ws

    device = hopper()
    assert wg.config(problem(64, 4096, 4096, 64, 64), device, False, {}).bias == wg.Bias.KEY_ROWS
    assert wg.config(problem(64, 4096, 4096, 1, 4096, False), device, False, {}).bias == wg.Bias.NONE
    assert wg.config(problem(80, 4096, 4096, 64, 64), device, False, {}) == wg.Config(2, 64, wg.Bias.KEY_ROWS, 2)
    assert wg.tuned_reasons(problem(80, 196, 196, 14, 14))   # SAM-H windows: left to another family
    assert wg.smem_bytes(64, wg.Config(1, 64, wg.Bias.KEY_ROWS), 64, 64) <= _build.MAX_SMEM_SM90
    # the warp-specialised kernel takes these first
    rng = np.random.default_rng(19)
    for D, cfg in ((64, ws.Config(3, 64, ws.Bias.KEY_ROWS, 4, 1, 160, 1)),
                   (80, ws.Config(2, 128, ws.Bias.KEY_ROWS, 3, 1, 240, 1))):
        dev, _ = make_case(rng, 1, 1, (64, 64), (64, 64), D, "bfloat16")
        plan = core_plan(dev, (64, 64), D ** -0.5)
        assert (plan.family, plan.config) == ("ws", cfg)


@pytest.mark.parametrize("tdtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("grids", [((64, 64), (64, 64)), ((14, 14), (14, 14)), ((8, 12), (4, 6)),
                                   ((6, 6), (6, 6), 15), ((1, 7), (1, 7)),
                                   # the float32 kernel's tiles: 32 columns; 16 columns over 2 row tiles
                                   ((20, 24), (18, 30)), ((9, 40), (9, 12))])
def test_rel_terms_from_tables(grids, dtype, tdtype):
    """The kernel's own table gather (and the resize when the table length
    differs from 2*max-1) equals rel_terms on get_rel_pos's tables."""
    from relattn.relpos import get_rel_pos

    (qh, qw), (kh, kw) = grids[:2]
    length = grids[2] if len(grids) > 2 else None
    rng = np.random.default_rng(5)
    B, H, D = 2, 3, 64
    q, _ = to_dev(rng.standard_normal((B, H, qh * qw, D)), dtype)
    lh = length or 2 * max(qh, kh) - 1
    lw = length or 2 * max(qw, kw) - 1
    th, _ = to_dev(rng.standard_normal((lh, D)), tdtype)
    tw, _ = to_dev(rng.standard_normal((lw, D)), tdtype)
    rel_h, rel_w = gpu.rel_terms_from_tables(q, th, tw, (qh, qw), (kh, kw))
    ref_h, ref_w = gpu.rel_terms(q, get_rel_pos(qh, kh, th), get_rel_pos(qw, kw, tw))
    assert rel_h.shape == (B, H, qh * qw, kh) and rel_w.shape == (B, H, qh * qw, kw)
    assert rel_l2(rel_h.get().astype(np.float64), ref_h.get().astype(np.float64)) <= 1e-6
    assert rel_l2(rel_w.get().astype(np.float64), ref_w.get().astype(np.float64)) <= 1e-6


def test_sm90_build_failure_falls_back(monkeypatch):
    """If NVRTC cannot build the sm_90a kernels, the call warns and the
    portable kernel computes the (correct) result; the reason is remembered
    for the device (no further Hopper kernel is tried on it)."""
    from relattn.backends.gpu import _build

    hopper()

    def broken(name):
        raise RuntimeError("simulated NVRTC failure")

    monkeypatch.setattr(_build, "_compile_sm90", broken)
    monkeypatch.setattr(_build, "_sm90_functions", {})
    monkeypatch.setattr(_device, "_devices", {})   # the device's state, restored afterwards
    rng = np.random.default_rng(3)
    dev, host = make_case(rng, 1, 2, (8, 64), (8, 64), 64, "bfloat16")
    with pytest.warns(RuntimeWarning, match="simulated NVRTC failure"):
        run_and_check(dev, host, (8, 64), 0.125, "bfloat16")
    assert "simulated NVRTC failure" in _device.current().hopper_reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, no second warning
        assert core_plan(dev, (8, 64), 0.125).family == "mma"
        run_and_check(dev, host, (8, 64), 0.125, "bfloat16")


@pytest.mark.parametrize("layout", ["contiguous", "strided", "odd_dim", "offset_table"])
@pytest.mark.parametrize("tdtype", ["bfloat16", "float32"])
def test_rel_terms_load_paths(layout, tdtype):
    """The rel-term kernel's 16-byte loader and its element-wise fallback
    (odd head dim, q rows not 16-byte aligned, a table view at an odd offset)
    against float64."""
    from relattn.relpos import get_rel_pos

    rng = np.random.default_rng(11)
    B, H, qh, qw = 2, 3, 6, 10
    D = 20 if layout == "odd_dim" else 64
    qfull, qr_full = to_dev(rng.standard_normal((B, H, qh * qw, D + 4)), "bfloat16")
    if layout == "strided":  # rows 68 elements apart: not 16-byte aligned
        q, qr = qfull[..., 2:D + 2], qr_full[..., 2:D + 2]
    else:
        q, qr = to_dev(rng.standard_normal((B, H, qh * qw, D)), "bfloat16")
    th_full, thr_full = to_dev(rng.standard_normal((2 * qh - 1 + 1, D)), tdtype)
    tw, twr = to_dev(rng.standard_normal((2 * qw - 1, D)), tdtype)
    if layout == "offset_table":  # a view one row in: 16-byte aligned only for D % 8 == 0 rows
        th_full, thr_full = to_dev(rng.standard_normal((2 * qh - 1) * D + 1), tdtype)
        th = th_full[1:].reshape(2 * qh - 1, D)
        thr = thr_full[1:].reshape(2 * qh - 1, D)
    else:
        th, thr = th_full[1:], thr_full[1:]
    rel_h, rel_w = gpu.rel_terms_from_tables(q, th, tw, (qh, qw), (qh, qw))
    r = qr.reshape(B, H, qh, qw, D)
    ref_h = np.einsum("bhyxc,ykc->bhyxk", r, get_rel_pos(qh, qh, thr)).reshape(B, H, qh * qw, qh)
    ref_w = np.einsum("bhyxc,xkc->bhyxk", r, get_rel_pos(qw, qw, twr)).reshape(B, H, qh * qw, qw)
    assert rel_l2(rel_h.get().astype(np.float64), ref_h) <= 1e-5
    assert rel_l2(rel_w.get().astype(np.float64), ref_w) <= 1e-5


# ------------------------------------------------ float32 on tensor cores
@pytest.mark.parametrize("mode, tol", [("fma", 1e-5), ("3xtf32", 1e-5), ("tf32", 5e-3)])
@pytest.mark.parametrize("shape", [(1, 2, (16, 64), (16, 64), 64), (2, 3, (14, 14), (14, 14), 64),
                                   (1, 2, (9, 64), (5, 64), 64), (1, 2, (15, 20), (10, 30), 64),
                                   (1, 2, (8, 64), (8, 64), 80), (1, 1, (5, 9), (5, 9), 128),
                                   (2, 2, (7, 7), (7, 7), 20), (1, 1, (1, 1), (1, 3), 64)])
def test_float32_tensor_core_modes(shape, mode, tol):
    import relattn

    B, H, qg, kg, D = shape
    rng = np.random.default_rng(zlib.crc32(repr((shape, mode)).encode()))
    dev, host = make_case(rng, B, H, qg, kg, D, "float32")
    with relattn.gpu_float32_mode(mode):
        run_and_check(dev, host, kg, D ** -0.5, "float32", tol=tol)
        q, k, v, _, _ = dev
        plain = gpu.attention(q, k, v, None, None, kg, D ** -0.5)
    ref = reference(*host[:3], None, None, kg, D ** -0.5)
    assert rel_l2(from_dev(plain), ref) <= tol
    assert relattn.get_gpu_float32_mode() == "3xtf32"


@pytest.mark.parametrize("nonfinite", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, (64, 64), (64, 64), 64), (1, 2, (16, 64), (16, 64), 80),
                                   (3, 2, (14, 14), (14, 14), 64), (1, 2, (9, 20), (5, 30), 48),
                                   (1, 1, (11, 13), (7, 9), 96), (2, 2, (7, 7), (7, 7), 20),
                                   (1, 1, (1, 1), (1, 3), 64)])
def test_3xtf32_shared_split_same_bits(shape, nonfinite):
    """relattn_tf32's SH variant (K / V split once per 8-warp block; forced by
    kernel_options sh=1) gives the bits of the per-warp split (sh=0): partial row
    and key tiles, rows past the end of the last 128-row block, q/k grids of
    different sizes, padded head dims, and an infinite key that sends blocks
    through the IEEE-safe second pass (whose flags are per 64 rows)."""
    B, H, qg, kg, D = shape
    rng = np.random.default_rng(zlib.crc32(repr(shape).encode()))
    (q, k, v, rh, rw), (qr, kr, vr, rhr, rwr) = make_case(rng, B, H, qg, kg, D, "float32")
    if nonfinite:   # +inf logits (NaN rows) for the rows with q[..., 1] > 0, at least row 0
        qr, kr = qr.copy(), kr.copy()
        qr[0, -1, 0, 1] = np.float32(abs(qr[0, -1, 0, 1]) + 0.5)
        kr[0, -1, min(3, kr.shape[2] - 1), 1] = np.inf
        q, k = cupy.asarray(qr.astype(np.float32)), cupy.asarray(kr.astype(np.float32))
    outs = {}
    for sh in (1, 0):   # relattn_tf32 forced (Hopper would run relattn_wgt)
        plan = core_plan((q, k, v, rh, rw), kg, D ** -0.5, "tf32", sh=sh)
        assert plan.family == "tf32" and plan.config.sh == sh and plan.config.split == 3
        outs[sh] = plan.run(q, k, v, rh, rw)
    assert bool((outs[1].view(cupy.uint32) == outs[0].view(cupy.uint32)).all())
    with np.errstate(invalid="ignore"):
        got, ref = from_dev(outs[1]), reference(qr, kr, vr, rhr, rwr, kg, D ** -0.5)
    assert (np.isnan(got) == np.isnan(ref)).all()
    if nonfinite:
        assert np.isnan(got).any()
    fin = np.isfinite(ref)
    assert rel_l2(got[fin], ref[fin]) <= 1e-5


def test_float32_tensor_core_strided_views_and_public_call():
    import relattn

    rng = np.random.default_rng(17)
    B, S, H, d = 1, 196, 3, 64
    qkv = cupy.asarray(rng.standard_normal((B, S, 3, H, d)).astype(np.float32))
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    th = cupy.asarray(rng.standard_normal((27, d)).astype(np.float32))
    tw = cupy.asarray(rng.standard_normal((27, d)).astype(np.float32))
    with relattn.gpu_float32_mode("fma"):
        exact = relattn.rel_pos_attention(q, k, v, th, tw, (14, 14))
    fast = relattn.rel_pos_attention(q, k, v, th, tw, (14, 14))   # the default: 3xTF32
    assert rel_l2(from_dev(fast), from_dev(exact)) <= 1e-5


@pytest.mark.parametrize("D", [64, 80])
def test_3xtf32_error_matches_fma_on_long_rows(D):
    """4096 keys per row: a single running tensor-core accumulator for O would
    collect the truncation bias of ~1500 products (measured 4e-5 before the
    two-level accumulation); 3xTF32 must stay at the FMA path's error."""
    import relattn

    rng = np.random.default_rng(D)
    q, k, v = (cupy.asarray(rng.standard_normal((1, 2, 4096, D)).astype(np.float32)) for _ in range(3))
    th = cupy.asarray((0.1 * rng.standard_normal((127, D))).astype(np.float32))
    tw = cupy.asarray((0.1 * rng.standard_normal((127, D))).astype(np.float32))
    ref = relattn.rel_pos_attention(*(x.astype(cupy.float64) for x in (q, k, v, th, tw)), (64, 64)).get()
    errs = {}
    for mode in ("fma", "3xtf32", "tf32"):
        with relattn.gpu_float32_mode(mode):
            out = relattn.rel_pos_attention(q, k, v, th, tw, (64, 64))
        errs[mode] = float(np.abs(out.get() - ref).max() / np.abs(ref).max())
    assert errs["fma"] <= 1e-5, errs
    assert errs["3xtf32"] <= 1.5 * errs["fma"] + 1e-7, errs
    assert 10 * errs["3xtf32"] <= errs["tf32"] <= 5e-3, errs


def test_resize_rel_pos_fused_kernel_bit_identical_to_numpy():
    """The CuPy resize (one fused kernel) reproduces the numpy float32 recipe
    bit for bit: random lengths and magnitudes, non-contiguous and half tables."""
    import relattn

    rng = np.random.default_rng(11)
    for _ in range(60):
        L, M, C = int(rng.integers(1, 260)), int(rng.integers(1, 320)), int(rng.integers(1, 9))
        host = (rng.standard_normal((L, C)) * 10.0 ** rng.uniform(-8, 8)).astype(np.float32)
        got = relattn.resize_rel_pos(cupy.asarray(host), M)
        assert got.dtype == cupy.float32 and got.shape == (M, C)
        np.testing.assert_array_equal(got.get(), relattn.resize_rel_pos(host, M))
    host = rng.standard_normal((27, 16)).astype(np.float32)
    view = cupy.asarray(host)[:, ::2]
    np.testing.assert_array_equal(relattn.resize_rel_pos(view, 13).get(), relattn.resize_rel_pos(host[:, ::2], 13))
    for name in ("float16", "bfloat16"):
        half, _ = to_dev(host, name)
        want = relattn.resize_rel_pos(from_dev(half).astype(np.float32), 41)
        got = relattn.resize_rel_pos(half, 41)
        assert got.dtype == half.dtype
        np.testing.assert_array_equal(from_dev(got), from_dev(to_dev(want, name)[0]))


@pytest.mark.parametrize("spb", [None, 1, 3])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(2, 3, (14, 14), (14, 14), 64), (1, 2, (14, 14), (14, 14), 80),
                                   (1, 2, (7, 9), (5, 16), 64), (1, 1, (3, 20), (6, 17), 64),
                                   (2, 1, (16, 4), (8, 32), 40), (1, 2, (1, 1), (1, 2), 64),
                                   (1, 1, (16, 16), (16, 16), 128), (1, 1, (5, 5), (2, 3), 16)])
def test_small_grid_kernel(shape, dtype, spb):
    """relattn_win (forced: kernel="win"; whole key grid in shared memory, key
    rows padded to 16 / 32 slots): SAM windows, q/k grids of different sizes,
    k_w at the slot limits, padded head dims, one query, several query slices
    per block (kernel_options spb) or one."""
    B, H, qg, kg, D = shape
    options = {} if spb is None else {"spb": spb}
    rng = np.random.default_rng(zlib.crc32(repr((shape, dtype, spb and str(spb))).encode()))
    dev, host = make_case(rng, B, H, qg, kg, D, dtype)
    plan = core_plan(dev, kg, D ** -0.5, "win", **options)
    assert plan.family == "win" and plan.config.spb == (spb or min((qg[0] * qg[1] + 15) // 16, 16))
    run_and_check(dev, host, kg, D ** -0.5, dtype, kernel="win", **options)


@pytest.mark.parametrize("family", ["ws", "wg", "mma"])
def test_small_grid_kernel_matches_the_other_families(family):
    """SAM's windows on relattn_win and on each other 16-bit family that can
    take them (forced by name)."""
    rng = np.random.default_rng(3)
    dev, _ = make_case(rng, 3, 2, (14, 14), (14, 14), 64, "bfloat16")
    on = core_plan(dev, (14, 14), 0.125, "win").run(*dev)
    try:
        plan = core_plan(dev, (14, 14), 0.125, family)
    except NoKernel as exc:
        pytest.skip(str(exc))
    off = plan.run(*dev)
    assert rel_l2(from_dev(on), from_dev(off)) <= 4e-3


def test_3xtf32_non_finite_inputs_follow_ieee_like_fma():
    """An infinite k (a +-inf logit) or v element: the fast 3xTF32 split would
    give NaN; the flagged blocks rerun with the safe split, the others keep
    their first-pass result. NaN / inf pattern and values match the FMA path."""
    import relattn

    rng = np.random.default_rng(23)
    q, k, v = (rng.standard_normal((1, 4, 300, 64)).astype(np.float32) for _ in range(3))
    q[0, 1, :, 0] = np.where(np.arange(300) % 2 == 0, 1.0, -1.0)
    k[0, 1, 7, 0] = np.inf           # head 1: +inf logits (NaN rows) and -inf logits (weight 0)
    v[0, 2, 11, 5] = np.inf          # head 2: column 5 becomes +inf
    v[0, 3, 250, 9] = np.nan         # head 3: column 9 becomes NaN
    th = (0.1 * rng.standard_normal((29, 64))).astype(np.float32)
    tw = (0.1 * rng.standard_normal((39, 64))).astype(np.float32)
    dev = [cupy.asarray(a) for a in (q, k, v, th, tw)]
    with relattn.gpu_float32_mode("fma"):
        want = relattn.rel_pos_attention(*dev, (15, 20)).get()
    got = relattn.rel_pos_attention(*dev, (15, 20)).get()   # default: 3xTF32
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    assert np.isnan(want[0, 1, 0::2]).all() and np.isfinite(want[0, 1, 1::2]).all()
    assert np.isposinf(want[0, 2, :, 5]).all() and np.isnan(want[0, 3, :, 9]).all()
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=0, atol=2e-5 * np.abs(want[fin]).max())


# ------------------------------------------------------------ call plans
def _unplanned(monkeypatch, *args, **kwargs):
    """rel_pos_attention through validation and dispatch, leaving no plan."""
    import relattn
    from relattn import functional

    with monkeypatch.context() as m:
        m.setattr(functional, "_call_key", lambda *a, **k: None)
        return relattn.rel_pos_attention(*args, **kwargs)


def _misaligned(a):
    """A C-contiguous copy of ``a`` whose data starts one element past a
    256-byte boundary (not 16-byte aligned)."""
    bits = cupy.dtype(f"u{a.dtype.itemsize}")
    base = cupy.empty(a.size + 1, dtype=bits)
    out = base[1:].reshape(a.shape)
    out[...] = a.view(bits)
    return out.view(a.dtype)


PLAN_CASES = [
    # (B, H, grid, head_dim, dtype): the kernel it runs on a Hopper GPU
    (1, 2, (64, 64), 64, "bfloat16"),   # relattn_ws
    (2, 2, (14, 14), 64, "float16"),    # relattn_ws, 16-slot key rows (elsewhere relattn_win)
    (1, 2, (20, 20), 80, "bfloat16"),   # relattn_mma
    (1, 2, (9, 11), 20, "bfloat16"),    # relattn_win, head_dim padded to 24
    (1, 2, (32, 32), 64, "float32"),    # relattn_wgt (3xTF32)
    (1, 2, (9, 11), 18, "float32"),     # relattn_tf32, head_dim padded to 20
    (1, 1, (9, 11), 24, "float64"),     # relattn_simt
]


@pytest.mark.parametrize("layout", ["contiguous", "misaligned", "strided"])
@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: f"{c[4]}-g{c[2][0]}x{c[2][1]}-d{c[3]}")
def test_planned_calls_match_unplanned_and_reference(case, layout, monkeypatch):
    """The second and later calls run the plan the first one left: same bits
    as a call through the full dispatch, float64-reference accuracy, for
    aligned, misaligned (one element off 16 bytes) and strided inputs."""
    import relattn

    B, H, g, D, dtype = case
    rng = np.random.default_rng(zlib.crc32(repr((case, layout)).encode()))
    S = g[0] * g[1]
    width = 2 * D if layout == "strided" else D
    (q, qr), (k, kr), (v, vr) = (to_dev(rng.standard_normal((B, H, S, width)), dtype) for _ in range(3))
    if layout == "strided":
        q, k, v = q[..., ::2], k[..., ::2], v[..., ::2]
        qr, kr, vr = qr[..., ::2], kr[..., ::2], vr[..., ::2]
    elif layout == "misaligned":
        q, k, v = (_misaligned(a) for a in (q, k, v))
        assert q.data.ptr % 16 != 0
    tdtype = "float64" if dtype == "float64" else "float32"
    (th, thr), (tw, twr) = (to_dev(rng.standard_normal((2 * n - 1, D)), tdtype) for n in g)
    rh, rw = relattn.decomposed_rel_pos(qr, thr, twr, g, g)
    ref = reference(qr, kr, vr, rh, rw, g, D ** -0.5)
    want = _unplanned(monkeypatch, q, k, v, th, tw, g)
    for _ in range(3):
        got = relattn.rel_pos_attention(q, k, v, th, tw, g)
        np.testing.assert_array_equal(from_dev(got), from_dev(want))
    assert rel_l2(from_dev(got), ref) <= TOL[dtype]


def test_plans_follow_the_float32_mode_and_forced_kernels(monkeypatch):
    """The float32 mode is part of the plan key; plans of forced kernel
    families (relattn.plan(..., kernel=...)) leave rel_pos_attention's own
    plans as they were."""
    import relattn

    rng = np.random.default_rng(31)
    dev = [cupy.asarray(rng.standard_normal(s).astype(np.float32))
           for s in [(1, 2, 196, 64)] * 3 + [(27, 64)] * 2]
    outs = {}
    for mode in ("3xtf32", "tf32", "fma", "3xtf32"):
        with relattn.gpu_float32_mode(mode):
            want = _unplanned(monkeypatch, *dev, (14, 14))
            for _ in range(2):
                got = relattn.rel_pos_attention(*dev, (14, 14))
                np.testing.assert_array_equal(got.get(), want.get())
            outs[mode] = got.get()
    assert not np.array_equal(outs["tf32"], outs["3xtf32"])
    half = [a.astype(cupy.float16) if a.ndim == 4 else a for a in dev]
    want = _unplanned(monkeypatch, *half, (14, 14))
    for kernel in ("win", "mma", None, "win"):
        p = relattn.plan(*half, (14, 14), kernel=kernel)
        if kernel is not None:
            assert p.kernel.startswith(f"relattn_{kernel} (")
        forced = p(*half).get()
        np.testing.assert_array_equal(p(*half).get(), forced)
        assert rel_l2(forced.astype(np.float64), want.get().astype(np.float64)) <= TOL["float16"]
        for _ in range(2):
            np.testing.assert_array_equal(relattn.rel_pos_attention(*half, (14, 14)).get(), want.get())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_planned_call_captured_in_a_cuda_graph(dtype):
    """A planned call launches only: it can be captured and replayed."""
    import relattn

    rng = np.random.default_rng(37)
    (q, _), (k, _), (v, _) = (to_dev(rng.standard_normal((1, 2, 1024, 64)), dtype) for _ in range(3))
    th, tw = (cupy.asarray(rng.standard_normal((63, 64)).astype(np.float32)) for _ in range(2))
    first = relattn.rel_pos_attention(q, k, v, th, tw, (32, 32))
    out = replayed_from_graph(lambda: relattn.rel_pos_attention(q, k, v, th, tw, (32, 32)))
    np.testing.assert_array_equal(from_dev(out), from_dev(first))
