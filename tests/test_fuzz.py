"""Fuzzing every public function with malformed (and oddly-shaped valid) arguments.

The contract checked here (see docs/guarantees.md): every call either returns
the right answer or raises ``ValueError``/``TypeError`` whose message begins
with the name of the offending argument -- never another exception type, a
hang, a huge allocation, or a silently wrong result.

* Valid oddities (non-contiguous and negative-stride views, read-only arrays,
  zero-size batches, integral floats as sizes) must give the answer of the
  plain contiguous call.
* Absurd sizes (``q_size=(10**9, 10**9)``, ``window_size=10**9``, ...) must be
  refused quickly, before anything large is allocated.

Attention-core tests run once per backend (the ``backend`` fixture of
``conftest.py`` skips the unavailable ones).
"""

from __future__ import annotations

import math
import os
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import oracle
import relattn

FAST_S = 2.0  # seconds within which a refusal must come back


def _rng(seed=0):
    return np.random.default_rng(seed)


def _qkv(b=1, h=2, s=12, d=8, dtype=np.float32, seed=0, sk=None):
    rng = _rng(seed)
    sk = s if sk is None else sk
    q = rng.standard_normal((b, h, s, d)).astype(dtype)
    k = rng.standard_normal((b, h, sk, d)).astype(dtype)
    v = rng.standard_normal((b, h, sk, d)).astype(dtype)
    return q, k, v


def _tables(lh=5, lw=7, d=8, dtype=np.float32, seed=1):
    rng = _rng(seed)
    return (0.3 * rng.standard_normal((lh, d))).astype(dtype), (0.3 * rng.standard_normal((lw, d))).astype(dtype)


def outcome(fn, names):
    """Run ``fn``; return its result, or None when it raised a well-formed error.

    Well-formed: ``ValueError``/``TypeError`` raised within ``FAST_S`` seconds
    whose message starts with (a list containing) one of ``names``. Any other
    exception propagates and fails the test.
    """
    if isinstance(names, str):
        names = (names,)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return fn()
    except (ValueError, TypeError) as exc:
        elapsed = time.perf_counter() - start
        head = str(exc).split(":", 1)[0]
        assert any(n in head for n in names), f"{type(exc).__name__} does not name {names}: {exc}"
        assert elapsed < FAST_S, f"refusal took {elapsed:.2f}s: {exc}"
        return None


def must_raise(fn, names):
    out = outcome(fn, names)
    assert out is None, f"expected a ValueError/TypeError naming {names}, got a result"


# ---------------------------------------------------------------------------
# Bad values for scalar / pair arguments
# ---------------------------------------------------------------------------

BAD_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.5, 2.5, -1.0, 0.0, 1e300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**20), 0),
    st.integers(10**9, 10**30),
    st.text(max_size=3),
    st.sampled_from([b"3", 3 + 0j, [3], (3,), {3: 3}, object(), np.float64(np.nan),
                     np.int64(-2), np.array([3]), np.array(3.5)]),
)
ANY_SCALAR = st.one_of(BAD_SCALARS, st.integers(1, 12), st.sampled_from([3.0, np.int32(4), np.float32(2.0)]))


def _as_valid_int(x):
    """The int the library should accept for ``x``, or None if it must refuse it."""
    if isinstance(x, (bool, np.bool_)) or isinstance(x, (str, bytes, complex, list, tuple, dict)):
        return None
    if isinstance(x, np.ndarray) and x.ndim > 0:
        return None
    try:
        f = float(x)
    except Exception:
        return None
    if not math.isfinite(f) or not f.is_integer() or f < 1:
        return None
    return int(f)


# ---------------------------------------------------------------------------
# rel_pos_attention / explain: valid views give the contiguous answer
# ---------------------------------------------------------------------------


def _views(a, kind, rng):
    """A view of a copy of ``a`` with the same values, laid out per ``kind``."""
    if kind == "contiguous":
        return a.copy()
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "negative":  # reversed storage along every axis, read back reversed
        rev = np.ascontiguousarray(a[::-1, ::-1, ::-1, ::-1])
        return rev[::-1, ::-1, ::-1, ::-1]
    if kind == "strided":  # every other element of a bigger buffer
        big = np.zeros(tuple(2 * n for n in a.shape), a.dtype)
        big[::2, ::2, ::2, ::2] = a
        return big[::2, ::2, ::2, ::2]
    if kind == "transposed":  # (B, S, H, d) storage, the layout Attention produces
        return np.ascontiguousarray(a.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    if kind == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b
    if kind == "broadcast":  # zero strides along the batch axis (when the batch entries agree)
        view = np.broadcast_to(a[:1], a.shape)
        return view if np.array_equal(view, a) else _views(a, "strided", rng)
    raise AssertionError(kind)


VIEW_KINDS = ["fortran", "negative", "strided", "transposed", "readonly", "broadcast"]


@settings(max_examples=12)
@given(
    data=st.data(),
    b=st.integers(0, 2),
    h=st.integers(1, 2),
    grid=st.sampled_from([(1, 1), (2, 3), (3, 2), (4, 4)]),
    d=st.sampled_from([1, 3, 8]),
    rel=st.booleans(),
)
def test_views_match_contiguous(backend, data, b, h, grid, d, rel):
    s = grid[0] * grid[1]
    q, k, v = _qkv(b, h, s, d, seed=data.draw(st.integers(0, 99)))
    if data.draw(st.booleans(), "broadcast batch"):
        q, k, v = (np.ascontiguousarray(np.broadcast_to(a[:1], a.shape)) if b else a for a in (q, k, v))
    th, tw = _tables(2 * grid[0] - 1, 2 * grid[1] - 1, d) if rel else (None, None)
    args = dict(q_size=grid if rel else None)
    want = relattn.rel_pos_attention(q, k, v, th, tw, backend=backend, **args)
    assert want.shape == (b, h, s, d) and want.dtype == np.float32
    kinds = [data.draw(st.sampled_from(VIEW_KINDS), name) for name in ("q", "k", "v")]
    rng = _rng(0)
    qv, kv, vv = (_views(a, kind, rng) for a, kind in zip((q, k, v), kinds))
    if rel:
        th, tw = th[::-1].copy()[::-1], np.asfortranarray(tw)
        th.flags.writeable = False
    got = relattn.rel_pos_attention(qv, kv, vv, th, tw, backend=backend, **args)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if b:
        ref = oracle.attention(q, k, v, th, tw, grid if rel else None, grid if rel else None)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_zero_size_batch_and_heads(backend):
    th, tw = _tables()
    for b, h in [(0, 2), (1, 0), (0, 0)]:
        q, k, v = _qkv(b, h)
        out = relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), backend=backend)
        assert out.shape == (b, h, 12, 8) and out.dtype == np.float32
        out = relattn.rel_pos_attention(q, k, v, backend=backend)
        assert out.shape == (b, h, 12, 8)
        assert "runs these inputs" in relattn.explain(q, k, v, th, tw, (3, 4), backend=backend)


