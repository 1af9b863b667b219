"""Thread safety, and the numba kernel cache with no writable cache location.

* 8 threads x 20 calls on ONE shared ``Attention`` instance (global and
  windowed, two input grids so the parameter cache is filled concurrently)
  and on the functional API: every result bit-identical to the serial one,
  no crash, no deadlock (every wait has a timeout).
* The numba runs go through a subprocess: a threading layer that is not
  thread safe (numba's ``workqueue``) aborts the whole process, which must
  fail one test, not kill the test run.
* relattn still works when numba cannot write its kernel cache anywhere.
* Parameter writes (``load_state_dict``, attribute assignment) racing with
  calls: once a write has returned, every call uses the new parameters (a
  cache entry built from the old ones is never served), and a concurrent call
  uses either the old or the new parameters, never a mix. One test stalls a
  cache fill between reading the weights and storing the entry; another
  hammers the layer from three threads while the main thread loads.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import types

import numpy as np
import pytest

import relattn

THREADS, CALLS, TIMEOUT = 8, 20, 120
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _case(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, 2, 20, 16)).astype(np.float32) for _ in range(3))
    th, tw = (rng.standard_normal((n, 16)).astype(np.float32) * 0.1 for n in (9, 11))
    x1 = rng.standard_normal((2, 5, 4, 32)).astype(np.float32)
    x2 = rng.standard_normal((1, 7, 6, 32)).astype(np.float32)
    return q, k, v, th, tw, x1, x2


def hammer(backend, threads=THREADS, calls=CALLS, timeout=TIMEOUT):
    """Run the shared-layer and functional workloads from many threads; return the number of checks."""
    q, k, v, th, tw, x1, x2 = _case()
    attn = relattn.Attention(32, 4, use_rel_pos=True, input_size=(5, 4), rel_pos_zero_init=False, rng=0,
                             backend=backend)
    jobs = [
        lambda: relattn.rel_pos_attention(q, k, v, th, tw, (4, 5), backend=backend),
        lambda: relattn.rel_pos_attention(q, k, v, backend=backend, scale=0.2),
        lambda: attn(x1),
        lambda: attn(x2),  # another grid: tables resized on the fly
        lambda: attn(x2, window_size=3),
        lambda: relattn.window_partition(x2, 4)[0],
        lambda: relattn.get_rel_pos(4, 6, th),
    ]
    # Fresh layer for the serial reference: the shared one's cache starts cold in the threads.
    ref_attn = relattn.Attention(32, 4, use_rel_pos=True, input_size=(5, 4), backend=backend)
    ref_attn.load_state_dict(attn.state_dict())
    refs = [j() for j in jobs[:2]] + [ref_attn(x1), ref_attn(x2), ref_attn(x2, window_size=3)] + \
        [j() for j in jobs[5:]]
    attn._cache.clear()

    def worker(tid):
        done = 0
        for c in range(calls):
            i = (tid + c) % len(jobs)
            out = jobs[i]()
            assert out.tobytes() == refs[i].tobytes(), f"thread {tid} call {c} job {i}: result differs"
            done += 1
        return done

    with cf.ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(worker, t) for t in range(threads)]
        total = sum(f.result(timeout=timeout) for f in futures)
    assert total == threads * calls
    return total


def test_threads_numpy_backend():
    hammer("numpy")


def test_threads_auto_and_numba_backend_in_subprocess():
    if "numba" not in relattn.backends.available():
        pytest.skip("numba backend unavailable")
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]
        import numba
        from test_concurrency import hammer
        print(hammer("numba"), hammer("auto"), numba.threading_layer())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split()[:2] == [str(THREADS * CALLS)] * 2


def test_threads_numba_workqueue_layer():
    """numba's default layer where neither TBB nor OpenMP is present is not thread safe."""
    if "numba" not in relattn.backends.available():
        pytest.skip("numba backend unavailable")
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]
        from test_concurrency import hammer
        print(hammer("numba", threads=4, calls=10))
    """)
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    # numba's workqueue layer is not thread-safe; the backend serializes its calls there.
    assert proc.returncode == 0, proc.stderr.strip()[-500:]


# ---------------------------------------------------------------------------
# Kernel cache with no writable location
# ---------------------------------------------------------------------------

_CHECK = textwrap.dedent("""
    import sys, numpy as np
    import relattn
    assert relattn.__file__.startswith(sys.argv[1]), relattn.__file__
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 12, 8)).astype(np.float32) for _ in range(3))
    th, tw = (rng.standard_normal((n, 8)).astype(np.float32) for n in (5, 7))
    ref = relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), backend="numpy")
    out = relattn.rel_pos_attention(q, k, v, th, tw, (3, 4))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    print("auto-ok", relattn.explain(q, k, v, th, tw, (3, 4)).splitlines()[0])
    out = relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), backend=sys.argv[2])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    print("named-ok")
