"""Thread safety, and the numba kernel cache with no writable cache location.

* 8 threads x 20 calls on ONE shared ``Attention`` instance (global and
  windowed, two input grids so the parameter cache is filled concurrently)
  and on the functional API: every result bit-identical to the serial one,
  no crash, no deadlock (every wait has a timeout).
* The numba runs go through a subprocess: a threading layer that is not
  thread safe (numba's ``workqueue``) aborts the whole process, which must
  fail one test, not kill the test run.
* relattn still works when numba cannot write its kernel cache anywhere.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import textwrap

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