# ---------------------------------------------------------------------------
# rel_pos_attention: malformed arguments
# ---------------------------------------------------------------------------


def _attn_cases():
    q, k, v = _qkv()
    th, tw = _tables()
    good = dict(q=q, k=k, v=v, rel_pos_h=th, rel_pos_w=tw, q_size=(3, 4))
    bad = {
        "q 3-D": (dict(q=q[0]), "q"),
        "q 5-D": (dict(q=q[None]), "q"),
        "k 3-D": (dict(k=k[0]), "k"),
        "v 2-D": (dict(v=v[0, 0]), "v"),
        "k batch differs": (dict(k=np.concatenate([k, k])), "k"),
        "k heads differ": (dict(k=k[:, :1]), "k"),
        "k head_dim differs": (dict(k=k[..., :4]), "k"),
        "v length differs from k": (dict(v=v[:, :, :6]), "v"),
        "v head_dim differs": (dict(v=v[..., :4]), "v"),
        "Sq vs q_size": (dict(q_size=(3, 3)), "q_size"),
        "Sk vs k_size": (dict(k=k[:, :, :6], v=v[:, :, :6]), "k_size"),
        "k_size product": (dict(k_size=(2, 5)), "k_size"),
        "table head_dim": (dict(rel_pos_h=th[:, :4]), "rel_pos_h"),
        "table w head_dim": (dict(rel_pos_w=np.zeros((7, 9), np.float32)), "rel_pos_w"),
        "table 1-D": (dict(rel_pos_w=tw[0]), "rel_pos_w"),
        "table 3-D": (dict(rel_pos_h=th[None]), "rel_pos_h"),
        "table empty": (dict(rel_pos_h=th[:0]), "rel_pos_h"),
        "only one table": (dict(rel_pos_w=None), "rel_pos_w"),
        "no q_size": (dict(q_size=None), "q_size"),
        "q_size not a pair": (dict(q_size=(3, 4, 1)), "q_size"),
        "q_size scalar": (dict(q_size=12), "q_size"),
        "q_size huge": (dict(q_size=(10**9, 10**9)), "q_size"),
        "k_size huge": (dict(k_size=(10**9, 10**9)), "k_size"),
        "q_size nan": (dict(q_size=(math.nan, 4)), "q_size"),
        "q_size inf": (dict(q_size=(3, math.inf)), "q_size"),
        "q_size negative": (dict(q_size=(-3, -4)), "q_size"),
        "q_size fractional": (dict(q_size=(1.5, 8)), "q_size"),
        "q_size strings": (dict(q_size=("3", "4")), "q_size"),
        "q_size string": (dict(q_size="34"), "q_size"),
        "q_size bools": (dict(q_size=(True, True)), "q_size"),
        "q None": (dict(q=None), "q"),
        "k None": (dict(k=None), "k"),
        "q int": (dict(q=q.astype(np.int32)), "q"),
        "k bool": (dict(k=k.astype(bool)), "k"),
        "v complex": (dict(v=v.astype(np.complex64)), "v"),
        "q object": (dict(q=q.astype(object)), "q"),
        "q string": (dict(q="query"), "q"),
        "q string array": (dict(q=q.astype(str)), "q"),
        "q ragged list": (dict(q=[[1.0], [1.0, 2.0]]), "q"),
        "table int": (dict(rel_pos_h=th.astype(np.int64)), "rel_pos_h"),
        "table complex": (dict(rel_pos_w=tw.astype(complex)), "rel_pos_w"),
        "table string": (dict(rel_pos_h="table"), "rel_pos_h"),
        "mixed dtypes": (dict(k=k.astype(np.float64)), ("q", "k", "v")),
        "mixed half": (dict(q=q.astype(np.float16)), ("q", "k", "v")),
        "zero queries": (dict(q=q[:, :, :0], q_size=None, rel_pos_h=None, rel_pos_w=None), "q"),
        "zero head_dim": (dict(q=q[..., :0], k=k[..., :0], v=v[..., :0], rel_pos_h=None,
                               rel_pos_w=None, q_size=None), "q"),
    }
    return good, bad


@pytest.mark.parametrize("case", sorted(_attn_cases()[1]))
def test_rel_pos_attention_malformed(backend, case):
    good, bad = _attn_cases()
    change, names = bad[case]
    kwargs = {**good, **change}
    must_raise(lambda: relattn.rel_pos_attention(**kwargs, backend=backend), names)
    must_raise(lambda: relattn.explain(**kwargs, backend=backend), names)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, "0.5", None.__class__, [0.5], 1e300, True])
def test_rel_pos_attention_bad_scale(backend, scale):
    q, k, v = _qkv()
    must_raise(lambda: relattn.rel_pos_attention(q, k, v, scale=scale, backend=backend), "scale")


