"""bench/bench_backward.py end to end: the --quick CPU run in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from relattn import _bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "bench_backward.py")


def _run(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--quick", "--runs", "2", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _numba_backend():
    from relattn import backends

    return "numba" if backends.get("numba").unavailable_reason() is None else "numpy"


@pytest.mark.skipif(_bench.torch_problem() is not None, reason=f"needs PyTorch: {_bench.torch_problem()}")
def test_quick_cpu_run_prints_every_row_and_target(tmp_path):
    path = tmp_path / "rows.json"
    run = _run("--case", "sam-b-window", "--case", "sam-b-global", "--layer", "--json", str(path))
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    for case in ("sam-b-window-quick", "sam-b-global-quick"):
        for what in ("torch seed autograd (SAM eager)", "torch SDPA no bias (default)", "relattn.torch bridge",
                     f"relattn vjp + pullback ({_numba_backend()})"):
            assert any(line.startswith(case) and what in line for line in out.splitlines()), (case, what, out)
        for what in ("torch seed module step", "relattn Attention.vjp step"):
            assert any(line.startswith(f"{case} layer") and what in line for line in out.splitlines()), (what, out)
    # the CPU targets: global time and memory, windowed time; each line says met or not met
    target_lines = [line for line in out.splitlines() if "<=" in line and line.startswith("  ")]
    assert len(target_lines) == 3, out
    assert all(line.endswith("target met") or "not met (" in line for line in target_lines), target_lines
    assert "x seed" in out and "peak MiB" in out
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert len(rows) == 12 and len(data["targets"]) == 3
    for row in rows:
        assert row["time_ms"] > 0
        assert row["peak_mib"] is None or row["peak_mib"] >= 0
        if row["what"].startswith("relattn"):
            assert row["x_seed"] > 0
            assert row["max_diff"] < 1e-4, row      # the same gradients as PyTorch's autograd


def test_quick_cpu_run_without_torch_says_so():
    run = _run("--case", "sam-b-window", "--no-torch")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "relattn rows only" in run.stdout
    assert "relattn vjp + pullback" in run.stdout and "torch seed autograd" not in run.stdout
    assert "not measured (anchor missing)" in run.stdout