""")


def _run_check(tmp_path, install_root, env_extra, backend="numba"):
    script = tmp_path / "check.py"
    script.write_text(_CHECK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CACHE")}
    env.update(PYTHONPATH=str(install_root), PYTHONDONTWRITEBYTECODE="1", **env_extra)
    return subprocess.run([sys.executable, str(script), str(install_root), backend], capture_output=True,
                          text=True, timeout=600, env=env, cwd=str(tmp_path))


@pytest.fixture
def blocked(tmp_path):
    """A path that can never be created, even by root: a regular file used as a directory."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    return blocker / "cache"


def test_numba_cache_dir_unwritable(tmp_path, blocked):
    """NUMBA_CACHE_DIR cannot be created: numba falls back to the in-tree cache, relattn works."""
    if "numba" not in relattn.backends.available():
        pytest.skip("numba backend unavailable")
    proc = _run_check(tmp_path, ROOT, {"NUMBA_CACHE_DIR": str(blocked)})
    assert proc.returncode == 0 and "named-ok" in proc.stdout, proc.stdout + proc.stderr


def test_read_only_install_without_any_cache_location(tmp_path, blocked):
    """An install whose __pycache__ cannot be written, and no user cache dir either.

    The ``backend="auto"`` path must still work (falling back if it has to); the
    numba backend itself should keep working without a cache (it compiles in
    memory).
    """
    if "numba" not in relattn.backends.available():
        pytest.skip("numba backend unavailable")
    install = tmp_path / "site"
    shutil.copytree(os.path.join(ROOT, "relattn"), install / "relattn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for pkg in (install / "relattn", install / "relattn" / "backends"):
        (pkg / "__pycache__").write_text("")  # a file: no cache directory can be made here
    env = {"NUMBA_CACHE_DIR": str(blocked), "HOME": str(blocked), "XDG_CACHE_HOME": str(blocked)}
    proc = _run_check(tmp_path, install, env)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1]
    assert "auto-ok" in proc.stdout and "named-ok" in proc.stdout


# ---------------------------------------------------------------------------
# Parameter writes racing with calls
# ---------------------------------------------------------------------------


def _race_layers(seed_a=1, seed_b=2, dtype=np.float32):
    def make(seed):
        return relattn.Attention(16, 2, use_rel_pos=True, input_size=(3, 3), rel_pos_zero_init=False,
                                 rng=seed, backend="numpy")

    layer = make(seed_a)
    sds = [make(seed_a).state_dict(), make(seed_b).state_dict()]
    x = np.random.default_rng(0).standard_normal((1, 3, 3, 16)).astype(dtype)
    refs = []
    for sd in sds:   # each from a fresh layer with exactly these weights
        fresh = relattn.Attention(16, 2, use_rel_pos=True, input_size=(3, 3), backend="numpy")
        fresh.load_state_dict(sd)
        refs.append(fresh(x))
    assert not np.array_equal(refs[0], refs[1])
    return layer, sds, x, refs


class _SlowToCast(np.ndarray):
    """A parameter array whose first cast (the cache fill reads weights with
    ``astype``) waits for the test: a deterministic, widened race window."""

    entered = released = None

    def astype(self, *args, **kwargs):
        type(self).entered.set()
        assert type(self).released.wait(TIMEOUT)
        return np.asarray(self).astype(*args, **kwargs)


