"""First use of the numba kernels: the compile notice, and ``relattn warmup``,
which compiles every CPU kernel into numba's on-disk cache ahead of use."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import relattn
from relattn.backends import numba_cpu
from relattn.cli import main

needs_numba = pytest.mark.skipif(numba_cpu.unavailable_reason() is not None,
                                 reason=f"numba unavailable: {numba_cpu.unavailable_reason()}")

NOTICE = "relattn: compiling the numba kernels"

# A first call per dtype, twice for float32 (and float16, computed in float32).
CALLS = """
import numpy as np, relattn
for dt in {dtypes}:
    q = np.ones((1, 2, 64, 16), dt)
    t = np.zeros((15, 16), dt)
    relattn.rel_pos_attention(q, q, q, t, t, (8, 8), backend="numba")
print("ok")
"""


def _run(args, cache, **env):
    full = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    full.update(env)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=full)
    return proc, time.perf_counter() - t0


def _calls(dtypes):
    return ["-c", textwrap.dedent(CALLS.format(dtypes=dtypes))]


def _notices(stderr):
    return [line for line in stderr.splitlines() if line.startswith(NOTICE)]


# ---------------------------------------------------------------------------
# The notice, in this process (kernels already compiled or cached: the
# compile decision is stubbed)
# ---------------------------------------------------------------------------


def _call(dtype):
    q = np.ones((1, 1, 16, 8), dtype)
    t = np.zeros((7, 8), dtype)
    return relattn.rel_pos_attention(q, q, q, t, t, (4, 4), backend="numba")


@needs_numba
def test_notice_once_per_dtype(monkeypatch, caplog):
    """A warning of the relattn logger (on stderr without a logging set-up:
    the subprocess tests below see it there)."""
    monkeypatch.setattr(numba_cpu, "_noticed", set())
    monkeypatch.setattr(numba_cpu, "_will_compile", lambda dispatcher, args: True)
    with caplog.at_level("WARNING", logger="relattn"):
        for dtype in (np.float32, np.float32, np.float16, np.float64, np.float64):
            _call(dtype)
    lines = [r.getMessage() for r in caplog.records if r.name == "relattn"]
    assert len(lines) == 2 and all(line.startswith(NOTICE) for line in lines), lines
    assert "for float32," in lines[0] and "for float64," in lines[1]
    assert "relattn warmup" in lines[0]


@needs_numba
def test_notice_silenced_through_logging(monkeypatch, caplog):
    import logging

    monkeypatch.setattr(numba_cpu, "_noticed", set())
    monkeypatch.setattr(numba_cpu, "_will_compile", lambda dispatcher, args: True)
    logger = logging.getLogger("relattn")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        _call(np.float32)
    finally:
        logger.setLevel(old)
    assert not [r for r in caplog.records if r.name == "relattn"]


@needs_numba
def test_no_notice_once_compiled(monkeypatch, caplog):
    """After a call, the same argument types are compiled in this process: no notice."""
    _call(np.float32)
    monkeypatch.setattr(numba_cpu, "_noticed", set())
    with caplog.at_level("WARNING", logger="relattn"):
        _call(np.float32)
    assert not [r for r in caplog.records if r.name == "relattn"]


# ---------------------------------------------------------------------------
# Fresh processes with their own numba cache (slow: these really compile)
# ---------------------------------------------------------------------------


@needs_numba
@pytest.mark.slow
def test_first_compile_says_so_once_and_a_cached_load_does_not(tmp_path):
    cache = tmp_path / "numba-cache"
    proc, _ = _run(_calls("(np.float32, np.float32, np.float16)"), cache)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    lines = _notices(proc.stderr)
    assert len(lines) == 1 and "for float32," in lines[0], proc.stderr
    assert str(cache) in lines[0]                       # says where the cache lives
    proc, _ = _run(_calls("(np.float32,)"), cache)     # loaded from the cache: silent
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@needs_numba
@pytest.mark.slow
def test_warmup_fills_the_cache_once(tmp_path):
    cache = tmp_path / "numba-cache"
    proc, _ = _run(["-m", "relattn", "warmup"], cache)
    assert proc.returncode == 0, proc.stderr
    assert str(cache) in proc.stdout and "4 compiled" in proc.stdout, proc.stdout
    assert proc.stderr.splitlines()[-1].endswith("4/4 done"), proc.stderr
    names = [name for _, _, files in os.walk(cache) for name in files]
    for kernel in ("_attention_fwd_f32", "_attention_fwd_generic", "_attention_fwd_f32_serial",
                   "_attention_fwd_generic_serial"):
        assert any(n.startswith(f"_numba_kernels.{kernel}-") and n.endswith(".nbi") for n in names), names
    assert sum(n.endswith(".nbc") for n in names) >= 4

    proc, seconds = _run(["-m", "relattn", "warmup"], cache)   # everything cached now
    assert proc.returncode == 0 and "0 compiled" in proc.stdout, proc.stdout
    assert seconds < 8, seconds

    # The backend's own calls find what warmup compiled: no compile, no notice.
    proc, _ = _run(_calls("(np.float32, np.float64, np.float16)"), cache)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert proc.stderr == "", proc.stderr


# ---------------------------------------------------------------------------
# warmup where it cannot help: one line, exit status 1
# ---------------------------------------------------------------------------


def test_warmup_without_numba(monkeypatch, capsys):
    monkeypatch.setattr(numba_cpu, "unavailable_reason", lambda: "numba is not installed (pip install numba)")
    assert main(["warmup"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "relattn: warmup: the numba backend is unavailable here (numba is not installed (pip install numba)); "
        "nothing to compile"]


@needs_numba
def test_warmup_without_a_cache_directory(monkeypatch, capsys):
    from types import SimpleNamespace

    from relattn.backends import _numba_kernels

    monkeypatch.setattr(_numba_kernels, "_attention_fwd_f32", SimpleNamespace(stats=SimpleNamespace(cache_path=None)))
    assert main(["warmup"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "NUMBA_CACHE_DIR" in lines[0], lines
