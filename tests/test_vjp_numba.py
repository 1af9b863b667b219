"""The fused CPU backward: ``rel_pos_attention_vjp(..., backend="numba")``.

Checked against the reference pullback (``backend="numpy"``) on random
problems, for masked keys, half precision, its forward's bits (those of the
numba forward) and its memory (no Sq x Sk buffer: RSS sampled in a
subprocess while the pullback of a 2048-token problem runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import relattn
from relattn import backends, functional
from test_vjp import HALF_DTYPES, NAMES, _assert_close_where_finite, _draw_mask, _floor, _mask_keys, _rel_err
from test_vjp import _vjp as reference_vjp
from test_vjp import problems as reference_problems

if backends.get("numba").unavailable_reason() is not None:  # pragma: no cover
    pytest.skip(f"numba unavailable: {backends.get('numba').unavailable_reason()}", allow_module_level=True)

SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def problems(max_side=14):
    """The reference's problems, larger: head dims 1..80, sequences up to
    max_side**2 (several key tiles)."""
    return reference_problems(max_side=max_side, max_heads=3, head_dims=(1, 3, 8, 16, 64, 80))


def _vjp(problem, arrays=None, **kw):   # every call here names its backend
    return reference_vjp(problem, arrays, **kw)


def _cast(arrays, dtype):
    return [None if a is None else a.astype(dtype) for a in arrays]


@settings(SLOW, max_examples=30)
@given(problem=problems(), dtype=st.sampled_from([np.dtype(np.float64), np.dtype(np.float32)]),
       resize_dtype=st.sampled_from(["float32", "table"]))
def test_gradients_match_the_reference(problem, dtype, resize_dtype):
    arrays = _cast(problem["arrays"], dtype)
    out, pullback = _vjp(problem, arrays, backend="numba", resize_dtype=resize_dtype)
    out_ref, pullback_ref = _vjp(problem, arrays, backend="numpy", resize_dtype=resize_dtype)
    assert out.dtype == dtype and out.shape == out_ref.shape
    dout = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
    tol = 1e-10 if dtype == np.float64 else 1e-5
    assert _rel_err(out, out_ref) <= tol, problem["what"]
    ref = pullback_ref(dout)
    # float32: dq, dk and the tables' gradients come from dS = P * (dP - D), a
    # cancellation known to ~1e-7 of the terms that cancelled (see test_vjp)
    floor = _floor(ref, 1e-3 if dtype == np.float64 else 1e-1)
    # Gradients zero in exact arithmetic (softmax is shift-invariant): all but
    # dv with one key, a table's with one key along its side or one stored row.
    # Both sides are rounding noise there: 10x the tolerance (as test_vjp).
    (k_h, k_w), sk = problem["k_size"], problem["k_size"][0] * problem["k_size"][1]
    rows = [None if a is None else a.shape[0] for a in arrays[3:]]
    zero = {"q": sk == 1, "k": sk == 1, "v": False,
            "rel_pos_h": sk == 1 or k_h == 1 or rows[0] == 1,
            "rel_pos_w": sk == 1 or k_w == 1 or rows[1] == 1}
    for name, a, got, want in zip(NAMES, arrays, pullback(dout), ref):
        if a is None:
            assert got is None and want is None, name
            continue
        assert got.dtype == a.dtype and got.shape == a.shape, name
        err = _rel_err(got, want, floor)
        assert err <= (10 * tol if zero[name] else tol), f"{name}: {err:.3g} ({problem['what']})"


@settings(SLOW, max_examples=10)
@given(problem=problems(max_side=6))
def test_out_is_the_numba_forward_and_auto_is_fused(problem):
    arrays = problem["arrays"]
    want = relattn.rel_pos_attention(*arrays, q_size=problem["q_size"], k_size=problem["k_size"],
                                     backend="numba")
    for backend in ("numba", "auto"):
        out, pullback = _vjp(problem, backend=backend)
        assert np.array_equal(out, want), (backend, problem["what"])
        assert pullback.__qualname__.startswith("_pullback_numba"), backend


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_chunked_terms_rows(monkeypatch, dtype):
    """Terms computed by chunks of query rows (tiny budget): the forward still
    is the numba backend's, and the gradients the reference's."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 2, 30, 8)).astype(dtype) for _ in range(3))
    th, tw = (0.5 * rng.standard_normal((n, 8)).astype(dtype) for n in (7, 13))
    monkeypatch.setattr(functional, "TERMS_BUDGET", 1024)
    functional._plans.clear()
    try:
        want = relattn.rel_pos_attention(q, k, v, th, tw, q_size=(5, 6), backend="numba")
        out, pullback = relattn.rel_pos_attention_vjp(q, k, v, th, tw, q_size=(5, 6), backend="numba")
    finally:
        functional._plans.clear()
    assert np.array_equal(out, want)
    dout = rng.standard_normal(out.shape).astype(dtype)
    ref = relattn.rel_pos_attention_vjp(q, k, v, th, tw, q_size=(5, 6), backend="numpy")[1](dout)
    tol = 1e-10 if dtype == np.float64 else 1e-5
    for name, got, want in zip(NAMES, pullback(dout), ref):
        assert _rel_err(got, want, _floor(ref, 1e-1)) <= tol, name


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("tables", [True, False])
def test_half_precision_runs_and_returns_its_dtypes(dtype, tables):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 2, 12, 8)).astype(dtype)
    k, v = (rng.standard_normal((1, 2, 6, 8)).astype(dtype) for _ in range(2))
    th, tw = (0.5 * rng.standard_normal((n, 8)).astype(dtype) for n in (9, 4)) if tables else (None, None)
    inputs = [q, k, v, th, tw]
    out, pullback = relattn.rel_pos_attention_vjp(*inputs, q_size=(3, 4), k_size=(2, 3), backend="numba")
    assert out.dtype == dtype
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = pullback(dout)
    ref = relattn.rel_pos_attention_vjp(*inputs, q_size=(3, 4), k_size=(2, 3), backend="numpy")[1](dout)
    for name, a, g, want in zip(NAMES, inputs, grads, ref):
        if a is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.shape == a.shape, name
        assert np.all(np.isfinite(g.astype(np.float32))), name
        assert _rel_err(g, want, _floor(ref, 1e-1)) <= 1e-2, name   # both float32 inside, one rounding at the end


