"""CUDA kernels run on the host by :mod:`simt_emu` (each CUDA thread a host
thread, block, warp and named barriers real, warp and warpgroup instructions
as collectives):

- the terms' pullback (``cuda/bwd_terms.cu``: the gather, side, grid and
  scatter kernels) against a float64 model built from the oracle's gather index;
- the fused backward, float32 (``cuda/bwd32.cu``), 16-bit on ``mma.sync``
  (``cuda/bwd.cu``) and on ``wgmma`` (``cuda/bwd_wg.cu``, also bit for bit
  against ``bwd.cu``), against the float64 core;
- the forward: the SIMT kernel (``cuda/simt.cu``, float32 and float64, its
  exact path for non-finite rows included), the ``mma.sync`` families
  (``cuda/mma.cu``, ``cuda/win.cu``, ``cuda/tf32.cu``) and the Hopper ones
  (``cuda/wg.cu``, ``cuda/ws.cu`` with its TMA producer and mbarriers,
  ``cuda/wgt.cu``), against the oracle's attention;
- the terms kernels (``cuda/terms.cu``) against the oracle's terms;
- the window copies (``cuda/relattn_window.cu``) against numpy;
- drawn problems for every forward family and the fused backward (hypothesis),
  and the planner end to end (``gpu.make_plan``: its choice of family, the
  terms, the run).

These check the kernels' indexing, fragment and shared-memory layouts and
arithmetic on any machine with a C++ compiler, launched by the backend's own
Python (``relattn.backends.gpu``'s ``backward``, ``terms`` and family
modules: their plans, their CuPy calls made on host arrays, their argument
blocks handed to a stand-in for the driver), for an sm_80 part or an sm_90a
one; the same kernels on a GPU are tested in ``test_vjp_gpu.py`` and
``test_gpu_*.py``. They skip without a C++20 compiler.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
import simt_emu
from relattn._cache import BoundedCache
from relattn.backends.gpu import _build, backward

pytestmark = pytest.mark.skipif(simt_emu.compiler() is None, reason="no C++ compiler for the host emulation")

DTYPES = {0: np.float16, 1: ml_dtypes.bfloat16, 2: np.float32}
# the relative error of a value rounded once to each type, with float32 sums under it
ROUNDING = {0: 2.0 ** -11 + 1e-5, 1: 2.0 ** -8 + 1e-5, 2: 1e-5}


@pytest.fixture(scope="module")
def emu():
    return simt_emu.Emulator(_build.family_source("bwd_terms"), list(backward._terms_names().values()))


@pytest.fixture
def host_gpu(emu, monkeypatch):
    """The GPU backward's terms' pullback planned and launched as on a GPU,
    its arrays host arrays and its launches :class:`simt_emu.HostDriver` 's;
    the backend's caches of device arrays and launches kept apart."""
    import sys

    from relattn import relpos
    from relattn.backends.gpu import _build, _device

    driver = simt_emu.HostDriver(emu)
    monkeypatch.setitem(sys.modules, "cupy", simt_emu.host_cupy(driver))
    monkeypatch.setattr(_build, "_libcuda", lambda: driver)
    monkeypatch.setattr(backward, "_terms_kernel", lambda kind, dt, variant=(), smem=0: driver.function(
        backward._terms_names()[(kind, dt if kind != "scatter" else 0, variant)]))
    monkeypatch.setattr(backward, "_launches", BoundedCache(256))
    monkeypatch.setattr(relpos, "_device_cache", {})
    # device 0 as an sm_80 part (the portable kernels; no wgmma)
    monkeypatch.setattr(_device, "_devices", {0: _device.Device(0, 80, 108, 163 * 1024, "host emulation")})
    return simt_emu.HostArray


@pytest.fixture
def host_portable(host_gpu, monkeypatch):
    """:func:`relattn.backends.gpu._build.portable_kernel` standing for its
    kernels with host emulations (one per family source, built on first use),
    called as CuPy's RawKernel is: ``fn(grid, block, args, shared_mem=)``."""
    from relattn.backends.gpu import _build

    emus = {}

    def portable_kernel(module_key, names, which, smem, source=None):
        key = (module_key, source)
        if key not in emus:
            emus[key] = simt_emu.Emulator(_build.portable_source() if source is None else source,
                                          list(names.values()))
        return simt_emu.HostKernel(emus[key], names[which], _build._libcuda())

    monkeypatch.setattr(_build, "portable_kernel", portable_kernel)
    return host_gpu


_sm90_emus = {}


@pytest.fixture
def host_sm90(host_portable, monkeypatch):
    """:func:`host_portable` on an sm_90a part: ``_build.sm90_kernel`` stands for
    each instantiation with a host emulation of its family's source (the
    ``wgmma`` products emulated; built on first use, kept for the test run)."""
    from relattn.backends.gpu import _build, _device

    def sm90_kernel(name):
        if name not in _sm90_emus:
            _sm90_emus[name] = simt_emu.Emulator(_build.family_source(_build.family_of(name)), [name])
        return simt_emu.HostKernel(_sm90_emus[name], name, _build._libcuda())

    from relattn.backends.gpu.families import ws

    monkeypatch.setattr(_build, "sm90_kernel", sm90_kernel)
    monkeypatch.setattr(ws, "_tmap_encoder", simt_emu.host_tensor_map_encoder)
    monkeypatch.setattr(_device, "_devices", {0: _device.Device(0, 90, 132, 227 * 1024, None)})
    return host_portable


def test_a_deadlocked_kernel_ends_the_run_with_its_name(tmp_path):
    """The harness itself: a kernel whose threads wait at a barrier that
    counts more threads than the block has ends the process within the
    emulator's timeout, naming the kernel, instead of hanging the test run."""
    import subprocess
    import sys

    script = tmp_path / "hang.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {repr(str(__import__('pathlib').Path(__file__).parent))})\n"
        "import simt_emu\n"
        "src = '__global__ void relattn_hang() { ra_bar_sync(1, 64); }'\n"
        "emu = simt_emu.Emulator('typedef unsigned short u16; typedef unsigned u32;' + src, ['relattn_hang'],"
        " timeout=2)\n"
        "emu.launch('relattn_hang', 1, 32, 0, [])\n"
        "print('returned')\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "returned" not in run.stdout
    assert "relattn_hang did not finish in 2 s" in run.stderr


def _raw(x):
    """What the kernels take: 16-bit data as its bits."""
    return x.view(np.uint16) if x.dtype.itemsize == 2 else x


def _model(q, core, dh, dw, th, tw, q_size, k_size):
    """dq = core + sum_ky dh Rh[y, ky] + sum_kx dw Rw[x, kx] and the two
    tables' gradients (the gather's adjoint of sum over rows of d q), float64."""
    (qh, qw), (kh, kw) = q_size, k_size
    ih, iw = oracle.rel_pos_index(qh, kh), oracle.rel_pos_index(qw, kw)
    nbh, _, D = q.shape
    q4 = q.astype(np.float64).reshape(nbh, qh, qw, D)
    dh4 = dh.astype(np.float64).reshape(nbh, qh, qw, kh)
    dw4 = dw.astype(np.float64).reshape(nbh, qh, qw, kw)
    rh, rw = th.astype(np.float64)[ih], tw.astype(np.float64)[iw]
    dq = core.astype(np.float64) + (np.einsum("byxk,ykd->byxd", dh4, rh)
                                    + np.einsum("byxk,xkd->byxd", dw4, rw)).reshape(q.shape)
    gh, gw = np.zeros((th.shape[0], D)), np.zeros((tw.shape[0], D))
    np.add.at(gh, ih.reshape(-1), np.einsum("byxk,byxd->ykd", dh4, q4).reshape(-1, D))
    np.add.at(gw, iw.reshape(-1), np.einsum("byxk,byxd->xkd", dw4, q4).reshape(-1, D))
    return dq, gh, gw


