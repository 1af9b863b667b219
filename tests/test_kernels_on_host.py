"""The SIMT kernels of the terms' pullback (``cuda/bwd_terms.cu``: the gather,
side, grid and scatter kernels), run on the host by :mod:`simt_emu` (each
CUDA thread a host thread, barriers real), against a float64 model built
from the oracle's gather index.

These check the kernels' indexing and arithmetic on any machine with a C++
compiler, launched by the GPU backward's own Python
(``relattn.backends.gpu.backward``: its plans, its CuPy calls made on host
arrays, its argument blocks handed to a stand-in for the driver); the same
kernels on a GPU are tested in ``test_vjp_gpu.py``. They skip without a
C++20 compiler.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
import simt_emu
from relattn.backends.gpu import _build, backward

pytestmark = pytest.mark.skipif(simt_emu.compiler() is None, reason="no C++ compiler for the host emulation")

DTYPES = {0: np.float16, 1: ml_dtypes.bfloat16, 2: np.float32}
# the relative error of a value rounded once to each type, with float32 sums under it
ROUNDING = {0: 2.0 ** -11 + 1e-5, 1: 2.0 ** -8 + 1e-5, 2: 1e-5}


@pytest.fixture(scope="module")
def emu():
    try:
        return simt_emu.Emulator(_build.read_cuda("bwd_terms.cu"), list(backward._terms_names().values()))
    except RuntimeError as exc:   # pragma: no cover - a compiler without C++20
        pytest.skip(str(exc))


@pytest.fixture
def host_gpu(emu, monkeypatch):
    """The GPU backward's terms' pullback planned and launched as on a GPU,
    its arrays host arrays and its launches :class:`simt_emu.HostDriver` 's;
    the backend's caches of device arrays and launches kept apart."""
    import sys

    from relattn import relpos
    from relattn.backends.gpu import _build

    driver = simt_emu.HostDriver(emu)
    monkeypatch.setitem(sys.modules, "cupy", simt_emu.host_cupy())
    monkeypatch.setattr(_build, "_libcuda", lambda: driver)
    monkeypatch.setattr(backward, "_terms_kernel", lambda kind, dt, variant=(), smem=0: driver.function(
        backward._terms_names()[(kind, dt if kind != "scatter" else 0, variant)]))
    monkeypatch.setattr(backward, "_launches", {})
    monkeypatch.setattr(relpos, "_device_cache", {})
    return simt_emu.HostArray


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