def test_float64_allows_large_scale(backend):
    q, k, v = (a.astype(np.float64) * 1e-300 for a in _qkv())
    out = relattn.rel_pos_attention(q, k, v, scale=1e300, backend=backend)
    np.testing.assert_allclose(out, oracle.attention(q, k, v, scale=1e300), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bad", ["nope", None, 3, ["numpy"], "NUMPY"])
def test_bad_backend_name(bad):
    q, k, v = _qkv()
    must_raise(lambda: relattn.rel_pos_attention(q, k, v, backend=bad), "backend")
    must_raise(lambda: relattn.explain(q, k, v, backend=bad), "backend")
    must_raise(lambda: relattn.Attention(8, 2, backend=bad), "backend")


@settings(max_examples=30)
@given(a=ANY_SCALAR, b=ANY_SCALAR, which=st.sampled_from(["q_size", "k_size"]))
def test_sizes_fuzz(backend, a, b, which):
    q, k, v = _qkv()
    th, tw = _tables()
    kwargs = dict(q_size=(3, 4))
    kwargs[which] = (a, b)
    out = outcome(lambda: relattn.rel_pos_attention(q, k, v, th, tw, backend=backend, **kwargs), which)
    ia, ib = _as_valid_int(a), _as_valid_int(b)
    if out is None:
        assert ia is None or ib is None or ia * ib != 12, f"{which}=({a!r}, {b!r}) was refused"
        return
    assert ia is not None and ib is not None and ia * ib == 12, f"{which}=({a!r}, {b!r}) was accepted"
    qs = (ia, ib) if which == "q_size" else (3, 4)
    ks = (ia, ib) if which == "k_size" else qs
    np.testing.assert_allclose(out, oracle.attention(q, k, v, th, tw, qs, ks), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# relpos: resize_rel_pos, get_rel_pos, decomposed_rel_pos
# ---------------------------------------------------------------------------


@settings(max_examples=30)
@given(length=ANY_SCALAR)
def test_resize_rel_pos_length_fuzz(length):
    table = _tables()[0]
    out = outcome(lambda: relattn.resize_rel_pos(table, length), "length")
    want = _as_valid_int(length)
    if out is None:
        assert want is None or want > 10**8, f"length={length!r} was refused"
    else:
        assert want is not None and out.shape == (want, 8)
        np.testing.assert_allclose(out, oracle.linear_resize(table, want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("table, names", [
    (None, "rel_pos"), ("abc", "rel_pos"), (np.zeros(5, np.float32), "rel_pos"),
    (np.zeros((5, 2, 2), np.float32), "rel_pos"), (np.zeros((0, 4), np.float32), "rel_pos"),
    (np.zeros((5, 4), np.int32), "rel_pos"), (np.zeros((5, 4), bool), "rel_pos"),
    (np.zeros((5, 4), complex), "rel_pos"), (np.zeros((5, 4), object), "rel_pos"),
])
def test_relpos_bad_tables(table, names):
    must_raise(lambda: relattn.resize_rel_pos(table, 9), names)
    must_raise(lambda: relattn.get_rel_pos(3, 3, table), names)
    q = np.zeros((2, 6, 4), np.float32)
    good = np.zeros((5, 4), np.float32)
    must_raise(lambda: relattn.decomposed_rel_pos(q, table, good, (2, 3), (2, 3)), "rel_pos_h")
    must_raise(lambda: relattn.decomposed_rel_pos(q, good, table, (2, 3), (2, 3)), "rel_pos_w")


@pytest.mark.parametrize("call", [
    lambda t: relattn.resize_rel_pos(t, 10**12),
    lambda t: relattn.resize_rel_pos(t, 2**62),
    lambda t: relattn.get_rel_pos(10**9, 10**9, t),
    lambda t: relattn.get_rel_pos(1, 10**9, t),
    lambda t: relattn.get_rel_pos(10**6, 10**6, t),
    lambda t: relattn.get_rel_pos(10**9, 10**9, t[:, :0]),
], ids=["resize-1e12", "resize-2^62", "gather-1e9^2", "gather-1x1e9", "gather-1e6^2", "gather-0-wide"])
def test_relpos_absurd_sizes(call):
    must_raise(lambda: call(_tables()[0]), ("length", "q_size", "k_size"))


@settings(max_examples=25)
@given(qs=ANY_SCALAR, ks=ANY_SCALAR)
def test_get_rel_pos_sizes_fuzz(qs, ks):
    table = _tables()[0]
    out = outcome(lambda: relattn.get_rel_pos(qs, ks, table), ("q_size", "k_size"))
    iq, ik = _as_valid_int(qs), _as_valid_int(ks)
    if out is None:
        assert iq is None or ik is None or iq * ik > 10**8
    else:
        np.testing.assert_allclose(out, oracle.get_rel_pos(iq, ik, table), rtol=1e-5, atol=1e-6)


def test_decomposed_rel_pos_malformed():
    q = np.ones((2, 6, 4), np.float32)
    th, tw = np.ones((3, 4), np.float32), np.ones((5, 4), np.float32)
    must_raise(lambda: relattn.decomposed_rel_pos(q[0, 0], th, tw, (2, 3), (2, 3)), "q")
    must_raise(lambda: relattn.decomposed_rel_pos(None, th, tw, (2, 3), (2, 3)), "q")
    must_raise(lambda: relattn.decomposed_rel_pos(q.astype(int), th, tw, (2, 3), (2, 3)), "q")
    must_raise(lambda: relattn.decomposed_rel_pos(q, th, tw, (3, 3), (2, 3)), "q_size")
    must_raise(lambda: relattn.decomposed_rel_pos(q, th, tw, (2, 3), None), "k_size")
    must_raise(lambda: relattn.decomposed_rel_pos(q, th, tw, (2, 3), (0, 3)), "k_size")
    must_raise(lambda: relattn.decomposed_rel_pos(q, th[:, :3], tw, (2, 3), (2, 3)), "rel_pos_h")
    must_raise(lambda: relattn.decomposed_rel_pos(q, th, tw, (2, 3), (10**9, 10**9)), "k_size")
    must_raise(lambda: relattn.decomposed_rel_pos(q, th, tw, (2, 3), (1, 10**10)), "k_size")
    # Valid oddities: zero batch, negative strides, read-only.
    rh, rw = relattn.decomposed_rel_pos(q[:0], th, tw, (2, 3), (2, 3))
    assert rh.shape == (0, 6, 2) and rw.shape == (0, 6, 3)
    qr = _rng().standard_normal((2, 6, 4)).astype(np.float32)
    want = relattn.decomposed_rel_pos(qr, th, tw, (2, 3), (2, 3))
    view = qr[::-1].copy()[::-1]
    view.flags.writeable = False
    got = relattn.decomposed_rel_pos(view, th, tw, (2, 3), (2, 3))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# window_partition / window_unpartition
# ---------------------------------------------------------------------------


@settings(max_examples=25)
@given(ws=ANY_SCALAR)
def test_window_partition_size_fuzz(ws):
    x = _rng().standard_normal((1, 5, 6, 2)).astype(np.float32)
    out = outcome(lambda: relattn.window_partition(x, ws), "window_size")
    want = _as_valid_int(ws)
    if out is None:
        assert want is None or want > 10**4, f"window_size={ws!r} was refused"
        return
    windows, pad_hw = out
    ow, opad = oracle.window_partition(x, want)
    assert pad_hw == opad
    np.testing.assert_array_equal(windows, ow)
    np.testing.assert_array_equal(relattn.window_unpartition(windows, ws, pad_hw, (5, 6)), x)


def test_window_malformed():
    x = np.ones((2, 5, 6, 3), np.float32)
    must_raise(lambda: relattn.window_partition(x[0], 2), "x")
    must_raise(lambda: relattn.window_partition(x[None], 2), "x")
    must_raise(lambda: relattn.window_partition(None, 2), "x")
    must_raise(lambda: relattn.window_partition("abc", 2), "x")
    must_raise(lambda: relattn.window_partition(x[:, :0], 2), "x")
    must_raise(lambda: relattn.window_partition(x, 10**9), "window_size")
    must_raise(lambda: relattn.window_partition(x, 10**6), "window_size")
    w, pad = relattn.window_partition(x, 4)
    must_raise(lambda: relattn.window_unpartition(w[0], 4, pad, (5, 6)), "windows")
    must_raise(lambda: relattn.window_unpartition(None, 4, pad, (5, 6)), "windows")
    must_raise(lambda: relattn.window_unpartition(w, 3, pad, (5, 6)), ("pad_hw", "windows"))
    must_raise(lambda: relattn.window_unpartition(w, 4, (8, 12), (5, 6)), "windows")
    must_raise(lambda: relattn.window_unpartition(w, 4, (8, 7), (5, 6)), "pad_hw")
    must_raise(lambda: relattn.window_unpartition(w, 4, None, (5, 6)), "pad_hw")
    must_raise(lambda: relattn.window_unpartition(w, 4, (8, 8, 8), (5, 6)), "pad_hw")
    must_raise(lambda: relattn.window_unpartition(w, 4, pad, (9, 6)), "hw")
    must_raise(lambda: relattn.window_unpartition(w, 4, pad, (math.nan, 6)), "hw")
    must_raise(lambda: relattn.window_unpartition(w, 4, pad, "ab"), "hw")
    must_raise(lambda: relattn.window_unpartition(w, 0, pad, (5, 6)), "window_size")
    must_raise(lambda: relattn.window_unpartition(w, 4, (4 * 10**8, 4 * 10**8), (5, 6)), "windows")
    # Valid oddities.
    wz, padz = relattn.window_partition(x[:0], 4)
    assert wz.shape == (0, 4, 4, 3) and padz == (8, 8)
    assert relattn.window_unpartition(wz, 4, padz, (5, 6)).shape == (0, 5, 6, 3)
    xr = _rng().standard_normal((2, 5, 6, 3))[:, ::-1, ::-1]
    xr.flags.writeable = False
    wr, _ = relattn.window_partition(xr, 4)
    np.testing.assert_array_equal(wr, relattn.window_partition(xr.copy(), 4)[0])
    np.testing.assert_array_equal(relattn.window_unpartition(wr[::-1][::-1], 4, pad, (5, 6)), xr)


# ---------------------------------------------------------------------------
# Attention: constructor, forward, load_state_dict, from_state_dict
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, names", [
    (dict(dim=0), "dim"), (dict(dim=-8), "dim"), (dict(dim=math.nan), "dim"), (dict(dim="8"), "dim"),
    (dict(dim=None), "dim"), (dict(dim=10**9, num_heads=1), "dim"), (dict(dim=10**6, num_heads=1), "dim"),
    (dict(dim=8, num_heads=3), "dim"), (dict(dim=8, num_heads=0), "num_heads"),
    (dict(dim=8, num_heads="2"), "num_heads"), (dict(dim=8, num_heads=2.5), "num_heads"),
    (dict(dim=8, use_rel_pos=True), "input_size"),
    (dict(dim=8, use_rel_pos=True, input_size=(0, 3)), "input_size"),
    (dict(dim=8, use_rel_pos=True, input_size=(math.inf, 3)), "input_size"),
    (dict(dim=8, use_rel_pos=True, input_size=7), "input_size"),
    (dict(dim=8, use_rel_pos=True, input_size=(10**9, 10**9)), "input_size"),
    (dict(dim=8, use_rel_pos=True, input_size=(10**15, 1)), "input_size"),
    (dict(dim=8, dtype="int32"), "dtype"), (dict(dim=8, dtype="junk"), "dtype"),
    (dict(dim=8, dtype=None), "dtype"), (dict(dim=8, dtype=complex), "dtype"),
    (dict(dim=8, backend="junk"), "backend"), (dict(dim=8, backend=None), "backend"),
    (dict(dim=8, window_size=-1), "window_size"), (dict(dim=8, window_size=2.5), "window_size"),
    (dict(dim=8, window_size="3"), "window_size"),
    (dict(dim=8, rng="seed"), "rng"),
])
def test_attention_constructor_malformed(kwargs, names):
    kwargs = {"num_heads": 2, **kwargs}
    must_raise(lambda: relattn.Attention(**kwargs), names)


@pytest.fixture(scope="module")
def layer_and_x():
    attn = relattn.Attention(8, 2, use_rel_pos=True, input_size=(4, 4), rel_pos_zero_init=False, rng=0,
                             backend="numpy")
    x = _rng(3).standard_normal((2, 4, 5, 8)).astype(np.float32)
    return attn, x


def _module_oracle(attn, x, ws=0):
    sd = attn.state_dict()
    return oracle.attention_module(x, attn.num_heads, sd["qkv.weight"], sd.get("qkv.bias"), sd["proj.weight"],
                                   sd["proj.bias"], sd.get("rel_pos_h"), sd.get("rel_pos_w"), ws)


def test_attention_forward_malformed_and_views(backend, layer_and_x):
    base, x = layer_and_x
    attn = relattn.Attention.from_state_dict(base.state_dict(), backend=backend)
    for bad, names in [
        (x[0], "x"), (x[None], "x"), (None, "x"), ("x", "x"), (x.astype(int), "x"), (x.astype(bool), "x"),
        (x.astype(complex), "x"), (x.astype(object), "x"), (x[..., :4], "x"), (x[:, :0], "x"),
    ]:
        must_raise(lambda: attn(bad), names)
    for ws, names in [(-1, "window_size"), (2.5, "window_size"), ("2", "window_size"),
                      (10**9, "window_size"), (10**5, "window_size")]:
        must_raise(lambda: attn(x, window_size=ws), names)
    want = attn(x)
    np.testing.assert_allclose(want, _module_oracle(attn, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(attn.forward(x, window_size=3), _module_oracle(attn, x, 3), rtol=1e-4, atol=1e-5)
    assert attn(x[:0]).shape == (0, 4, 5, 8)
    assert attn(x[:0], window_size=3).shape == (0, 4, 5, 8)
    for view in (x[::-1].copy()[::-1], np.asfortranarray(x), x.tolist()):
        np.testing.assert_allclose(attn(view), want, rtol=1e-5, atol=1e-6)
    ro = x.copy()
    ro.flags.writeable = False
    np.testing.assert_allclose(attn(ro), want, rtol=1e-5, atol=1e-6)


def test_load_state_dict_malformed(layer_and_x):
    base, _ = layer_and_x
    sd = base.state_dict()
    attn = relattn.Attention(8, 2, use_rel_pos=True, input_size=(4, 4), rng=1)
    before = attn.state_dict()
    cases = [
        (None, "mapping"), ([1, 2], "mapping"), ("abc", "mapping"),
        ({k: v for k, v in sd.items() if k != "rel_pos_h"}, "mapping"),
        ({**sd, "extra": np.zeros(1)}, "mapping"),
        ({**sd, "rel_pos_h": np.zeros((3, 4))}, "rel_pos_h"),
        ({**sd, "rel_pos_h": sd["rel_pos_h"][None]}, "rel_pos_h"),
        ({**sd, "qkv.weight": sd["qkv.weight"].T}, "qkv.weight"),
        ({**sd, "rel_pos_w": "abc"}, "rel_pos_w"),
        ({**sd, "rel_pos_w": None}, "rel_pos_w"),
        ({**sd, "proj.bias": sd["proj.bias"].astype(complex)}, "proj.bias"),
        ({**sd, "proj.bias": sd["proj.bias"].astype(bool)}, "proj.bias"),
        ({**sd, "proj.bias": sd["proj.bias"].astype(object)}, "proj.bias"),
    ]
    for mapping, names in cases:
        must_raise(lambda: attn.load_state_dict(mapping), names)
        # A refused load leaves the layer unchanged.
        for key, value in attn.state_dict().items():
            np.testing.assert_array_equal(value, before[key])
    # Valid: non-contiguous, read-only, lists, other float dtypes.
    odd = {k: (v.T.copy().T if v.ndim == 2 else v[::-1].copy()[::-1]) for k, v in sd.items()}
    odd["rel_pos_h"] = odd["rel_pos_h"].astype(np.float64)
    odd["proj.bias"] = odd["proj.bias"].tolist()
    odd["rel_pos_w"].flags.writeable = False
    assert attn.load_state_dict(odd) == ([], [])
    for key, value in attn.state_dict().items():
        np.testing.assert_allclose(value, sd[key], rtol=1e-7)


def test_from_state_dict_malformed(layer_and_x):
    base, _ = layer_and_x
    sd = base.state_dict()
    plain = {k: v for k, v in sd.items() if "rel_pos" not in k}
    cases = [
        (dict(mapping=None), "mapping"), (dict(mapping=[1]), "mapping"),
        (dict(mapping=sd, prefix=None), "prefix"), (dict(mapping=sd, prefix=3), "prefix"),
        (dict(mapping=sd, prefix="nope."), "prefix"),
        (dict(mapping={1: 2}), ("prefix", "mapping", "state_dict")),
        (dict(mapping={**sd, 7: np.zeros(2)}), ("mapping", "state_dict")),
        (dict(mapping={**sd, "rel_pos_h": np.zeros((7, 3))}), "rel_pos"),
        (dict(mapping={**sd, "rel_pos_h": np.zeros(7)}), "rel_pos_h"),
        (dict(mapping={**sd, "rel_pos_h": np.zeros((7, 0)), "rel_pos_w": np.zeros((7, 0))}), "rel_pos"),
        (dict(mapping={**sd, "proj.weight": np.zeros(())}), "proj.weight"),
        (dict(mapping={**sd, "proj.weight": "abc"}), "proj.weight"),
        (dict(mapping={**sd, "proj.weight": None}), "proj.weight"),
        (dict(mapping={**sd, "proj.weight": np.zeros((0, 8))}), "proj.weight"),
        (dict(mapping=sd, num_heads=4), "num_heads"),
        (dict(mapping=plain), "num_heads"), (dict(mapping=plain, num_heads="2"), "num_heads"),
        (dict(mapping=plain, num_heads=3), ("dim", "num_heads")),
        (dict(mapping=sd, dtype="int8"), "dtype"), (dict(mapping=sd, backend="junk"), "backend"),
    ]
    for kwargs, names in cases:
        must_raise(lambda: relattn.Attention.from_state_dict(**kwargs), names)
    assert relattn.Attention.from_state_dict(plain, num_heads=2).num_heads == 2


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def test_checkpoint_functions_malformed(tmp_path, layer_and_x):
    base, _ = layer_and_x
    sd = {"blk.attn." + k: v for k, v in base.state_dict().items()}
    for bad in (None, [1, 2], "abc", {1: np.zeros(2)}):
        must_raise(lambda: relattn.attention_layers(bad), "state_dict")
        must_raise(lambda: relattn.resize_checkpoint_tables(bad, (4, 4), (5, 5)), "state_dict")
        must_raise(lambda: relattn.save_checkpoint(bad, tmp_path / "a.npz"), "state_dict")
    for key, value in [("blk.attn.proj.weight", "abc"), ("blk.attn.proj.weight", np.zeros(3)),
                       ("blk.attn.rel_pos_h", np.zeros(7)), ("blk.attn.rel_pos_h", np.zeros((7, 3)))]:
        must_raise(lambda: relattn.attention_layers({**sd, key: value}), key)
    for value in ("abcdefg", np.float32(1), np.zeros(7, np.float32), np.zeros((7, 4), np.int32)):
        must_raise(lambda: relattn.resize_checkpoint_tables({"a.rel_pos_h": value}, (4, 4), (5, 5)), "a.rel_pos_h")
    for size, names in [((4, 4, 4), "from_size"), (None, "from_size"), ((0, 4), "from_size")]:
        must_raise(lambda: relattn.resize_checkpoint_tables(sd, size, (5, 5)), names)
    must_raise(lambda: relattn.resize_checkpoint_tables(sd, (4, 4), (math.nan, 5)), "to_size")
    must_raise(lambda: relattn.resize_checkpoint_tables(sd, (4, 4), (10**9, 10**9)), "to_size")
    # save / load
    for path in (None, 3, tmp_path / "a.pth", tmp_path / "a"):
        must_raise(lambda: relattn.save_checkpoint(sd, path), "path")
    must_raise(lambda: relattn.save_checkpoint({"a": "text"}, tmp_path / "s.npz"), "a")
    must_raise(lambda: relattn.save_checkpoint({"a": None}, tmp_path / "s.npz"), "a")
    must_raise(lambda: relattn.save_checkpoint({"a": np.zeros(2, complex)}, tmp_path / "s.npz"), "a")
    for path in (None, 3, tmp_path / "x.pth", tmp_path / "x.ckpt"):
        must_raise(lambda: relattn.load_checkpoint(path), "path")
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    np.savez(tmp_path / "obj.npz", a=np.array([None, 1], dtype=object))
    for name in ("junk.npz", "junk.safetensors", "obj.npz"):
        must_raise(lambda: relattn.load_checkpoint(tmp_path / name), "path")
    with pytest.raises(OSError):  # a missing file is an I/O error, as for open()
        relattn.load_checkpoint(tmp_path / "missing.npz")
    # Valid oddities round-trip: non-contiguous, read-only, float16.
    odd = {k: v.T if v.ndim == 2 else v[::-1] for k, v in sd.items()}
    odd["blk.attn.proj.bias"] = odd["blk.attn.proj.bias"].astype(np.float16)
    odd["blk.attn.rel_pos_w"].flags.writeable = False
    for suffix in (".npz", ".safetensors"):
        path = tmp_path / ("ok" + suffix)
        relattn.save_checkpoint(odd, path)
        back = relattn.load_checkpoint(os.fspath(path))
        assert sorted(back) == sorted(odd)
        for key, value in odd.items():
            np.testing.assert_array_equal(back[key], value)
            assert back[key].dtype == value.dtype
    info = relattn.attention_layers(sd)
    assert [i.prefix for i in info] == ["blk.attn."] and info[0].input_size == (4, 4)
    out = relattn.resize_checkpoint_tables(sd, [4.0, 4], np.array([5, 5]))
    assert out["blk.attn.rel_pos_h"].shape == (9, 4)


# ---------------------------------------------------------------------------
# Size pairs must be ordered; numbers beyond the float range; huge integers
# ---------------------------------------------------------------------------


def _unordered_pairs():
    """Containers of the two entries 3 and 4 without a (repeatable) order."""
    return {
        "set": lambda: {3, 4},
        "frozenset": lambda: frozenset((3, 4)),
        "dict": lambda: {3: "h", 4: "w"},
        "dict keys": lambda: {3: 0, 4: 0}.keys(),
        "dict values": lambda: {"h": 3, "w": 4}.values(),
        "generator": lambda: (n for n in (3, 4)),
        "iterator": lambda: iter([3, 4]),
        "map": lambda: map(int, "34"),
        "string": lambda: "34",
    }


def _size_pair_calls():
    q, k, v = _qkv()
    th, tw = _tables()
    x = np.ones((1, 5, 6, 2), np.float32)
    windows, pad = relattn.window_partition(x, 4)
    sd = {"blk.rel_pos_h": np.zeros((5, 4), np.float32)}
    return {
        "q_size": lambda p: relattn.rel_pos_attention(q, k, v, th, tw, p, (3, 4)),
        "k_size": lambda p: relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), p),
        "q_size ": lambda p: relattn.explain(q, k, v, th, tw, p),
        "q_size  ": lambda p: relattn.decomposed_rel_pos(q[0], th, tw, p, (3, 4)),
        "k_size ": lambda p: relattn.decomposed_rel_pos(q[0], th, tw, (3, 4), p),
        "pad_hw": lambda p: relattn.window_unpartition(windows, 4, p, (5, 6)),
        "hw": lambda p: relattn.window_unpartition(windows, 4, pad, p),
        "input_size": lambda p: relattn.Attention(8, 2, use_rel_pos=True, input_size=p),
        "input_size ": lambda p: relattn.Attention(8, 2, input_size=p),
        "from_size": lambda p: relattn.resize_checkpoint_tables(sd, p, (5, 5)),
        "to_size": lambda p: relattn.resize_checkpoint_tables(sd, (3, 3), p),
        "window_size": lambda p: relattn.Attention(8, 2, window_size=p),
    }


@pytest.mark.parametrize("kind", sorted(_unordered_pairs()))
@pytest.mark.parametrize("arg", sorted(_size_pair_calls()))
def test_size_pairs_refuse_unordered_containers(arg, kind):
    """A grid size given as a set, mapping, string or one-shot iterable is a
    TypeError naming the argument, even when its entries would fit."""
    call, value = _size_pair_calls()[arg], _unordered_pairs()[kind]()
    name = arg.strip()
    with pytest.raises(TypeError) as info:
        call(value)
    assert str(info.value).startswith(name + ":"), str(info.value)
    assert "expected" in str(info.value) and "got" in str(info.value)


@pytest.mark.parametrize("pair", [[3, 4], (3, 4), np.array([3, 4]), (np.int64(3), 4.0), np.array([3.0, 4.0])],
                         ids=["list", "tuple", "int array", "numpy scalars", "float array"])
def test_size_pairs_accept_sequences_and_arrays(pair):
    q, k, v = _qkv()
    th, tw = _tables()
    want = relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), (3, 4))
    np.testing.assert_array_equal(relattn.rel_pos_attention(q, k, v, th, tw, pair, pair), want)
    assert relattn.Attention(8, 2, use_rel_pos=True, input_size=pair).input_size == (3, 4)


