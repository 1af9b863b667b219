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
