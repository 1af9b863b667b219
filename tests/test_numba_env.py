"""The numba backend in odd environments: forked processes, a disabled or
broken numba. relattn either runs correctly or says why, and never hangs;
``explain()`` and the real dispatch agree."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import relattn
from relattn._cache import BoundedCache
from relattn.backends import numba_cpu

pytestmark = pytest.mark.skipif(numba_cpu.unavailable_reason() is not None,
                                reason=f"numba unavailable: {numba_cpu.unavailable_reason()}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, env=None, timeout=240):
    full = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_fork_after_a_numba_call_works():
    """A multiprocessing pool forked after a numba call computes the same
    results (GNU OpenMP's thread pool does not survive a fork: a child runs
    the kernels without threads) and never hangs."""
    run = _python("""
        import multiprocessing as mp, numpy as np, relattn
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, 2, 70, 16), dtype=np.float32) for _ in range(3))

        def work(i):
            return relattn.rel_pos_attention(q * i, k, v, backend="numba")

        parent = [work(i) for i in range(1, 5)]
        with mp.get_context("fork").Pool(2) as pool:
            children = pool.map(work, range(1, 5))
        assert all(np.array_equal(a, b) for a, b in zip(parent, children))
        print("ok")
    """, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


BROKEN = """
    import warnings, numpy as np, relattn
    from relattn import backends
    q = np.random.default_rng(0).standard_normal((1, 1, 8, 4)).astype(np.float32)
    why = backends.get("numba").unavailable_reason()
    assert why is not None
    with warnings.catch_warnings(record=True) as seen:  # one warning per process, whoever asks first
        warnings.simplefilter("always")
        text = relattn.explain(q, q, q)
        assert text.startswith("backend 'numpy' runs"), text
        assert why in text, text
        out = relattn.rel_pos_attention(q, q, q)
        relattn.rel_pos_attention(q, q, q)
    mine = [w for w in seen if "relattn" in str(w.message)]
    assert len(mine) == 1 and why in str(mine[0].message), [str(w.message) for w in seen]
    assert np.array_equal(out, relattn.rel_pos_attention(q, q, q, backend="numpy"))
    try:
        relattn.rel_pos_attention(q, q, q, backend="numba")
    except relattn.BackendError as exc:
        assert why in str(exc), exc
    else:
        raise AssertionError("backend='numba' ran")
    assert "numba" not in backends.available()
    print(why)
"""


@pytest.mark.parametrize("env", [
    {"NUMBA_DISABLE_JIT": "1"},
    {"NUMBA_THREADING_LAYER": "no-such-layer"},
    {"NUMBA_THREADING_LAYER": "tbb"},  # asks for a layer that is not installed here
], ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
def test_broken_numba_environment(env):
    if env.get("NUMBA_THREADING_LAYER") == "tbb":
        try:
            import tbb  # noqa: F401
            pytest.skip("TBB is installed: that layer works here")
        except ImportError:
            pass
    run = _python(BROKEN, env)
    assert run.returncode == 0, run.stderr[-3000:]
    info = _python("import relattn.cli; relattn.cli.main(['info'])", env)
    numba_lines = [ln for ln in info.stdout.splitlines() if "numba" in ln.lower()]
    assert numba_lines and not any("available" in ln and "unavailable" not in ln
                                   and ("not installed" in ln or run.stdout.strip() in ln)
                                   for ln in numba_lines), info.stdout


def test_numba_that_fails_to_import(tmp_path):
    fake = tmp_path / "numba"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('llvmlite is broken here')\n")
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + textwrap.dedent(BROKEN)
    run = _python(code)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "numba failed to import" in run.stdout and "llvmlite is broken here" in run.stdout


def test_numba_not_installed():
    run = _python("import sys; sys.modules['numba'] = None\n" + textwrap.dedent(BROKEN))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "numba is not installed" in run.stdout


def test_kernel_failure_falls_back_once(monkeypatch):
    """A kernel that fails to compile or launch: "auto" warns once and uses the
    reference from then on, explain() says the same, backend="numba" raises."""
    from numba.core.errors import TypingError

    from relattn import functional

    monkeypatch.setattr(numba_cpu, "_broken", None)
    monkeypatch.setattr(numba_cpu, "_checked", True)
    monkeypatch.setattr(functional, "_warned", set())
    monkeypatch.setattr(functional, "_plans", BoundedCache(256))

    def fail(*args, **kwargs):
        raise TypingError("cannot compile here")

    q = np.random.default_rng(1).standard_normal((1, 2, 9, 4)).astype(np.float32)
    want = relattn.rel_pos_attention(q, q, q, backend="numpy")
    relattn.rel_pos_attention(q, q, q)  # planned on numba
    monkeypatch.setattr(numba_cpu, "_launch", fail)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = relattn.rel_pos_attention(q, q, q)
        out2 = relattn.rel_pos_attention(q, q, q)
    assert np.array_equal(out, want) and np.array_equal(out2, want)
    mine = [str(w.message) for w in seen if "relattn" in str(w.message)]
    assert len(mine) == 1 and "cannot compile here" in mine[0], mine
    assert "cannot compile here" in numba_cpu.unavailable_reason()
    assert relattn.explain(q, q, q).startswith("backend 'numpy' runs")
    with pytest.raises(relattn.BackendError, match="cannot compile here"):
        relattn.rel_pos_attention(q, q, q, backend="numba")