@pytest.mark.parametrize("scale", [10**400, -(10**400), 10**5000], ids=["1e400", "-1e400", "1e5000"])
def test_scale_beyond_float_range(backend, scale):
    """An integer scale that overflows float is a ValueError naming scale, not an OverflowError."""
    from fractions import Fraction

    q, k, v = _qkv()
    for value in (scale, Fraction(scale)):
        for fn in (relattn.rel_pos_attention, relattn.explain):
            with pytest.raises(ValueError) as info:
                fn(q, k, v, scale=value, backend=backend)
            assert str(info.value).startswith("scale: expected"), str(info.value)
            assert len(str(info.value)) < 300


@pytest.mark.parametrize("call, names", [
    (lambda t: relattn.resize_rel_pos(t, 10**5000), "length"),
    (lambda t: relattn.get_rel_pos(10**5000, 3, t), "q_size"),
    (lambda t: relattn.window_partition(np.ones((1, 4, 4, 2)), 10**5000), "window_size"),
    (lambda t: relattn.rel_pos_attention(*_qkv(), t, t[:7], (10**5000, 1)), "q_size"),
    (lambda t: relattn.Attention(10**5000, 1), "dim"),
    (lambda t: relattn.Attention(8, 2, use_rel_pos=True, input_size=(10**5000, 2)), "input_size"),
    (lambda t: relattn.window_partition(np.ones((1, 4, 4, 2)), -(10**5000)), "window_size"),
], ids=["resize", "gather", "window", "q_size", "dim", "input_size", "negative window"])
def test_huge_integers_are_refused_with_short_messages(call, names):
    """Integers too long to print (> 4300 digits) are refused naming the argument."""
    with pytest.raises(ValueError) as info:
        call(_tables()[0])
    assert str(info.value).split(":", 1)[0].startswith(names), str(info.value)
    assert len(str(info.value)) < 400