def _two_stage(q, core, dh, dw, th, tw, q_size, k_size):
    """dq and the tables' gradients by ``backward.terms_dq`` (the side
    kernels, from the gather kernel's tables) and ``backward.tables_pullback``
    (grid and scatter), planned and launched as on a GPU (``host_gpu``)."""
    (qh, qw), (kh, kw) = q_size, k_size
    nbh, Sq, D = q.shape
    q, core, dh, dw, th, tw = (np.ascontiguousarray(a).view(simt_emu.HostArray) for a in (q, core, dh, dw, th, tw))
    q4, dh4, dw4 = q.reshape(1, nbh, Sq, D), dh.reshape(1, nbh, Sq, kh), dw.reshape(1, nbh, Sq, kw)
    rh, rw = backward.gathered_f32(th, qh, kh), backward.gathered_f32(tw, qw, kw)
    dq = backward.terms_dq(q4, core.reshape(1, nbh, Sq, D).copy(), dh4, dw4, rh, rw, q_size, k_size)
    gh, gw = backward.tables_pullback(q4, dh4, dw4, q_size, k_size)
    return np.asarray(dq).reshape(nbh, Sq, D), np.asarray(gh), np.asarray(gw)


def _problem(rng, nbh, q_size, k_size, D, dt, tdt):
    (qh, qw), (kh, kw) = q_size, k_size
    Sq = qh * qw
    q = rng.standard_normal((nbh, Sq, D)).astype(DTYPES[dt])
    core = rng.standard_normal((nbh, Sq, D)).astype(np.float32)
    dh = rng.standard_normal((nbh, Sq, kh)).astype(np.float32)
    dw = rng.standard_normal((nbh, Sq, kw)).astype(np.float32)
    th = rng.standard_normal((2 * max(qh, kh) - 1, D)).astype(DTYPES[tdt])
    tw = rng.standard_normal((2 * max(qw, kw) - 1, D)).astype(DTYPES[tdt])
    return q, core, dh, dw, th, tw


