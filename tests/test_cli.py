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


# ---------------------------------------------------------------------------
# Usage mistakes: one line on stderr, exit status 2, before any slow work
# ---------------------------------------------------------------------------


def _usage_error(argv, capsys):
    """Run ``main(argv)``; check it is a usage mistake and return its one stderr line."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own way out, also acceptable
        code = exc.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (code, captured.err)
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert lines[0].startswith("relattn: error: "), lines[0]
    return lines[0]


@pytest.fixture
def slow_work_forbidden(monkeypatch):
    """Fail the test if the benchmark or the demo's layers start."""
    from relattn import _bench

    def forbidden(*args, **kwargs):
        raise AssertionError("slow work started before the usage check")

    for name in ("run_case", "import_torch_first", "sweep", "plot", "numba_first_call_times"):
        monkeypatch.setattr(_bench, name, forbidden)
    monkeypatch.setattr("relattn.Attention", forbidden)


@pytest.mark.parametrize("argv, option", [
    (["--grid", "-3"], "--grid"), (["--grid", "0"], "--grid"), (["demo", "--grid", "0"], "--grid"),
    (["--grid", "x"], "--grid"), (["--grid", "2.5"], "--grid"), (["--grid", "10" * 3000], "--grid"),
    (["--grid", "100000"], "--grid"), (["--seed", "-1"], "--seed"), (["--seed", "nan"], "--seed"),
    (["check", "--seed", "-2"], "--seed"), (["check", "--seed", "1e3"], "--seed"),
    (["bench", "--budget", "0"], "--budget"), (["bench", "--budget", "-1"], "--budget"),
    (["bench", "--budget", "nan"], "--budget"), (["bench", "--budget", "inf"], "--budget"),
    (["bench", "--budget", "1e999"], "--budget"), (["bench", "--budget", "abc"], "--budget"),
    (["bench", "--sweep-grids", "4,x"], "--sweep-grids"), (["bench", "--sweep-grids", "4,,8"], "--sweep-grids"),
    (["bench", "--sweep-grids", "0,8"], "--sweep-grids"), (["bench", "--sweep-grids", ""], "--sweep-grids"),
    (["bench", "--dtype", "int8"], "--dtype"), (["--dtype", "float128"], "--dtype"),
    (["--backend", "torch"], "--backend"), (["bench", "--backend", "jax"], "--backend"),
    (["--nope"], "unrecognized"), (["bench", "--grid", "8"], "unrecognized"),
], ids=lambda a: " ".join(a)[:40] if isinstance(a, list) else a)
def test_bad_option_values(argv, option, capsys, slow_work_forbidden):
    line = _usage_error(argv, capsys)
    assert line.startswith(f"relattn: error: {option}"), line
    assert len(line) < 400


def test_unknown_case_lists_the_known_ones(capsys, slow_work_forbidden):
    from relattn import _bench

    line = _usage_error(["bench", "--case", "tiny", "--case", "nope", "--no-torch"], capsys)
    assert line.startswith("relattn: error: --case: unknown 'nope'"), line
    assert all(name in line for name in _bench.CASES)


@pytest.mark.parametrize("argv", [["--backend", "{name}", "--grid", "2"],
                                  ["bench", "--case", "tiny", "--backend", "{name}", "--no-torch"]])
def test_unavailable_backend_says_why(argv, capsys, monkeypatch, slow_work_forbidden):
    """Any unavailable backend (CuPy without a GPU here, or one made unavailable) is a
    usage mistake whose message carries the backend's own reason."""
    import relattn

    unavailable = [n for n in relattn.backends.names() if relattn.backends.get(n).unavailable_reason()]
    if not unavailable:   # every backend runs here: make one unavailable
        monkeypatch.setattr(relattn.backends.get("numba"), "unavailable_reason", lambda: "switched off for a test")
        unavailable = ["numba"]
    for name in unavailable:
        line = _usage_error([a.format(name=name) for a in argv], capsys)
        why = relattn.backends.get(name).unavailable_reason()
        assert line.startswith(f"relattn: error: --backend {name}: unavailable here"), line
        assert " ".join(why.split()) in line