# ---------------------------------------------------------------------------
# Attention.from_state_dict: messages name the whole key, prefix included
# ---------------------------------------------------------------------------

PREFIX = "blocks.3.attn."


def _prefixed_cases(sd):
    """(change to the layer's keys, exception type, the whole key the message must name)."""
    return {
        "qkv.weight shape": ({"qkv.weight": sd["qkv.weight"][:-1]}, ValueError, "qkv.weight"),
        "qkv.bias shape": ({"qkv.bias": sd["qkv.bias"][:5]}, ValueError, "qkv.bias"),
        "proj.bias shape": ({"proj.bias": sd["proj.bias"][:, None]}, ValueError, "proj.bias"),
        "proj.bias complex": ({"proj.bias": sd["proj.bias"].astype(complex)}, TypeError, "proj.bias"),
        "proj.bias bool": ({"proj.bias": sd["proj.bias"].astype(bool)}, TypeError, "proj.bias"),
        "proj.bias text": ({"proj.bias": "abc"}, TypeError, "proj.bias"),
        "proj.weight None": ({"proj.weight": None}, ValueError, "proj.weight"),
        "proj.weight 1-D": ({"proj.weight": sd["proj.weight"][0]}, ValueError, "proj.weight"),
        "rel_pos_h 1-D": ({"rel_pos_h": sd["rel_pos_h"][0]}, ValueError, "rel_pos_h"),
        "rel_pos_h width": ({"rel_pos_h": sd["rel_pos_h"][:, :3]}, ValueError, "rel_pos_h"),
        "rel_pos_w object": ({"rel_pos_w": sd["rel_pos_w"].astype(object)}, TypeError, "rel_pos_w"),
        "rel_pos_w None": ({"rel_pos_w": None}, TypeError, "rel_pos_w"),
        "rel_pos_w missing": ({"rel_pos_w": "<drop>"}, ValueError, "rel_pos_w"),
        "rel_pos_h missing": ({"rel_pos_h": "<drop>"}, ValueError, "rel_pos_h"),
        "proj.bias missing": ({"proj.bias": "<drop>"}, ValueError, "proj.bias"),
    }