@settings(SLOW, max_examples=15)
@given(problem=problems(max_side=6), data=st.data())
def test_masked_keys_match_the_reference(problem, data):
    """Keys masked with -inf through k (a channel every query weights
    positively): same finite entries as the reference, and equal there; the
    masked keys' dk / dv rows are zero. A fully masked problem gives NaN, as
    the reference."""
    sk = problem["arrays"][1].shape[2]
    masked = _draw_mask(data, sk)
    all_masked = data.draw(st.booleans()) and sk > 1
    if all_masked:
        masked[:] = True
    problem = dict(problem, arrays=_mask_keys(problem["arrays"], masked))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out, pullback = _vjp(problem, backend="numba", resize_dtype="table")
        out_ref, pullback_ref = _vjp(problem, backend="numpy", resize_dtype="table")
        dout = np.random.default_rng(7).standard_normal(out.shape)
        grads, ref = pullback(dout), pullback_ref(dout)
    assert np.array_equal(np.isnan(out), np.isnan(out_ref))
    if all_masked:
        assert np.all(np.isnan(out))
    _assert_close_where_finite(grads, ref, _floor(ref, 1e-3), 1e-10, problem["what"])
    if not all_masked:
        dk, dv = grads[1], grads[2]
        assert np.all(dk[:, :, masked] == 0) and np.all(dv[:, :, masked] == 0)


def test_cupy_backend_still_has_no_backward():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 1, 4, 2)) for _ in range(3))
    with pytest.raises(relattn.BackendError, match="backward is not available"):
        relattn.rel_pos_attention_vjp(q, k, v, backend="cupy")


_MEMORY_SCRIPT = textwrap.dedent("""
    import os, sys, threading, time
    import numpy as np
    import relattn

    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def peak_growth(fn):
        base, peak, done = rss(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.0005)

        t = threading.Thread(target=sample)
        t.start()
        try:
            fn()
        finally:
            done.set()
            t.join()
        return max(peak[0], rss()) - base

    backend = sys.argv[1]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 2048, 16)) for _ in range(3))
    th, tw = (0.5 * rng.standard_normal((n, 16)) for n in (63, 127))
    small = [a[..., :16, :] for a in (q, k, v)]
    relattn.rel_pos_attention_vjp(*small, th, tw, q_size=(4, 4), backend=backend)[1](np.ones((1, 1, 16, 16)))
    out, pullback = relattn.rel_pos_attention_vjp(q, k, v, th, tw, q_size=(32, 64), backend=backend)
    dout = rng.standard_normal(out.shape)
    print(peak_growth(lambda: pullback(dout)))
""")


def test_pullback_allocates_no_sq_by_sk_buffer():
    """2048 x 2048 float64 logits are 32 MiB. The fused pullback's peak RSS
    growth stays well under that (its outputs and copies, Sq x d, are 256 KiB
    each: some dozen of them);
    the reference's, measured the same way, does not (so the sampling sees
    such buffers)."""
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    growth = {}
    for backend in ("numba", "numpy"):
        run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, backend], capture_output=True,
                             text=True, env=env, timeout=120)
        assert run.returncode == 0, run.stderr
        growth[backend] = int(run.stdout.split()[-1])
    sxs = 2048 * 2048 * 8
    assert growth["numba"] < sxs / 4, growth
    assert growth["numpy"] > sxs, growth


def test_read_only_inputs():
    """Read-only views (as JAX or np.broadcast_to hand out) are differentiated
    like writable ones."""
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(1, 2, 12, 8)] * 3 + [(5, 8), (7, 8)]]
    want_out, want_pb = relattn.rel_pos_attention_vjp(*arrays, q_size=(3, 4), backend="numba")
    for a in arrays:
        a.flags.writeable = False
    out, pullback = relattn.rel_pos_attention_vjp(*arrays, q_size=(3, 4), backend="numba")
    dout = np.ones_like(out)
    dout.flags.writeable = False
    np.testing.assert_array_equal(out, want_out)
    for got, want in zip(pullback(dout), want_pb(np.ones_like(out))):
        np.testing.assert_array_equal(got, want)
