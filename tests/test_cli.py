"""The command line: demo (main job), info, check, bench with --json and --plot."""

import json
import subprocess
import sys

import pytest

from relattn.cli import main


def test_demo_small_grid_checks_against_reference(capsys):
    assert main(["--grid", "16"]) == 0
    out = capsys.readouterr().out
    assert "global" in out and "windowed" in out and out.strip().endswith("OK")


def test_info_lists_every_backend(capsys):
    import relattn

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in relattn.backends.names():
        assert name in out


def test_check_passes_on_every_available_backend(capsys):
    assert main(["check"]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_bench_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path_json, path_png = tmp_path / "b.json", tmp_path / "b.png"
    code = main(["bench", "--case", "tiny", "--budget", "0.05", "--no-torch", "--json", str(path_json),
                 "--plot", str(path_png), "--sweep-grids", "4,8"])
    assert code == 0
    rows = json.loads(path_json.read_text())
    assert {r["impl"] for r in rows} >= {"numpy"}
    assert all(r["max_rel_err"] < 1e-5 for r in rows)
    assert path_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_unknown_case(capsys):
    assert main(["bench", "--case", "nope"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "relattn", "info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "relattn" in proc.stdout


def test_bench_anchors_no_flash_backend_on_cpu():
    """On the CPU the no-bias anchor is SDPA's default dispatch only."""
    pytest.importorskip("torch")
    from relattn import _bench

    rows = _bench.run_case(_bench.CASES["tiny"], ["numpy"], budget_s=0.02, log=lambda *_: None)
    impls = [r.impl for r in rows]
    assert impls[:2] == ["torch-seed-form", "torch-sdpa-nobias"]
    assert not any("flash" in i for i in impls)
    assert rows[0].max_rel_err < 1e-5


def _cuda_torch_and_cupy():
    try:
        import cupy
        import torch

        return cupy.cuda.runtime.getDeviceCount() > 0 and torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no CuPy, no torch, or no device
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_torch_and_cupy(), reason="needs CuPy, PyTorch with CUDA and a device")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bench_gpu_anchors_include_sdpa_flash_backend(dtype):
    """On CUDA, 16-bit cases time SDPA twice without a bias: its default dispatch
    and its flash backend (the kernel issue 4's anchor names); float32 has no
    flash kernel, so only the default."""
    from relattn import _bench

    rows = _bench.run_case(_bench.CASES["tiny"], ["cupy"], dtype=dtype, budget_s=0.02, log=lambda *_: None)
    by = {r.impl: r for r in rows}
    assert "torch-sdpa-nobias-cuda" in by and "cupy" in by
    assert ("torch-sdpa-flash-nobias-cuda" in by) == (dtype == "bfloat16")
    assert all(r.time_s > 0 for r in rows)