@pytest.mark.parametrize("case", sorted(_prefixed_cases(relattn.Attention(
    8, 2, use_rel_pos=True, input_size=(4, 4)).state_dict())))
def test_from_state_dict_errors_name_the_whole_key(layer_and_x, case):
    base, _ = layer_and_x
    sd = base.state_dict()
    change, exc_type, key = _prefixed_cases(sd)[case]
    layer = {**sd, **change}
    layer = {k: v for k, v in layer.items() if not (isinstance(v, str) and v == "<drop>")}
    checkpoint = {"blocks.2.attn." + k: v for k, v in sd.items()}   # a neighbour that is fine
    checkpoint.update({PREFIX + k: v for k, v in layer.items()})
    checkpoint["blocks.3.norm.weight"] = np.ones(8, np.float32)     # not the layer's: ignored
    start = time.perf_counter()
    with pytest.raises(exc_type) as info:
        relattn.Attention.from_state_dict(checkpoint, PREFIX)
    message = str(info.value)
    assert time.perf_counter() - start < FAST_S
    assert PREFIX + key in message, message
    if "missing" not in case or "rel_pos" in case:
        assert message.startswith(PREFIX), message   # the whole key leads the message
    else:
        assert message.startswith("mapping: missing keys ['" + PREFIX + key + "']"), message
    # The neighbouring layer still loads, and the good layer loads under its prefix.
    assert relattn.Attention.from_state_dict(checkpoint, "blocks.2.attn.").dim == 8
    good = {**checkpoint, **{PREFIX + k: v for k, v in sd.items()}}
    assert relattn.Attention.from_state_dict(good, PREFIX).state_dict().keys() == sd.keys()