@pytest.mark.parametrize("write", ["load_state_dict", "load_state_dict windowed", "assign qkv_weight",
                                   "assign rel_pos_h"])
def test_write_during_a_cache_fill_is_never_lost(write):
    """A call is filling the parameter cache from the old weights when a write
    happens: that call may finish with the old weights, but what it built must
    not serve any call that starts after the write returned."""
    layer, sds, x, _ = _race_layers()
    expected = relattn.Attention(16, 2, use_rel_pos=True, input_size=(3, 3), backend="numpy")
    if write.startswith("assign"):
        attr = write.split()[1]
        key = {"qkv_weight": "qkv.weight", "rel_pos_h": "rel_pos_h"}[attr]
        expected.load_state_dict({**sds[0], key: sds[1][key]})
    else:
        expected.load_state_dict(sds[1])
    _SlowToCast.entered, _SlowToCast.released = threading.Event(), threading.Event()
    # The cache fill reads qkv_weight first and proj_bias later: stall it in between.
    layer._params["proj_bias"] = layer._params["proj_bias"].view(_SlowToCast)
    window = 2 if "windowed" in write else None
    results = []
    worker = threading.Thread(target=lambda: results.append(layer(x, window_size=window)))
    worker.start()
    try:
        assert _SlowToCast.entered.wait(TIMEOUT), "the call never filled the cache"
        if write.startswith("assign"):
            setattr(layer, attr, sds[1][key])
        else:
            layer.load_state_dict(sds[1])
    finally:
        _SlowToCast.released.set()
        worker.join(TIMEOUT)
    assert not worker.is_alive() and len(results) == 1
    for _ in range(2):
        np.testing.assert_array_equal(layer(x, window_size=window), expected(x, window_size=window))


class _YieldingNumpy(types.ModuleType):
    """numpy, except that ``asarray`` first yields the GIL: the layer's cache fill
    converts each parameter with ``xp.asarray``, so every fill is slowed down and
    other threads run in the middle of it."""

    class cuda:  # noqa: N801 - the layer asks a non-numpy module for its device
        class Device:
            id = 0

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def asarray(*args, **kwargs):
        time.sleep(0)
        return np.asarray(*args, **kwargs)


@pytest.mark.parametrize("fill", ["plain", "slowed"])
def test_load_state_dict_races_with_calling_threads(fill, monkeypatch):
    """Three threads call the layer while the main thread loads two state dicts
    in turn (two loads back to back, 200 times): the first call after the loads
    returned gives the last one's result, bit-identical to a fresh layer's, and
    every concurrent call gives one of the two results, never a mix of old and
    new parameters. ``slowed`` widens the race window: each cache fill yields
    the GIL once per parameter."""
    import relattn.module

    if fill == "slowed":
        real = relattn.module.array_module
        slow = _YieldingNumpy("numpy")
        monkeypatch.setattr(relattn.module, "array_module", lambda x: slow if real(x) is np else real(x))
    layer, sds, x, refs = _race_layers(dtype=np.float64)   # float64 calls: every fill casts the weights
    stop, errors, calls = threading.Event(), [], [0]
    ref_bytes = {r.tobytes() for r in refs}

    def worker():
        try:
            while not stop.is_set():
                out = layer(x)
                if out.tobytes() not in ref_bytes:
                    errors.append("a concurrent call mixed old and new parameters")
                    return
                calls[0] += 1
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(repr(exc))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # switch threads often: widens every race window
    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    stale = []
    try:
        for i in range(200):
            which = i % 2
            layer.load_state_dict(sds[1 - which])
            layer.load_state_dict(sds[which])
            if layer(x).tobytes() != refs[which].tobytes():
                stale.append(i)
            if errors:
                break
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
    assert not stale, f"{len(stale)} of 200 loads were followed by a call with the old weights"
    assert calls[0] > 0