def _rel(x, ref):
    return float(np.abs(np.asarray(x, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


grids = st.tuples(st.integers(1, 9), st.integers(1, 9))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nbh=st.integers(1, 3), q_size=grids, k_size=grids, D=st.sampled_from([1, 3, 8, 30, 64, 66, 80, 128]),
       dt=st.sampled_from([0, 1, 2]), tdt=st.sampled_from([0, 1, 2]), seed=st.integers(0, 2**32 - 1))
def test_terms_pullback_kernels_match_the_model(host_gpu, nbh, q_size, k_size, D, dt, tdt, seed):
    problem = _problem(np.random.default_rng(seed), nbh, q_size, k_size, D, dt, tdt)
    dq, gh, gw = _two_stage(*problem, q_size, k_size)
    rdq, rgh, rgw = _model(*problem, q_size, k_size)
    assert _rel(dq, rdq) <= ROUNDING[dt]
    assert _rel(gh, rgh) <= 1e-5 and _rel(gw, rgw) <= 1e-5


@pytest.mark.parametrize("nbh, q_size, k_size, D", [
    (2, (14, 14), (14, 14), 64),   # SAM's windows
    (1, (20, 3), (24, 2), 16),     # more than 16 keys a side: the grid kernel's 64-key tiles
    (70, (2, 2), (2, 2), 8),       # rows enough for the grid kernel to split them
])
def test_terms_pullback_kernels_at_the_plans_edges(host_gpu, nbh, q_size, k_size, D):
    problem = _problem(np.random.default_rng(7), nbh, q_size, k_size, D, 1, 2)
    dq, gh, gw = _two_stage(*problem, q_size, k_size)
    rdq, rgh, rgw = _model(*problem, q_size, k_size)
    assert _rel(dq, rdq) <= ROUNDING[1]
    assert _rel(gh, rgh) <= 1e-5 and _rel(gw, rgw) <= 1e-5
    if nbh == 70:
        na, nb, kl, _, _ = backward._side("h", q_size, k_size)
        assert backward._terms_split(na, 1, nbh * nb, kl, D) > 1


def _backward_problem(rng, dtype, q_size, k_size, D, terms, B=1, H=2):
    """q, k, v, dout (B, H, S, D) of ``dtype`` and, with ``terms``, rel_h and
    rel_w (float32, from q and drawn tables), else None."""
    import relattn

    Sq, Sk = q_size[0] * q_size[1], k_size[0] * k_size[1]
    q = rng.standard_normal((B, H, Sq, D)).astype(dtype)
    k, v = (rng.standard_normal((B, H, Sk, D)).astype(dtype) for _ in range(2))
    dout = rng.standard_normal((B, H, Sq, D)).astype(dtype)
    if not terms:
        return q, k, v, dout, None, None
    th = (0.3 * rng.standard_normal((2 * max(q_size[0], k_size[0]) - 1, D))).astype(np.float32)
    tw = (0.3 * rng.standard_normal((2 * max(q_size[1], k_size[1]) - 1, D))).astype(np.float32)
    rel_h, rel_w = relattn.decomposed_rel_pos(q.astype(np.float32), th, tw, q_size, k_size)
    return q, k, v, dout, np.asarray(rel_h, np.float32), np.asarray(rel_w, np.float32)


def _logits(q, k, rel_h, rel_w, scale):
    """The float64 logits: scale q k^T plus rel_h and rel_w spread over the
    key grid (rel_h None: no terms)."""
    x = scale * q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2)
    if rel_h is not None:
        x = x + (rel_h.astype(np.float64)[..., :, None] + rel_w.astype(np.float64)[..., None, :]).reshape(x.shape)
    return x


def _lse2(q, k, rel_h, rel_w, k_size, scale):
    """Each row's log-sum-exp in the log2 domain (the forward's), float32."""
    x = _logits(q, k, rel_h, rel_w, scale)
    m = x.max(-1)
    return ((np.log(np.exp(x - m[..., None]).sum(-1)) + m) / np.log(2)).astype(np.float32)


def _core_gradients(q, k, v, rel_h, rel_w, k_size, scale, dout):
    """The attention core's output and pullback in float64: out, and dq
    without the terms' part, dk, dv and the terms' gradients (rel_h / rel_w
    None: no terms)."""
    q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    B, H, Sq, _ = q.shape
    logits = _logits(q, k, rel_h, rel_w, scale)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = dout @ v.swapaxes(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    terms = (None, None)
    if rel_h is not None:
        d4 = ds.reshape(B, H, Sq, *k_size)
        terms = (d4.sum(-1), d4.sum(-2))
    return p @ v, (scale * ds @ k, scale * ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ dout) + terms


@pytest.mark.parametrize("q_size, k_size, D, terms", [((5, 6), (4, 7), 16, True), ((3, 4), (2, 5), 40, True),
                                                      ((2, 64), (2, 64), 32, True),   # key rows of 64
                                                      ((4, 5), (6, 3), 24, False)])
def test_float32_fused_backward_kernels(host_portable, q_size, k_size, D, terms):
    """``cuda/bwd32.cu`` (the float32 backward on the SIMT cores): the row
    log-sum-exp (``backward.row_lse``) and the core's gradients
    (``backward.fused_core_backward``) as the backward launches them, in each
    bias mode, against the float64 core."""
    import relattn

    rng = np.random.default_rng(sum(q_size) + D)
    B, H, scale = 1, 2, D ** -0.5
    Sq, Sk = q_size[0] * q_size[1], k_size[0] * k_size[1]
    q = rng.standard_normal((B, H, Sq, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, H, Sk, D)).astype(np.float32) for _ in range(2))
    dout = rng.standard_normal((B, H, Sq, D)).astype(np.float32)
    rel_h = rel_w = None
    if terms:
        th = (0.3 * rng.standard_normal((2 * max(q_size[0], k_size[0]) - 1, D))).astype(np.float32)
        tw = (0.3 * rng.standard_normal((2 * max(q_size[1], k_size[1]) - 1, D))).astype(np.float32)
        rel_h, rel_w = (t.astype(np.float32) for t in relattn.decomposed_rel_pos(q, th, tw, q_size, k_size))
    out, want = _core_gradients(q, k, v, rel_h, rel_w, k_size, scale, dout)
    host = host_portable
    dev = [None if a is None else np.ascontiguousarray(a).view(host) for a in (q, k, v, rel_h, rel_w)]
    assert backward._bias(rel_h, k_size, Sk) == (backward.Bias.NONE if not terms else backward.Bias.KEY_ROWS
                                                  if k_size[1] == 64 else backward.Bias.GENERIC)
    lse = backward.row_lse(*dev[:2], *dev[3:], k_size, scale)
    got = backward.fused_core_backward(*dev, k_size, scale, out.astype(np.float32).view(host), dout.view(host),
                                       lse=lse)
    for name, g, w in zip(("dq", "dk", "dv", "d_rel_h", "d_rel_w"), got, want):
        if w is None:
            assert g is None, name
            continue
        assert _rel(np.asarray(g).reshape(w.shape), w) <= 2e-5, name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("q_size, k_size, D, terms, nonfinite", [
    ((5, 6), (4, 7), 16, True, False), ((3, 4), (9, 9), 40, True, True), ((4, 5), (6, 3), 24, False, False)])
def test_simt_forward_kernel(host_portable, dtype, q_size, k_size, D, terms, nonfinite):
    """``cuda/simt.cu`` (float32 ``"fma"`` and float64 attention on the SIMT
    cores), planned by ``families.simt`` on strided q / k / v: against the
    oracle's float64 attention; rows with a non-finite value take the exact
    path (warp shuffles and ballots) and match the oracle's NaN / inf
    pattern."""
    import relattn
    from relattn.backends.gpu import _device
    from relattn.backends.gpu.families import simt
    from relattn.backends.gpu.problem import Problem

    rng = np.random.default_rng(D + nonfinite)
    B, H, scale = 1, 2, D ** -0.5
    Sq, Sk = q_size[0] * q_size[1], k_size[0] * k_size[1]
    dt = np.dtype(dtype)
    # q, k, v as views of (B, S, H, D) buffers, as a layer's projections give them
    q, k, v = (rng.standard_normal((B, n, H, D)).astype(dt).transpose(0, 2, 1, 3) for n in (Sq, Sk, Sk))
    if nonfinite:
        v[0, 1, 3, 2] = np.inf   # every row of head 1 meets inf * weight
    rel_h = rel_w = None
    if terms:
        th = (0.3 * rng.standard_normal((2 * max(q_size[0], k_size[0]) - 1, D))).astype(dt)
        tw = (0.3 * rng.standard_normal((2 * max(q_size[1], k_size[1]) - 1, D))).astype(dt)
        rel_h, rel_w = (t.astype(dt) for t in relattn.decomposed_rel_pos(q, th, tw, q_size, k_size))
    host = host_portable
    dev = [None if a is None else a.view(host) for a in (q, k, v, rel_h, rel_w)]
    p = Problem.from_arrays(dev[0], dev[1], rel_h, rel_w, q_size if terms else None, k_size, scale, terms=True)
    device = _device.current()
    assert simt.not_supported_reasons(p, device, False) == []
    run, _ = simt.build(p, device, simt.config(p, device, False, {}), *dev[:3])
    got = np.asarray(run(*dev))
    want = oracle.attention(q, k, v, th if terms else None, tw if terms else None,
                            q_size if terms else None, k_size if terms else None, scale=scale)
    want = np.asarray(want, np.float64)
    assert got.dtype == dt and got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    assert finite.any() and finite.all() != nonfinite
    tol = 2e-6 if dtype == "float32" else 1e-13
    assert np.abs(got[finite] - want[finite]).max() <= tol * np.abs(want[finite]).max()


@pytest.mark.parametrize("dt, q_size, k_size, D, terms, forward_lse", [
    (1, (5, 6), (4, 7), 16, True, False),
    (0, (5, 6), (4, 7), 16, True, True),
    (1, (2, 64), (2, 64), 32, True, True),    # key rows of 64
    (1, (9, 9), (9, 9), 64, True, False),     # several query and key tiles
    (0, (4, 5), (6, 3), 24, False, False),
    (1, (5, 6), (14, 14), 32, True, True),    # four key tiles: stages refilled while the pipeline runs
])
def test_16bit_fused_backward_kernels(host_portable, dt, q_size, k_size, D, terms, forward_lse):
    """``cuda/bwd.cu`` (the 16-bit backward on ``mma.sync``, its ``ldmatrix``
    loads and ``cp.async`` pipeline emulated warp by warp): the row pass
    (log-sum-exp and the exact delta) or, with the forward's log-sum-exp,
    the delta kernel, then dq and dk / dv, as ``backward.fused_core_backward``
    plans them for an sm_80 part, in each bias mode, against the float64 core
    of the same 16-bit inputs."""
    rng = np.random.default_rng(sum(q_size) + D + dt)
    scale, Sk = D ** -0.5, k_size[0] * k_size[1]
    cast = DTYPES[dt]
    q, k, v, dout, rel_h, rel_w = _backward_problem(rng, cast, q_size, k_size, D, terms)
    out, want = _core_gradients(q, k, v, rel_h, rel_w, k_size, scale, dout)
    host = host_portable
    dev = [None if a is None else np.ascontiguousarray(a).view(host) for a in (q, k, v, rel_h, rel_w)]
    assert backward.kernel_forms(*dev[:3], rel_h, k_size) == {"dq": "mma", "dkv": "mma"}
    assert backward._bias(rel_h, k_size, Sk) == (backward.Bias.NONE if not terms else backward.Bias.KEY_ROWS
                                                  if k_size[1] == 64 else backward.Bias.GENERIC)
    lse = None
    if forward_lse:
        lse = _lse2(q, k, rel_h, rel_w, k_size, scale).view(host)
    got = backward.fused_core_backward(*dev, k_size, scale, out.astype(cast).view(host), dout.view(host), lse=lse)
    tol = 1e-2 if dt == 1 else 2e-3
    for name, g, w in zip(("dq", "dk", "dv", "d_rel_h", "d_rel_w"), got, want):
        if w is None:
            assert g is None, name
            continue
        assert _rel(np.asarray(g).reshape(w.shape), w) <= tol, name


def _forward_problem(rng, dt, q_size, k_size, D, B=1, H=2):
    """16-bit (or ``dt`` 2: float32) q, k, v as views of (B, S, H, D)
    buffers, as a layer's projections give them, and float32 tables."""
    Sq, Sk = q_size[0] * q_size[1], k_size[0] * k_size[1]
    q, k, v = (rng.standard_normal((B, n, H, D)).astype(DTYPES[dt]).transpose(0, 2, 1, 3) for n in (Sq, Sk, Sk))
    th = (0.3 * rng.standard_normal((2 * max(q_size[0], k_size[0]) - 1, D))).astype(np.float32)
    tw = (0.3 * rng.standard_normal((2 * max(q_size[1], k_size[1]) - 1, D))).astype(np.float32)
    return q, k, v, th, tw


def _run_family(host, family, options, q, k, v, th, tw, q_size, k_size, terms=True, fuse=False, scale=None,
                lse=None):
    """Family ``family`` of ``relattn.backends.gpu.families`` on the host
    arrays (``host``: the fixture's array type) as the planner would run it
    when forced (``options``: its kernel_options): the terms given as float32
    (from q and the tables) or, with ``fuse``, computed by the kernel from the
    tables; ``lse``: an array for the row log-sum-exps (``ws``). Returns the
    output and the configuration."""
    import importlib

    import relattn
    from relattn.backends.gpu import _device
    from relattn.backends.gpu.problem import Problem

    fam = importlib.import_module(f"relattn.backends.gpu.families.{family}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rel_h = rel_w = None
    if terms and not fuse:
        rel_h, rel_w = (np.asarray(t, np.float64 if q.dtype == np.float64 else np.float32)
                        for t in relattn.decomposed_rel_pos(q.astype(np.float64), th.astype(np.float64),
                                                            tw.astype(np.float64), q_size, k_size))
    dev = [None if a is None else a.view(host) for a in (q, k, v, rel_h, rel_w)]
    x, y = (th.view(host), tw.view(host)) if fuse else (dev[3], dev[4])
    p = Problem.from_arrays(dev[0], dev[1], x, y, q_size if terms else None, k_size, scale, terms=not fuse)
    device = _device.current()
    assert fam.not_supported_reasons(p, device, fuse) == []
    c = fam.config(p, device, fuse, options)
    assert fam.config_reasons(p, c) == []
    run, why = fam.build(p, device, c, *dev[:3], *((x, y) if fuse else ()))
    assert why is None
    out = run(*dev[:3], x, y) if lse is None else run(*dev[:3], x, y, lse=lse)
    return np.asarray(out), c


@pytest.mark.parametrize("family, options, dt, q_size, k_size, D, terms", [
    ("mma", {}, 1, (5, 6), (4, 7), 16, True),               # GENERIC
    ("mma", {"mw": 2}, 0, (9, 9), (9, 9), 40, True),        # 128-row blocks
    ("mma", {}, 1, (3, 64), (2, 64), 24, True),             # KEY_ROWS
    ("mma", {"mw": 2}, 1, (2, 64), (2, 64), 64, True),      # KEY_ROWS, rel_w staged for two tiles
    ("mma", {}, 0, (4, 5), (6, 3), 72, False),              # NONE, head_dim not a multiple of 16
    ("win", {}, 1, (14, 14), (14, 14), 64, True),           # SAM's windows
    ("win", {"spb": 2}, 0, (7, 9), (5, 20), 16, True),      # 32-slot key rows, several blocks
    ("win", {"fuse": 1}, 1, (14, 14), (14, 14), 32, True),  # the terms computed in the kernel
])
def test_16bit_forward_kernels(host_portable, family, options, dt, q_size, k_size, D, terms):
    """The forward's ``mma.sync`` families (``cuda/mma.cu``: any grid;
    ``cuda/win.cu``: small key grids resident in shared memory, the terms
    given or computed from the tables), planned by their family modules on
    strided 16-bit q / k / v: against the oracle's float64 attention of the
    same 16-bit inputs."""
    from relattn.backends.gpu.families import mma

    q, k, v, th, tw = _forward_problem(np.random.default_rng(D + dt + q_size[1]), dt, q_size, k_size, D)
    fuse = bool(options.get("fuse", 0))
    if fuse:
        th, tw = th.astype(DTYPES[dt]), tw.astype(DTYPES[dt])
    got, c = _run_family(host_portable, family, options, q, k, v, th, tw, q_size, k_size, terms, fuse)
    if family == "mma":
        assert c.bias == (mma.Bias.NONE if not terms else mma.Bias.KEY_ROWS if k_size[1] == 64
                          else mma.Bias.GENERIC)
    want = oracle.attention(q, k, v, th if terms else None, tw if terms else None,
                            q_size if terms else None, k_size if terms else None, scale=D ** -0.5)
    assert got.shape == want.shape
    assert _rel(got.astype(np.float64), want) <= (1e-2 if dt == 1 else 2e-3)


@pytest.mark.parametrize("dt, tdt, q_size, k_size, D, stored", [
    (1, 1, (5, 6), (4, 7), 64, None),        # bfloat16 q and tables: the tensor-core kernel
    (0, 2, (14, 14), (14, 14), 40, None),    # float16 q, float32 tables
    (1, 1, (9, 3), (9, 3), 112, (7, 9)),     # the widest head_dim on the tensor cores; resized tables
    (2, 2, (6, 20), (6, 20), 24, None),      # float32: the FMA kernel, 32-column tiles
    (2, 2, (3, 70), (3, 70), 8, None),       # 64-column tiles
])
def test_terms_kernels(host_portable, dt, tdt, q_size, k_size, D, stored):
    """``cuda/terms.cu`` (``relattn_relterms_mma`` on ``mma.sync`` for 16-bit
    q, ``relattn_relterms`` on the FMA units for float32) through
    ``gpu.terms.rel_terms_from_tables``: the terms from strided q and the
    stored tables (gathered through SAM's index, resized where their length
    is not SAM's) against the oracle's float64 terms."""
    from relattn.backends.gpu import terms as gpu_terms

    rng = np.random.default_rng(D + dt)
    q = _forward_problem(rng, dt, q_size, k_size, D)[0]
    lh, lw = stored or (2 * max(q_size[0], k_size[0]) - 1, 2 * max(q_size[1], k_size[1]) - 1)
    th = (0.3 * rng.standard_normal((lh, D))).astype(DTYPES[tdt])
    tw = (0.3 * rng.standard_normal((lw, D))).astype(DTYPES[tdt])
    host = host_portable
    rel_h, rel_w = gpu_terms.rel_terms_from_tables(q.view(host), th.view(host), tw.view(host), q_size, k_size)
    want_h, want_w = oracle.decomposed_rel_pos(q, th, tw, q_size, k_size)
    tol = 1e-5 if stored is None else 2 ** -8 + 1e-5   # resized 16-bit tables are rounded to their type
    assert _rel(rel_h, want_h) <= tol and _rel(rel_w, want_w) <= tol


@pytest.mark.parametrize("dt, q_size, k_size, D, terms, warpgroups", [
    (1, (9, 9), (9, 9), 64, True, 1),        # GENERIC
    (0, (5, 13), (8, 9), 80, True, 2),       # head_dim 80: the swizzled tile and its tail
    (1, (2, 64), (3, 64), 64, True, 2),      # KEY_ROWS
    (1, (4, 30), (5, 29), 56, False, 1),     # NONE, head_dim padded to 64
])
def test_wgmma_backward_kernels(host_sm90, dt, q_size, k_size, D, terms, warpgroups):
    """``cuda/bwd_wg.cu`` (the 16-bit dq and dk / dv kernels on ``wgmma``,
    emulated as warpgroup products over the swizzled shared-memory layouts)
    as ``backward.fused_core_backward`` plans them with ``kernels="wg"``:
    against the float64 core, and bit for bit ``bwd.cu``'s ``mma.sync``
    kernels on the same inputs (they compute the same products in the same
    order)."""
    rng = np.random.default_rng(sum(q_size) + D + dt)
    scale = D ** -0.5
    cast = DTYPES[dt]
    q, k, v, dout, rel_h, rel_w = _backward_problem(rng, cast, q_size, k_size, D, terms)
    out, want = _core_gradients(q, k, v, rel_h, rel_w, k_size, scale, dout)
    host = host_sm90
    dev = [None if a is None else np.ascontiguousarray(a).view(host) for a in (q, k, v, rel_h, rel_w)]
    assert backward.wg_reasons(*dev[:3], rel_h, k_size) == []
    assert backward.kernel_forms(*dev[:3], rel_h, k_size, "wg") == {"dq": "wg", "dkv": "wg"}
    got = {}
    for form in ("wg", "mma"):
        got[form] = [None if g is None else np.asarray(g) for g in backward.fused_core_backward(
            *dev, k_size, scale, out.astype(cast).view(host), dout.view(host), kernels=form,
            warpgroups=warpgroups if form == "wg" else None)]
    tol = 1e-2 if dt == 1 else 2e-3
    for i, (name, w) in enumerate(zip(("dq", "dk", "dv", "d_rel_h", "d_rel_w"), want)):
        a, b = got["wg"][i], got["mma"][i]
        if w is None:
            assert a is None and b is None, name
            continue
        assert _rel(a.reshape(w.shape), w) <= tol, name
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), name


@pytest.mark.parametrize("family, options, dt, q_size, k_size, D, terms, fuse", [
    ("wg", {}, 1, (3, 64), (2, 64), 64, True, False),           # KEY_ROWS
    ("wg", {}, 0, (4, 20), (5, 48), 64, True, False),           # WHOLE_ROW
    ("wg", {}, 1, (4, 20), (5, 48), 80, True, False),           # head_dim 80, k_w 48: GENERIC (48-key tiles
                                                                #   would break the swizzle's alignment)
    ("wg", {}, 0, (3, 64), (2, 64), 80, True, False),           # KEY_ROWS, head_dim 80, two warpgroups
    ("wg", {"bn": 32}, 0, (4, 20), (5, 48), 80, False, False),  # NONE, head_dim 80 (its tail), 32-key tiles
    ("wg", {}, 1, (7, 9), (6, 11), 64, True, False),            # GENERIC
    ("wg", {"nwg": 2}, 1, (5, 30), (4, 40), 32, False, False),  # NONE, no swizzle, two warpgroups
    ("ws", {}, 1, (3, 64), (2, 64), 64, True, False),           # KEY_ROWS: SAM's global grids
    ("ws", {}, 0, (9, 9), (9, 9), 64, True, False),             # WINDOW
    ("ws", {}, 1, (14, 14), (14, 14), 64, True, True),          # FUSED_WINDOW: SAM's windows
    ("ws", {}, 1, (2, 64), (3, 64), 64, True, True),            # FUSED
    ("ws", {}, 0, (2, 64), (2, 64), 80, True, False),           # head_dim 80: a second tensor map per operand
    ("ws", {}, 1, (4, 40), (5, 30), 64, False, False),          # NONE
])
def test_hopper_forward_kernels(host_sm90, family, options, dt, q_size, k_size, D, terms, fuse):
    """The Hopper forward kernels on the host: ``cuda/wg.cu`` (``wgmma``,
    tiles by ``cp.async``) and ``cuda/ws.cu`` (the warp-specialised kernel:
    a producer warp's TMA copies and mbarriers, consumer warpgroups on
    ``wgmma`` with named barriers; its fused-terms modes compute the terms
    from the tables), planned by their family modules on strided q / k / v,
    against the oracle's float64 attention; ``ws`` also keeps each row's
    log-sum-exp (log2 domain), against the float64 logits'."""
    from relattn.backends.gpu.families import wg

    q, k, v, th, tw = _forward_problem(np.random.default_rng(D + dt + q_size[1] + fuse), dt, q_size, k_size, D)
    if fuse:
        th, tw = th.astype(DTYPES[dt]), tw.astype(DTYPES[dt])
    lse = np.full(q.shape[:3], np.nan, np.float32).view(host_sm90) if family == "ws" else None
    got, c = _run_family(host_sm90, family, options, q, k, v, th, tw, q_size, k_size, terms, fuse, lse=lse)
    if family == "wg" and k_size[1] == 48:
        assert c.bias == (wg.Bias.WHOLE_ROW if D == 64 else wg.Bias.GENERIC if terms else wg.Bias.NONE)
    scale = D ** -0.5
    want = oracle.attention(q, k, v, th if terms else None, tw if terms else None,
                            q_size if terms else None, k_size if terms else None, scale=scale)
    assert got.shape == want.shape
    assert _rel(got.astype(np.float64), want) <= (1e-2 if dt == 1 else 2e-3), c.describe()
    if lse is not None:
        wh, ww = oracle.decomposed_rel_pos(q, th, tw, q_size, k_size) if terms else (None, None)
        assert np.abs(np.asarray(lse) - _lse2(q, k, wh, ww, k_size, scale)).max() <= 2e-2, c.describe()


def test_wg_refuses_tiles_that_break_the_swizzle():
    """``relattn_wg`` reads head_dim 64 and 80 through the 128-byte swizzle,
    whose atoms must start on 1024 bytes: at head_dim 80 a tile of bn keys is
    bn * 160 bytes, so bn 48, 80 or 112 would put the next tile off that
    alignment and the products would read the wrong elements (the emulation
    shows it). The family's configuration never picks them and refuses them
    when forced; WHOLE_ROW (a tile is one key row, bn == k_w) falls back to
    GENERIC there."""
    from relattn.backends.gpu import _device
    from relattn.backends.gpu.families import wg
    from relattn.backends.gpu.problem import Problem

    dev = _device.Device(0, 90, 132, 227 * 1024, None)

    def problem(D, k_size, terms=True):
        q = np.zeros((1, 2, 80, D), np.float16)
        k = np.zeros((1, 2, k_size[0] * k_size[1], D), np.float16)
        t = np.zeros((1, 2, 80, k_size[0]), np.float32), np.zeros((1, 2, 80, k_size[1]), np.float32)
        return Problem.from_arrays(q, k, *(t if terms else (None, None)), (4, 20) if terms else None, k_size,
                                   D ** -0.5, terms=True)

    for kw in (48, 80, 112):
        p = problem(80, (2, kw))
        c = wg.config(p, dev, False, {})
        assert (c.bias, c.bn) == (wg.Bias.GENERIC, 64) and wg.config_reasons(p, c) == []
        forced = wg.config(p, dev, False, {"bn": kw, "bias": wg.Bias.WHOLE_ROW})
        assert any("1024-byte alignment" in r for r in wg.config_reasons(p, forced))
        p64 = problem(64, (2, kw))
        c64 = wg.config(p64, dev, False, {})
        assert (c64.bias, c64.bn) == (wg.Bias.WHOLE_ROW, kw) and wg.config_reasons(p64, c64) == []
    p = problem(80, (2, 64), terms=False)
    for bn, ok in ((32, True), (48, False), (64, True), (96, True), (40, False)):
        assert (wg.config_reasons(p, wg.config(p, dev, False, {"bn": bn})) == []) == ok, bn
    p = problem(64, (2, 48))
    assert any("bn == k_w" in r for r in wg.config_reasons(p, wg.Config(1, 64, wg.Bias.WHOLE_ROW)))
    assert any("KEY_ROWS" in r for r in wg.config_reasons(p, wg.Config(1, 64, wg.Bias.KEY_ROWS)))
    assert wg.config_reasons(problem(64, (2, 64)), wg.Config(1, 128, wg.Bias.KEY_ROWS)) == []


@pytest.mark.parametrize("family, mode, options, q_size, k_size, D, terms", [
    ("tf32", "3xtf32", {}, (5, 6), (4, 7), 24, True),             # GENERIC
    ("tf32", "3xtf32", {"sh": 1}, (3, 64), (2, 64), 64, True),    # KEY_ROWS, the shared-split variant
    ("tf32", "tf32", {}, (4, 5), (6, 3), 40, False),              # one TF32 product, no terms
    ("wgt", "3xtf32", {}, (3, 64), (2, 64), 64, True),            # KEY_ROWS on wgmma
    ("wgt", "3xtf32", {}, (9, 9), (9, 9), 80, True),              # WINDOW, head_dim 80
])
def test_tf32_forward_kernels(host_sm90, family, mode, options, q_size, k_size, D, terms):
    """float32 attention on the tensor cores: ``cuda/tf32.cu`` (``mma.sync``
    m16n8k8 TF32, three products per pair of splits or one) and ``cuda/wgt.cu``
    (TF32 ``wgmma``), with their exact second pass, planned by their family
    modules on strided q / k / v, against the oracle's float64 attention."""
    import relattn

    q, k, v, th, tw = _forward_problem(np.random.default_rng(D + q_size[1]), 2, q_size, k_size, D)
    with relattn.gpu_float32_mode(mode):
        got, c = _run_family(host_sm90, family, options, q, k, v, th, tw, q_size, k_size, terms)
    want = oracle.attention(q, k, v, th if terms else None, tw if terms else None,
                            q_size if terms else None, k_size if terms else None, scale=D ** -0.5)
    assert _rel(got.astype(np.float64), want) <= (2e-5 if mode == "3xtf32" else 4e-3), c.describe()


# (family, dtype, grid (q and k), tables in q's dtype: the fused-terms modes, float32 mode, kernel_options)
NON_FINITE_CASES = [
    ("ws", "bfloat16", (2, 64), True, None, {}), ("ws", "float16", (2, 64), False, None, {}),
    ("ws", "bfloat16", (7, 7), True, None, {}), ("ws", "float16", (7, 7), False, None, {}),
    ("wg", "bfloat16", (2, 64), False, None, {}), ("wg", "float16", (5, 9), False, None, {}),
    ("mma", "bfloat16", (6, 6), False, None, {}), ("mma", "float16", (5, 7), False, None, {}),
    ("win", "bfloat16", (7, 7), True, None, {}), ("win", "float16", (7, 7), False, None, {}),
    ("wgt", "float32", (7, 7), False, "3xtf32", {}), ("tf32", "float32", (6, 6), False, "3xtf32", {}),
    ("tf32", "float32", (5, 5), False, "tf32", {}), ("simt", "float32", (5, 5), False, "fma", {}),
    ("simt", "float64", (4, 5), False, None, {}),
]


@pytest.mark.parametrize("case", NON_FINITE_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2][0]}x{c[2][1]}"
                         + ("-fused" if c[3] else "") + (f"-{c[4]}" if c[4] else "")
                         + "".join(f"-{k}{v}" for k, v in c[5].items()))