# ---------------------------------------------------------------------------
# Attention: the whole initialisation is checked against the allocation limit
# ---------------------------------------------------------------------------


def _init_bytes(dim, itemsize, tables=(), table_temp=16):
    """What ``Attention.__init__`` may hold at once: every parameter plus the largest
    float64 temporary (a weight's draw, or a table's draw and its scaled copy)."""
    params = (4 * dim * dim + 4 * dim + sum(tables)) * itemsize
    return params + max([3 * dim * dim * 8, *(table_temp * t for t in tables)])


def test_attention_init_total_is_checked_before_allocating(monkeypatch):
    """Each array fits the limit but all of them (plus the float64 draws) do not:
    a ValueError naming dim, before numpy allocates anything."""
    import relattn._arrays as arrays

    import tracemalloc

    dim = 256
    need = _init_bytes(dim, 4)
    monkeypatch.setattr(arrays, "MAX_ALLOC_BYTES", need - 1)
    assert 3 * dim * dim * 8 < need - 1    # every single array passes the per-array check
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            relattn.Attention(dim, 1, rng=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value).startswith("dim: too large"), str(info.value)
    assert peak < dim * dim, f"{peak} bytes allocated before the refusal"   # the smallest weight: 4 * dim**2
    monkeypatch.setattr(arrays, "MAX_ALLOC_BYTES", need)
    assert relattn.Attention(dim, 1, rng=0).dim == dim
    # float64 parameters need more: refused at the limit a float32 layer fits in
    with pytest.raises(ValueError, match="^dim: too large"):
        relattn.Attention(dim, 1, dtype="float64", rng=0)


