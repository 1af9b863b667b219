"""The per-signature call plans of ``rel_pos_attention`` (every backend).

A repeated call with arrays of the same signature skips validation and
dispatch; these tests check that such calls give the same bits as a first
call, that anything outside the signature (table contents, views with other
strides, other scales or sizes) is never taken from the cache, that bad input
is still refused, and that the cache stays bounded.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import relattn
from relattn import functional


def _inputs(xp, rng, B=1, H=2, grid=(3, 4), d=8, dtype=np.float32):
    S = grid[0] * grid[1]
    q, k, v = (rng.standard_normal((B, H, S, d)).astype(np.float32) for _ in range(3))
    th = rng.standard_normal((2 * grid[0] - 1, d)).astype(np.float32)
    tw = rng.standard_normal((2 * grid[1] - 1, d)).astype(np.float32)
    return tuple(xp.asarray(a.astype(dtype)) for a in (q, k, v, th, tw))


def _fresh(*args, **kwargs):
    """The result of a call that finds no plan."""
    functional._plans.clear()
    return relattn.rel_pos_attention(*args, **kwargs)


def _unplanned(monkeypatch, *args, **kwargs):
    """The result of a call that neither uses nor leaves a plan."""
    with monkeypatch.context() as m:
        m.setattr(functional, "_call_key", lambda *a, **k: None)
        return relattn.rel_pos_attention(*args, **kwargs)


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


@pytest.fixture
def xp(backend):
    mod = relattn.backends.get(backend)
    if mod.ARRAY_MODULE == "cupy":
        import cupy

        return cupy
    return np


def test_repeat_call_uses_the_plan(backend, xp, monkeypatch):
    rng = np.random.default_rng(0)
    q, k, v, th, tw = _inputs(xp, rng)
    first = _fresh(q, k, v, th, tw, (3, 4), backend=backend)
    assert len(functional._plans) == 1

    def refuse(*_a, **_k):
        raise AssertionError("validation ran on a planned call")

    monkeypatch.setattr(functional, "_prepare", refuse)
    monkeypatch.setattr(functional, "_select", refuse)
    for _ in range(3):
        again = relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), backend=backend)
        assert again is not first
        np.testing.assert_array_equal(_host(again), _host(first))
    # new arrays of the same signature take the plan too, with their own values
    q2, k2, v2, th2, tw2 = _inputs(xp, np.random.default_rng(1))
    planned = relattn.rel_pos_attention(q2, k2, v2, th2, tw2, (3, 4), backend=backend)
    monkeypatch.undo()
    np.testing.assert_array_equal(_host(planned), _host(_fresh(q2, k2, v2, th2, tw2, (3, 4), backend=backend)))


def test_table_contents_are_not_cached(backend, xp):
    rng = np.random.default_rng(2)
    q, k, v, th, tw = _inputs(xp, rng)
    before = relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), backend=backend)
    relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), backend=backend)  # planned now
    th[...] = th * 3 + 1
    after = relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), backend=backend)
    assert not np.array_equal(_host(after), _host(before))
    np.testing.assert_array_equal(_host(after), _host(_fresh(q, k, v, th, tw, (3, 4), backend=backend)))


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_other_signatures_are_planned_separately(backend, xp, dtype, monkeypatch):
    """Strided views, other grids, scales, sizes and dtypes: each result equals
    the one of a call that finds no plan."""
    rng = np.random.default_rng(3)
    q, k, v, th, tw = _inputs(xp, rng, B=2, H=2, grid=(4, 4), d=8, dtype=dtype)
    wide = xp.asarray(rng.standard_normal((2, 2, 16, 16)).astype(dtype))
    cases = [
        ((q, k, v, th, tw, (4, 4)), {}),
        ((q, k, v, th, tw, (4, 4)), {"scale": 0.5}),
        ((q, k, v, th, tw, (4, 4)), {"scale": 1}),
        ((q, k, v, th, tw, (2, 8), (8, 2)), {}),          # tables resized
        ((q[:, :, ::2], k, v, th, tw, (2, 4), (4, 4)), {}),  # q_size != k_size, strided q
        ((wide[..., ::2], k, v, th, tw, (4, 4)), {}),     # strided last axis
        ((q[1:], k[1:], v[1:], th, tw, (4, 4)), {}),      # batch 1 of an offset view
        ((q, k, v), {}),                                  # no tables
        ((q, k, v, None, None, (4, 4)), {"scale": 0.25}),
    ]
    functional._plans.clear()
    for round_ in range(2):  # the second round runs planned
        for args, kwargs in cases:
            got = relattn.rel_pos_attention(*args, backend=backend, **kwargs)
            want = _unplanned(monkeypatch, *args, backend=backend, **kwargs)
            np.testing.assert_array_equal(_host(got), _host(want))
            assert got.dtype == q.dtype and got.shape == (args[0].shape[:3] + (8,))
        assert len(functional._plans) == len(cases)


def test_bad_input_is_refused_after_a_planned_call(backend, xp):
    rng = np.random.default_rng(4)
    q, k, v, th, tw = _inputs(xp, rng)
    for _ in range(2):
        relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), scale=1, backend=backend)
    with pytest.raises(TypeError, match="scale"):
        relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), scale=True, backend=backend)
    with pytest.raises(TypeError, match="q_size"):
        relattn.rel_pos_attention(q, k, v, th, tw, (True, 4.5), backend=backend)
    with pytest.raises(ValueError, match="q_size"):
        relattn.rel_pos_attention(q, k, v, th, tw, (4, 3 + 1), backend=backend)
    with pytest.raises(ValueError, match="rel_pos_w"):
        relattn.rel_pos_attention(q, k, v, th, tw[:, :4], (3, 4), backend=backend)
    with pytest.raises(ValueError, match="scale"):
        relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), scale=float("nan"), backend=backend)
    # a list grid is accepted (and not planned)
    n = len(functional._plans)
    out = relattn.rel_pos_attention(q, k, v, th, tw, [3, 4], scale=1, backend=backend)
    assert len(functional._plans) == n
    np.testing.assert_array_equal(
        _host(out), _host(relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), scale=1, backend=backend)))


def test_dlpack_inputs():
    """A DLPack q is converted before the plan look-up (and planned); a DLPack
    k, v or table takes the full path every time."""
    rng = np.random.default_rng(5)
    q, k, v, th, tw = _inputs(np, rng)

    class Tensor:  # a DLPack producer that is not a numpy array
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kw):
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    want = relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), backend="numpy")
    functional._plans.clear()
    for _ in range(2):
        out = relattn.rel_pos_attention(Tensor(q), k, v, th, tw, (3, 4), backend="numpy")
        np.testing.assert_array_equal(np.asarray(out), want)
    assert len(functional._plans) == 1
    functional._plans.clear()
    for _ in range(2):
        out = relattn.rel_pos_attention(q, Tensor(k), v, th, Tensor(tw), (3, 4), backend="numpy")
        np.testing.assert_array_equal(np.asarray(out), want)
    assert len(functional._plans) == 0


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(functional._plans, "limit", 4)
    functional._plans.clear()
    rng = np.random.default_rng(6)
    q, k, v, th, tw = _inputs(np, rng)
    for i in range(10):
        relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), scale=0.1 * (i + 1), backend="numpy")
        assert len(functional._plans) <= 4
    assert len(functional._plans) == 4


def test_moved_arrays_are_not_planned():
    """backend= naming another array library copies the inputs: no plan."""
    rng = np.random.default_rng(7)
    q, k, v, th, tw = _inputs(np, rng)
    mod = relattn.backends.get("cupy")
    if mod.unavailable_reason() is not None:
        pytest.skip(mod.unavailable_reason())
    functional._plans.clear()
    out = relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), backend="cupy")
    assert isinstance(out, np.ndarray) and len(functional._plans) == 0


def test_threads_share_plans(backend, xp):
    sets = [_inputs(xp, np.random.default_rng(10 + i)) for i in range(4)]
    want = [_host(_fresh(*s, (3, 4), backend=backend)) for s in sets]
    errors = []

    def work(i):
        try:
            for _ in range(20):
                got = relattn.rel_pos_attention(*sets[i], (3, 4), backend=backend)
                np.testing.assert_array_equal(_host(got), want[i])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_gpu_backend_reads_only_its_two_settings_from_the_environment():
    """relattn's GPU backend reads exactly RELATTN_CACHE_DIR and RELATTN_SM90
    from the environment, once, in options.py: nothing a call plans depends on
    an environment variable (a kernel or configuration is forced by
    ``relattn.plan(..., kernel=..., kernel_options=...)``), so a cached plan
    cannot outlive a change of one."""
    import dataclasses
    import pathlib
    import re

    from relattn.backends.gpu import options

    root = pathlib.Path(relattn.__file__).parent
    reads = set()
    environ_files = set()
    pattern = r'(?:environ\.get\(|environ\[|getenv\()\s*["\'](RELATTN_[A-Z0-9_]+)["\']'
    for path in root.rglob("*.py"):
        text = path.read_text()
        rel = path.relative_to(root).as_posix()
        reads |= {(rel, name) for name in re.findall(pattern, text)}
        if rel.startswith("backends/") and re.search(r"\bos\.environ\b|\bgetenv\(", text):
            environ_files.add(rel)
    assert reads == {("backends/gpu/options.py", "RELATTN_CACHE_DIR"),
                     ("backends/gpu/options.py", "RELATTN_SM90")}, sorted(reads)
    assert environ_files == {"backends/gpu/options.py"}, sorted(environ_files)
    assert {f.name for f in dataclasses.fields(options.Options)} == {"cache_dir", "hopper"}
