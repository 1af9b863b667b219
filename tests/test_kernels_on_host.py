"""The SIMT kernels of the terms' pullback (``cuda/bwd_terms.cu``), run on the
host by :mod:`simt_emu` (each CUDA thread a host thread, barriers real),
against a float64 model built from the oracle's gather index.

These check the kernels' indexing and arithmetic on any machine with a C++
compiler, with the launch parameters the GPU backward plans
(``relattn.backends.gpu.backward``); the same kernels on a GPU are tested in
``test_vjp_gpu.py``. They skip without a C++20 compiler.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
import simt_emu
from relattn.autodiff import _gather_slots
from relattn.backends.gpu import _build, backward
from relattn.relpos import _device_index32

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


def _kernels_pullback(emu, q, core, dh, dw, th, tw, q_size, k_size):
    """dq and the tables' gradients by the gather, side, grid and scatter
    kernels, launched as ``backward.terms_dq`` and ``tables_pullback`` plan them."""
    (qh, qw), (kh, kw) = q_size, k_size
    nbh, Sq, D = q.shape
    dt, tdt = backward._terms_dt_of(q.dtype), backward._terms_dt_of(th.dtype)
    names, nj = backward._terms_names(), backward._column_groups(D)
    tables = []
    for t, a, b in ((th, qh, kh), (tw, qw, kw)):
        r = np.full((a, b, D), np.nan, np.float32)
        emu.launch(names[("gather", tdt, ())], -(-a * b * D // 256), 256, 0,
                   [_raw(t), _device_index32(np, a, b), r, np.int32(a * b), np.int32(D)])
        tables.append(r)
    rh, rw = tables
    acc = core.copy()
    dq = acc if dt == 2 else np.full(q.shape, 0xffff, np.uint16)
    for side, last, d3, r, dst in (("w", 0, dw, rw, acc), ("h", 1, dh, rh, dq)):
        na, nb, kl, sa, sb = backward._side(side, q_size, k_size)
        emu.launch(names[("side", dt, (last, nj))], (-(-(nbh * nb) // 64), na), 128, 0,
                   [d3, r, acc, dst] + [np.int32(n) for n in (kl, nbh, Sq, nb, sa, sb, D)])
    grads = []
    for side, d3 in (("h", dh), ("w", dw)):
        na, nb, kl, sa, sb = backward._side(side, q_size, k_size)
        ki = 2 if kl <= 16 else 8
        tiles = -(-kl // (8 * ki))
        splits = backward._terms_split(na, tiles, nbh * nb, kl, D)
        rows = backward._TERMS_GRID_ROWS
        smem = 2 * rows * (8 * ki * 4 + 64 * nj * q.dtype.itemsize) + 2 * rows * 8
        part = np.full((splits, na, kl, D), np.nan, np.float32)
        emu.launch(names[("grid", dt, (ki, nj))], (na, tiles, splits), 128, smem,
                   [d3, _raw(q), part] + [np.int32(n) for n in (na, kl, nbh, Sq, nb, sa, sb, D, splits)])
        slots = np.ascontiguousarray(_gather_slots(na, kl), dtype=np.int64)
        width, trows = slots.shape
        g = np.full((trows, D), np.nan, np.float32)
        emu.launch(names[("scatter", 0, ())], trows, 256, 0,
                   [part, slots, g, np.int32(width), np.int32(trows), np.int64(na * kl), np.int64(na * kl),
                    np.int32(D), np.int32(splits)])
        grads.append(g)
    return (dq.view(DTYPES[dt]) if dt < 2 else dq), grads[0], grads[1]


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
def test_terms_pullback_kernels_match_the_model(emu, nbh, q_size, k_size, D, dt, tdt, seed):
    problem = _problem(np.random.default_rng(seed), nbh, q_size, k_size, D, dt, tdt)
    dq, gh, gw = _kernels_pullback(emu, *problem, q_size, k_size)
    rdq, rgh, rgw = _model(*problem, q_size, k_size)
    assert _rel(dq, rdq) <= ROUNDING[dt]
    assert _rel(gh, rgh) <= 1e-5 and _rel(gw, rgw) <= 1e-5


@pytest.mark.parametrize("nbh, q_size, k_size, D", [
    (2, (14, 14), (14, 14), 64),   # SAM's windows
    (1, (20, 3), (24, 2), 16),     # more than 16 keys a side: the grid kernel's 64-key tiles
    (70, (2, 2), (2, 2), 8),       # rows enough for the grid kernel to split them
])
def test_terms_pullback_kernels_at_the_plans_edges(emu, nbh, q_size, k_size, D):
    problem = _problem(np.random.default_rng(7), nbh, q_size, k_size, D, 1, 2)
    dq, gh, gw = _kernels_pullback(emu, *problem, q_size, k_size)
    rdq, rgh, rgw = _model(*problem, q_size, k_size)
    assert _rel(dq, rdq) <= ROUNDING[1]
    assert _rel(gh, rgh) <= 1e-5 and _rel(gw, rgw) <= 1e-5
    if nbh == 70:
        na, nb, kl, _, _ = backward._side("h", q_size, k_size)
        assert backward._terms_split(na, 1, nbh * nb, kl, D) > 1