def test_non_finite_rows_on_the_host(host_sm90, case):
    """Each kernel family's exact path for rows the fast path leaves
    non-finite (``test_masked.py``'s GPU case, on small grids): values +-inf
    and NaN under a weight that underflows the fast path (logit about -90
    below the row's maximum: a float32 subnormal, zero in the kernels'
    flushed 16-bit or TF32 weights) give the formula's infinities, not
    0 x inf = NaN; the rows recomputed keep their finite columns within
    tolerance, the other rows are untouched, and a second call gives the same
    bits."""
    import warnings

    import relattn
    from test_masked import assert_same_ieee, underflow_problem

    family, name, (qh, qw), fused, mode, options = case
    dtype = DTYPES[1] if name == "bfloat16" else np.dtype(name)
    q, k, v, th, tw, scale = underflow_problem(qh, qw, dtype, dtype if fused else np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = relattn.rel_pos_attention(q, k, v, th, tw, (qh, qw), scale=scale, backend="numpy")
        with relattn.gpu_float32_mode(mode or "3xtf32"):
            got, c = _run_family(host_sm90, family, options, q, k, v, th, tw, (qh, qw), (qh, qw), True, fused, scale)
            again, _ = _run_family(host_sm90, family, options, q, k, v, th, tw, (qh, qw), (qh, qw), True, fused,
                                   scale)
    assert all(getattr(c, key) == value for key, value in options.items()), c.describe()
    w64 = want.astype(np.float64)
    assert np.isinf(w64).any() and np.isnan(w64).any()
    assert_same_ieee(got, want, dtype, f"{family} {c.describe()}, {name}")
    assert np.array_equal(got.view(np.uint8), again.view(np.uint8))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64", "uint8"])
def test_window_copy_kernels(host_gpu, monkeypatch, dtype):
    """``cuda/relattn_window.cu`` through ``gpu/windows.py``: the layer's
    window partition (zero padding; the tail [1, 0, ..., 0] of its 16-bit
    projections), unpartition (the padding cropped), the heads' merge and
    strided row copies, in words of 16 down to 1 bytes (sources offset off
    16-byte alignment and of odd token widths), against numpy; a second call
    of a signature runs its cached plan."""
    from relattn.backends.gpu import windows

    monkeypatch.setattr(windows, "_functions", {})
    monkeypatch.setattr(windows, "_plans", BoundedCache(64))
    dt = DTYPES[1] if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(5)
    host = host_gpu

    def arr(shape, offset=0):
        # a view offset by `offset` elements into a larger buffer: its base off 16-byte alignment
        flat = (rng.standard_normal(int(np.prod(shape)) + offset) * 50).astype(dt)
        return flat[offset:].reshape(shape).view(host)

    for (B, H, W, C), ws, offset in (((2, 9, 11, 6), 4, 0), ((1, 14, 14, 8), 7, 1), ((1, 5, 3, 3), 2, 3)):
        hp, wp = -(-H // ws) * ws, -(-W // ws) * ws
        x = arr((B, H, W, C), offset)
        pad = np.zeros((B, hp, wp, C), dt)
        pad[:, :H, :W] = x
        want = pad.reshape(B, hp // ws, ws, wp // ws, ws, C).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, C)
        for _ in range(2):   # the second call: the cached plan
            got = np.asarray(windows.partition(x, ws, hp, wp))
            assert got.dtype == dt and np.array_equal(got.view(np.uint8), want.view(np.uint8))
        back = np.asarray(windows.unpartition(want.copy().view(host), ws, hp, wp, H, W))
        assert np.array_equal(back.view(np.uint8), np.ascontiguousarray(x).view(np.uint8))
        if dtype == "bfloat16":
            tail = np.zeros(want.shape[:-1] + (windows.TAIL,), dt)
            tail[..., 0] = 1
            got = np.asarray(windows.partition_plan(x, ws, hp, wp, tail=True)(x))
            assert np.array_equal(got.view(np.uint8), np.concatenate([want, tail], -1).view(np.uint8))
    a = arr((2, 3, 5, 4), 1)
    merged = np.asarray(windows.merge_heads_plan(a)(a))
    assert np.array_equal(merged.view(np.uint8), np.ascontiguousarray(
        np.asarray(a).transpose(0, 2, 1, 3).reshape(2, 5, 12)).view(np.uint8))
    src = arr((3, 4, 10), 0)[:, ::2, 2:8]
    dst = np.zeros((3, 2, 6), dt).view(host)
    assert windows.copy_rows(src, dst) is dst
    assert np.array_equal(np.asarray(dst).view(np.uint8), np.ascontiguousarray(src).view(np.uint8))


FORWARD_FAMILIES = {"ws": (0, 1), "wg": (0, 1), "mma": (0, 1), "win": (0, 1), "wgt": (2,), "tf32": (2,), "simt": (2, 3)}


@st.composite
def forward_problems(draw):
    family = draw(st.sampled_from(sorted(FORWARD_FAMILIES)))
    dt = draw(st.sampled_from(FORWARD_FAMILIES[family]))
    small = st.tuples(st.integers(1, 12), st.integers(1, 12))
    if draw(st.booleans()):
        k_size = draw(st.sampled_from([(1, 64), (2, 64), (2, 48), (1, 80), (2, 32)]))
        q_size = draw(st.sampled_from([k_size, (k_size[0] + 1, k_size[1]), (3, 20)]))
    else:
        k_size = draw(small)
        q_size = k_size if draw(st.booleans()) else draw(small)
    D = draw(st.sampled_from([8, 16, 24, 40, 56, 64, 72, 80, 96, 128]))
    terms = draw(st.booleans())
    fuse = terms and family in ("ws", "win") and draw(st.booleans())
    options = {}
    if family == "wg" and draw(st.booleans()):
        options = {"nwg": draw(st.sampled_from([1, 2])), "bn": draw(st.sampled_from([32, 64, 128]))}
    elif family == "mma":
        options = {"mw": draw(st.sampled_from([1, 2]))}
    elif family == "win" and draw(st.booleans()):
        options = {"spb": draw(st.integers(1, 4))}
    return family, dt, q_size, k_size, D, terms, fuse, options, draw(st.integers(0, 2**32 - 1))


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(problem=forward_problems())
def test_forward_families_on_drawn_problems(host_sm90, problem):
    """Every forward family, forced, on drawn problems that it accepts (q grid
    != k grid, head dims 8 to 128, terms given, computed by the kernel or
    absent, forced configurations): against the oracle's float64 attention of
    the same inputs."""
    import importlib

    import relattn
    from hypothesis import assume

    from relattn.backends.gpu import _device
    from relattn.backends.gpu.problem import Problem

    family, dt, q_size, k_size, D, terms, fuse, options, seed = problem
    rng = np.random.default_rng(seed)
    dtype = np.float64 if dt == 3 else DTYPES[dt]
    Sq, Sk = q_size[0] * q_size[1], k_size[0] * k_size[1]
    q, k, v = (rng.standard_normal((1, n, 2, D)).astype(dtype).transpose(0, 2, 1, 3) for n in (Sq, Sk, Sk))
    th = (0.3 * rng.standard_normal((2 * max(q_size[0], k_size[0]) - 1, D))).astype(dtype if fuse else np.float32)
    tw = (0.3 * rng.standard_normal((2 * max(q_size[1], k_size[1]) - 1, D))).astype(dtype if fuse else np.float32)
    fam = importlib.import_module(f"relattn.backends.gpu.families.{family}")
    host = host_sm90
    with relattn.gpu_float32_mode("fma" if family == "simt" else "3xtf32"):
        # what the planner asks before a forced family runs
        x = y = None
        if terms:
            x, y = (th, tw) if fuse else (np.zeros((1, 2, Sq, n), np.float32).view(host) for n in k_size)
        p = Problem.from_arrays(q.view(host), k.view(host), x, y, q_size if terms else None, k_size, D ** -0.5,
                                terms=not fuse)
        dev = _device.current()
        assume(fam.not_supported_reasons(p, dev, fuse) == [])
        assume(fam.config_reasons(p, fam.config(p, dev, fuse, options)) == [])
        got, c = _run_family(host, family, options, q, k, v, th, tw, q_size, k_size, terms, fuse)
    want = oracle.attention(q, k, v, th if terms else None, tw if terms else None,
                            q_size if terms else None, k_size if terms else None, scale=D ** -0.5)
    tol = {0: 2e-3, 1: 1e-2, 2: 2e-5, 3: 1e-12}[dt]
    assert _rel(got.astype(np.float64), want) <= tol, (family, c.describe())


@st.composite
def backward_problems(draw):
    dt = draw(st.sampled_from([0, 1, 2]))
    small = st.tuples(st.integers(1, 12), st.integers(1, 12))
    if draw(st.booleans()):
        k_size = draw(st.sampled_from([(1, 64), (2, 64), (2, 20)]))
        q_size = draw(st.sampled_from([k_size, (3, 20)]))
    else:
        k_size = draw(small)
        q_size = k_size if draw(st.booleans()) else draw(small)
    D = draw(st.sampled_from([8, 16, 24, 40, 56, 64, 72, 80, 96, 128] + ([3, 13] if dt == 2 else [])))
    kernels = draw(st.sampled_from(["auto", "mma", "wg"])) if dt < 2 else "auto"
    return dt, q_size, k_size, D, draw(st.booleans()), draw(st.booleans()), kernels, draw(st.integers(0, 2**32 - 1))


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(problem=backward_problems())
def test_fused_backward_on_drawn_problems(host_sm90, problem):
    """The fused backward (``bwd.cu``, ``bwd_wg.cu``, ``bwd32.cu``) as
    ``backward.fused_core_backward`` runs it on an sm_90a part, on drawn
    problems it accepts (q grid != k grid, head dims 3 to 128, terms or none,
    the forward's log-sum-exp or the row pass, each kernel form): against
    the float64 core of the same inputs."""
    from hypothesis import assume

    dt, q_size, k_size, D, terms, forward_lse, kernels, seed = problem
    rng = np.random.default_rng(seed)
    cast = DTYPES[dt]
    Sq = q_size[0] * q_size[1]
    q, k, v, dout, rel_h, rel_w = _backward_problem(rng, cast, q_size, k_size, D, terms)
    host, scale = host_sm90, D ** -0.5
    dev = [None if a is None else np.ascontiguousarray(a).view(host) for a in (q, k, v, rel_h, rel_w)]
    assume(backward.fused_reasons(*dev[:3], rel_h, k_size) == [])
    assume(kernels != "wg" or backward.wg_reasons(*dev[:3], rel_h, k_size) == [])
    out, want = _core_gradients(q, k, v, rel_h, rel_w, k_size, scale, dout)
    lse = None
    if forward_lse or dt == 2:
        lse = _lse2(q, k, rel_h, rel_w, k_size, scale).view(host)
    got = backward.fused_core_backward(*dev, k_size, scale, out.astype(cast).view(host), dout.view(host), lse=lse,
                                       kernels=kernels)
    # 16-bit: the training contract's 1e-2 (with the forward's log-sum-exp, delta = dO . O carries O's
    # rounding into the terms' gradients, sums of dS over part of a row: a few 1e-3 in float16 too)
    tol = 2e-5 if dt == 2 else 1e-2
    # each gradient's error against the size of what it sums: dS = P (dP - delta) cancels where the
    # weights concentrate (one key: dS = 0; k_h == 1: d_rel_h, a whole row's sum of dS, is 0), so its
    # summands' size is P (|dP| + |delta|)
    q64, k64, v64, do64 = (np.abs(a.astype(np.float64)) for a in (q, k, v, dout))
    logits = _logits(q, k, rel_h, rel_w, scale)
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    dp = np.abs(dout.astype(np.float64) @ v.astype(np.float64).swapaxes(-1, -2))
    dsz = prob * (dp + (prob * dp).sum(-1, keepdims=True))
    d4 = dsz.reshape(1, 2, Sq, *k_size)
    sizes = {"dq": scale * (dsz @ k64).max(), "dk": scale * (dsz.swapaxes(-1, -2) @ q64).max(),
             "dv": (prob.swapaxes(-1, -2) @ do64).max(), "d_rel_h": d4.sum(-1).max(), "d_rel_w": d4.sum(-2).max()}
    for name, g, w in zip(("dq", "dk", "dv", "d_rel_h", "d_rel_w"), got, want):
        assert (g is None) == (w is None), name
        if w is not None:
            err = np.abs(np.asarray(g, np.float64).reshape(w.shape) - w).max()
            assert err <= tol * max(np.abs(w).max(), sizes[name]), \
                (name, backward.kernel_forms(*dev[:3], rel_h, k_size, kernels))


@pytest.mark.parametrize("arch, dtype, tdtype, q_size, k_size, D, family", [
    (90, "bfloat16", "bfloat16", (14, 14), (14, 14), 64, "ws"),    # SAM-B's windows: terms fused
    (90, "float16", "float32", (2, 64), (2, 64), 64, "ws"),       # a slice of SAM's global grid
    (90, "bfloat16", "bfloat16", (3, 48), (2, 48), 64, "wg"),     # whole key rows of 48
    (90, "bfloat16", "bfloat16", (5, 7), (6, 9), 96, "win"),      # head_dim 96, a small key grid
    (90, "float16", "float16", (3, 30), (2, 40), 96, "mma"),      # head_dim 96: mma.sync
    (90, "float32", "float32", (7, 7), (7, 7), 64, "wgt"),
    (80, "bfloat16", "bfloat16", (14, 14), (14, 14), 64, "win"),  # an A100's windows
    (80, "float32", "float32", (2, 64), (2, 64), 40, "tf32"),
    (80, "float64", "float64", (3, 4), (5, 2), 8, "simt"),
])
def test_planner_on_the_host(host_sm90, monkeypatch, arch, dtype, tdtype, q_size, k_size, D, family):
    """``gpu.make_plan`` end to end on the host: the family the planner picks
    for the device (sm_90a or sm_80), the terms computed by the terms kernel
    or inside the attention kernel (tables resized where their length is not
    SAM's), and the run, against the oracle's float64 attention."""
    from relattn.backends import gpu
    from relattn.backends.gpu import _device

    if arch == 80:
        monkeypatch.setattr(_device, "_devices", {0: _device.Device(0, 80, 108, 163 * 1024, "not sm_90a")})
    dt = {"bfloat16": DTYPES[1], "float16": np.float16, "float32": np.float32, "float64": np.float64}
    rng = np.random.default_rng(D + arch)
    Sq, Sk = q_size[0] * q_size[1], k_size[0] * k_size[1]
    q, k, v = (rng.standard_normal((1, n, 2, D)).astype(dt[dtype]).transpose(0, 2, 1, 3) for n in (Sq, Sk, Sk))
    lh = 2 * max(q_size[0], k_size[0]) - 1
    th = (0.3 * rng.standard_normal((lh + 4, D))).astype(dt[tdtype])   # resized to lh rows
    tw = (0.3 * rng.standard_normal((2 * max(q_size[1], k_size[1]) - 1, D))).astype(dt[tdtype])
    host = host_sm90
    plan = gpu.make_plan(q.view(host), k.view(host), v.view(host), th.view(host), tw.view(host), q_size, k_size,
                         D ** -0.5)
    assert plan.family == family, plan.describe()
    got = np.asarray(plan.run(q.view(host), k.view(host), v.view(host), th.view(host), tw.view(host)))
    want = oracle.attention(q, k, v, th, tw, q_size, k_size, scale=D ** -0.5)
    tol = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 2e-5, "float64": 1e-12}[dtype]
    assert got.dtype == q.dtype and _rel(got.astype(np.float64), want) <= tol, plan.describe()


@pytest.mark.parametrize("kind", ["mma", "wg", "ws", "bwd", "bwd_wg"])
def test_pipelined_stages(host_sm90, kind):
    """Kernels whose tiles pass through two shared-memory stages, on three
    tiles or more, so that a stage is refilled while the pipeline runs
    (the forward's ``mma.cu`` and ``wg.cu``, the backward's ``bwd.cu`` and
    ``bwd_wg.cu``): against float64. ``test_pipelined_stages_under_stress``
    runs these again with the copies landing at issue and threads pausing at
    random, where a missing barrier before a stage's refill shows (for
    ``ws.cu``: its producer's and consumers' waits on the stages' mbarriers)."""
    rng = np.random.default_rng(11)
    q_size, k_size, D = (3, 64), (4, 64), 64   # three query tiles (dk / dv's loop), four key tiles
    if kind == "ws":   # four stages of K / V: six key tiles, and two row tiles of one consumer warpgroup
        q_size, k_size = (2, 64), (6, 64)
    if kind in ("mma", "wg", "ws"):
        q, k, v, th, tw = _forward_problem(rng, 1, q_size, k_size, D)
        got, _ = _run_family(host_sm90, kind, {"nc": 1} if kind == "ws" else {}, q, k, v, th, tw, q_size, k_size)
        want = oracle.attention(q, k, v, th, tw, q_size, k_size, scale=D ** -0.5)
        assert _rel(got.astype(np.float64), want) <= 1e-2
        return
    q, k, v, dout, rel_h, rel_w = _backward_problem(rng, DTYPES[1], q_size, k_size, D, True)
    out, want = _core_gradients(q, k, v, rel_h, rel_w, k_size, D ** -0.5, dout)
    dev = [np.ascontiguousarray(a).view(host_sm90) for a in (q, k, v, rel_h, rel_w)]
    got = backward.fused_core_backward(*dev, k_size, D ** -0.5, out.astype(DTYPES[1]).view(host_sm90),
                                       dout.view(host_sm90), kernels="mma" if kind == "bwd" else "wg")
    for name, g, w in zip(("dq", "dk", "dv", "d_rel_h", "d_rel_w"), got, want):
        assert _rel(np.asarray(g).reshape(w.shape), w) <= 1e-2, name


@pytest.mark.parametrize("env", [{"SIMT_EMU_JITTER": "1", "SIMT_EMU_FILL": "0x41"}, {"SIMT_EMU_FILL": "0x41"}],
                         ids=["jitter", "finite-fill"])
def test_pipelined_stages_under_stress(env):
    """:func:`test_pipelined_stages` in processes where the emulation looks
    for races and missing waits: with ``SIMT_EMU_JITTER`` the copies land at
    issue (the earliest the GPU may land them) and threads pause up to a
    millisecond at random before barriers and shared-memory reads, so a
    kernel without the barrier that keeps a stage from being refilled while
    other warps still read it fails (``bwd.cu``'s dq kernel without it did,
    with each of three seeds); copies otherwise land at the latest (at the
    wait), and a finite fill of shared memory (``SIMT_EMU_FILL``) keeps
    ``ws.cu``'s recompute of non-finite rows from hiding a tile read before
    its mbarrier wait."""
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "test_pipelined_stages and not stress"], capture_output=True, text=True,
                         env=dict(os.environ, **env), timeout=900)
    assert run.returncode == 0 and "5 passed" in run.stdout, run.stdout[-3000:]