@pytest.mark.parametrize("where", ["missing directory", "a file as directory", "a directory", "read-only file"])
def test_unwritable_json_path_is_refused_before_the_benchmark(where, tmp_path, capsys, slow_work_forbidden):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    path = {"missing directory": tmp_path / "no" / "b.json", "a file as directory": blocker / "b.json",
            "a directory": tmp_path, "read-only file": blocker}[where]
    if where == "read-only file":
        import os

        blocker.chmod(0o444)
        if os.access(blocker, os.W_OK):   # root writes anyway: nothing to refuse
            pytest.skip("running as a user who may write read-only files")
    line = _usage_error(["bench", "--case", "tiny", "--no-torch", "--json", str(path)], capsys)
    assert line.startswith("relattn: error: --json: "), line
    assert blocker.read_text() == "keep"   # never truncated


def test_plot_path_is_checked_before_the_benchmark(tmp_path, capsys, slow_work_forbidden):
    pytest.importorskip("matplotlib")
    line = _usage_error(["bench", "--case", "tiny", "--no-torch", "--plot", str(tmp_path / "a.nope")], capsys)
    assert line.startswith("relattn: error: --plot: expected an image file"), line
    line = _usage_error(["bench", "--case", "tiny", "--no-torch", "--plot", str(tmp_path / "x" / "a.png")], capsys)
    assert line.startswith("relattn: error: --plot: cannot write"), line


def test_writable_json_check_leaves_no_file_behind(tmp_path, capsys, slow_work_forbidden):
    """The check creates nothing: a later usage mistake leaves the directory as it was."""
    path = tmp_path / "b.json"
    _usage_error(["bench", "--case", "tiny", "--no-torch", "--json", str(path), "--plot", str(tmp_path / "a.nope")],
                 capsys)
    assert not path.exists()


def test_demo_checks_come_before_any_layer(capsys, slow_work_forbidden):
    _usage_error(["--grid", "0"], capsys)
    _usage_error(["demo", "--seed", "-5"], capsys)


def test_usage_mistake_from_the_command_line_is_one_line():
    """The installed entry point: exit status 2, one stderr line, no traceback."""
    for argv in (["--grid", "-1"], ["bench", "--case", "nope"],
                 ["bench", "--case", "tiny", "--no-torch", "--budget", "-1"]):
        proc = subprocess.run([sys.executable, "-m", "relattn", *argv], capture_output=True, text=True, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("relattn: error: "), proc.stderr
        assert proc.stdout == ""


# ---------------------------------------------------------------------------
# info: each backend's status comes from its unavailable_reason() alone
# ---------------------------------------------------------------------------


def _info_lines(capsys):
    assert main(["info"]) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("numba_reason", [None, "numba is not installed"])
def test_info_status_follows_unavailable_reason(numba_reason, capsys, monkeypatch):
    """Whatever the numba import does, info reports each backend exactly as its
    unavailable_reason() says, and never calls an available backend 'not installed'."""
    import relattn

    monkeypatch.setattr(relattn.backends.get("numba"), "unavailable_reason", lambda: numba_reason)
    monkeypatch.setitem(sys.modules, "numba", None)   # `import numba` fails in info
    lines = _info_lines(capsys)
    for name in relattn.backends.names():
        why = relattn.backends.get(name).unavailable_reason()
        status = [line.split(None, 1) for line in lines if line.startswith("  ") and line.split()[0] == name]
        assert status == [[name, "available" if why is None else f"unavailable: {why}"]], lines
        if why is None:
            mentions = [line for line in lines if name in line.lower() and "not installed" in line]
            assert not mentions, lines
        else:   # an unavailable backend gets no detail lines of its own
            assert not [line for line in lines if line.lower().startswith(name + " ")], lines


def test_info_reports_numba_threads_when_available(capsys):
    import relattn

    lines = _info_lines(capsys)
    if relattn.backends.get("numba").unavailable_reason() is None:
        assert any(line.startswith("numba ") and "threads" in line for line in lines), lines
    else:
        assert not any(line.startswith("numba") for line in lines), lines