def test_attention_init_tables_count_towards_the_total(monkeypatch):
    """With large tables the total is dominated by them: the refusal names input_size."""
    import relattn._arrays as arrays

    dim, size = 8, 1000
    tables = [(2 * size - 1) * dim] * 2
    for zero_init, temp in ((False, 16), (True, 8)):
        need = _init_bytes(dim, 4, tables, temp)
        monkeypatch.setattr(arrays, "MAX_ALLOC_BYTES", need - 1)
        with pytest.raises(ValueError, match="^input_size: too large"):
            relattn.Attention(dim, 1, use_rel_pos=True, input_size=(size, size), rel_pos_zero_init=zero_init)
        monkeypatch.setattr(arrays, "MAX_ALLOC_BYTES", need)
        layer = relattn.Attention(dim, 1, use_rel_pos=True, input_size=(size, size), rel_pos_zero_init=zero_init)
        assert layer.rel_pos_h.shape == (2 * size - 1, dim)


def test_attention_32436_is_refused_quickly():
    """Attention(32436, 1): its qkv weight's float64 draw alone (23.5 GiB) fits a
    24 GiB limit, the whole initialisation (~39 GiB) does not: a ValueError naming
    dim within a second. Run in a child process whose address space is capped, so
    that an allocation attempt fails there instead of exhausting this machine."""
    import subprocess
    import sys
    import textwrap

    resource = pytest.importorskip("resource")
    if not hasattr(resource, "RLIMIT_AS"):
        pytest.skip("no address-space limit on this platform")
    script = textwrap.dedent("""
        import resource, time
        cap = 8 * 2**30
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        import relattn, relattn._arrays as arrays
        arrays.MAX_ALLOC_BYTES = min(arrays.MAX_ALLOC_BYTES, 24 * 2**30)
        start = time.perf_counter()
        try:
            relattn.Attention(32436, 1)
            print("no error")
        except Exception as exc:
            print(f"{time.perf_counter() - start:.3f}")
            print(type(exc).__name__ + ": " + str(exc))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    elapsed, error = proc.stdout.strip().splitlines()
    assert error.startswith("ValueError: dim: too large"), error
    assert "GiB" in error
    assert float(elapsed) < 1.0, f"refusal took {elapsed} s"
