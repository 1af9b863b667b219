"""The command line: demo (main job), info, check, bench with --json and --plot."""

import io
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from relattn.cli import main


def test_demo_small_grid_checks_against_reference(capsys):
    assert main(["--grid", "16"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "global" in out and "windowed" in out and out.strip().endswith("OK")
    # Not silent during the long steps: stderr names each one before it starts.
    for step in ("global: 3 timed calls", "global: float64 reference", "windowed: float64 reference"):
        assert step in captured.err, captured.err
    assert "4/4 done" in captured.err


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
    and its flash backend (the targets' anchor kernel); float32 has no
    flash kernel, so only the default."""
    from relattn import _bench

    rows = _bench.run_case(_bench.CASES["tiny"], ["cupy"], dtype=dtype, budget_s=0.02, log=lambda *_: None)
    by = {r.impl: r for r in rows}
    assert "torch-sdpa-nobias-cuda" in by and "cupy" in by
    assert ("torch-sdpa-flash-nobias-cuda" in by) == (dtype == "bfloat16")
    assert all(r.time_s > 0 for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_torch_and_cupy(), reason="needs CuPy, PyTorch with CUDA and a device")
def test_device_peak_counts_live_bytes():
    """The GPU peak is the high-water mark of live bytes: 8 MiB held while 4 MiB
    more is allocated peaks at 12 MiB, and freed blocks the pool caches (then
    reused by a second 8 MiB array) do not add up."""
    import cupy

    from relattn import _bench

    mib = 2**20

    def fn():
        a = cupy.empty(8 * mib, dtype=cupy.uint8)
        b = cupy.empty(4 * mib, dtype=cupy.uint8)
        del a, b
        c = cupy.empty(8 * mib, dtype=cupy.uint8)
        del c

    kept = cupy.empty(mib, dtype=cupy.uint8)  # held before: not counted
    assert _bench.device_peak_extra(fn) == 12 * mib
    del kept


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


# ---------------------------------------------------------------------------
# --help: plain text, every option explained, the bench cases listed
# ---------------------------------------------------------------------------

COMMANDS = [[], ["demo"], ["info"], ["check"], ["bench"], ["warmup"]]


def _help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def _option_entries(text):
    """(invocation, help) of each entry of argparse's options section."""
    lines = text.splitlines()
    entries = []
    for i, line in enumerate(lines):
        if not line.startswith("  -"):
            continue
        invocation, _, help_text = line.strip().partition("  ")
        if not help_text.strip() and i + 1 < len(lines):
            following = lines[i + 1]
            if re.match(r"\s{6,}\S", following) and not following.lstrip().startswith("-"):
                help_text = following
        entries.append((invocation, help_text.strip()))
    return entries


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a) or "relattn")
def test_help_is_plain_text_and_every_option_has_help(argv, capsys):
    text = _help(argv, capsys)
    for markup in ("``", ":class:", ":func:", ":mod:"):
        assert markup not in text, text
    entries = _option_entries(text)
    assert entries and entries[0][0] == "-h, --help", text
    missing = [invocation for invocation, help_text in entries if not help_text]
    assert not missing, text


def test_every_parser_action_has_a_one_line_help():
    """The same, on the parser itself: no option (or command) without a one-line help."""
    import argparse

    from relattn.cli import _build_parser

    parsers, seen = [("relattn", _build_parser())], 0
    while parsers:
        name, parser = parsers.pop()
        for action in parser._actions:
            seen += 1
            assert action.help and action.help is not argparse.SUPPRESS, (name, action.option_strings)
            assert "\n" not in action.help and "``" not in action.help, (name, action.help)
            if isinstance(action, argparse._SubParsersAction):
                assert {c.dest for c in action._choices_actions} == set(action.choices), name
                assert all(c.help for c in action._choices_actions), name
                parsers += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    assert seen > 20


def test_bench_help_lists_the_cases(capsys):
    from relattn import _bench

    text = _help(["bench"], capsys)
    for case in _bench.CASES.values():
        assert any(line.split()[:1] == [case.name] and case.note in line for line in text.splitlines()), case.name
    assert "pip install torch" in text


# ---------------------------------------------------------------------------
# bench without PyTorch, the default --plot sweep, the progress bar
# ---------------------------------------------------------------------------


def _python(code, timeout=300, **env):
    full = {**os.environ, **env}
    quiet = 'import logging; logging.getLogger("relattn").setLevel(logging.ERROR)\n'   # no compile notice
    return subprocess.run([sys.executable, "-c", quiet + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=full)


def test_bench_plots_without_torch(tmp_path):
    """PyTorch absent: the table and the plot still come, without the anchor column,
    and one line on stderr says why the anchors are missing and how to get them."""
    pytest.importorskip("matplotlib")
    png = tmp_path / "b.png"
    proc = _python(f"""
        import sys
        sys.modules["torch"] = None   # as if PyTorch were not installed
        from relattn.cli import main
        sys.exit(main(["bench", "--case", "tiny", "--budget", "0.02", "--plot", {str(png)!r},
                       "--sweep-grids", "4,8"]))
    """)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "PyTorch" in line]
    assert len(notes) == 1 and "not installed" in notes[0] and "pip install torch" in notes[0], proc.stderr
    head = proc.stdout.splitlines()[0]
    assert head.split()[:2] == ["case", "impl"] and "x seed" not in head, proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines()[2:] if line.startswith("tiny ")]
    assert rows and not [r for r in rows if r[1].startswith("torch")], proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_no_torch_skips_the_anchors_without_a_note(capsys):
    assert main(["bench", "--case", "tiny", "--budget", "0.02", "--no-torch"]) == 0
    captured = capsys.readouterr()
    assert "PyTorch" not in captured.err
    assert "x seed" not in captured.out
    assert "torch" not in captured.out


def test_table_leaves_out_columns_no_result_fills():
    from relattn import _bench

    row = dict(case="tiny", dtype="float32", time_s=1e-3, gflops=1.0, peak_extra_mib=0.0, max_rel_err=1e-7)
    plain = _bench.format_table([_bench.Result(impl="numpy", **row)])
    assert "x seed" not in plain and "graph" not in plain and "host" not in plain
    assert " - " not in plain.splitlines()[-1] + " "
    anchored = _bench.format_table([_bench.Result(impl="torch-seed-form", vs_anchor=1.0, **row),
                                    _bench.Result(impl="numpy", vs_anchor=0.5, **row)])
    assert "x seed" in anchored.splitlines()[0] and "graph" not in anchored


def test_default_sweep_is_small():
    """The default --plot sweep stays small (it once ran to 96x96 at 12 heads: minutes)."""
    from relattn import _bench
    from relattn.cli import _build_parser

    args = _build_parser().parse_args(["bench"])
    assert max(args.sweep_grids) <= 32 and args.sweep_heads <= 4
    assert max(_bench.SWEEP_GRIDS) <= 32 and _bench.SWEEP_HEADS <= 4
    assert _build_parser().parse_args(["bench", "--sweep-grids", "16,96"]).sweep_grids == [16, 96]


@pytest.mark.slow
def test_default_plot_run_is_quick(tmp_path):
    """`relattn bench --case tiny --no-torch --plot x.png`, default budget and sweep:
    well under a minute on 2 cores."""
    pytest.importorskip("matplotlib")
    png = tmp_path / "x.png"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "relattn", "bench", "--case", "tiny", "--no-torch",
                           "--plot", str(png)], capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert png.exists() and elapsed < 60, elapsed


class _Terminal(io.StringIO):
    """stdout and stderr of one terminal."""

    def isatty(self):
        return True

    def screen(self):
        """The lines as a terminal shows them ("\r" returns to the line's start)."""
        lines = []
        for raw in self.getvalue().split("\n"):
            cells = []
            for part_index, part in enumerate(raw.split("\r")):
                cells[:len(part)] = part
            lines.append("".join(cells).rstrip())
        return lines


def test_progress_bar_completes_and_never_shares_a_line_with_the_table(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    term = _Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["bench", "--case", "tiny", "--budget", "0.02", "--no-torch", "--plot", str(tmp_path / "p.png"),
                 "--sweep-grids", "4,8"]) == 0
    monkeypatch.undo()
    screen = term.screen()
    bars = [line for line in screen if line.startswith("[") and "/" in line]
    done = [line for line in bars if line.endswith(" done")]
    assert len(done) == 2, screen   # the cases, then the sweep
    for line in done:
        count = re.search(r"\] (\d+)/(\d+) done$", line)
        assert count and count.group(1) == count.group(2), line
    head = [i for i, line in enumerate(screen) if line.startswith("case ")]
    assert len(head) == 1 and screen.index(done[0]) < head[0] < screen.index(done[1]), screen
    assert not [line for line in screen if "[#" in line and ("case" in line or "plot written" in line)], screen
    # the bar's line is ended before the table starts
    raw = term.getvalue()
    assert raw[raw.index("case ") - 1] == "\n"


def test_progress_lines_off_a_terminal(capsys):
    assert main(["bench", "--case", "tiny", "--budget", "0.02", "--no-torch", "--backend", "numpy"]) == 0
    captured = capsys.readouterr()
    bars = [re.match(r"\[[#-]+\] (\d+)/(\d+) (.*)", line) for line in captured.err.splitlines()]
    assert all(bars), captured.err
    counts = [(int(m.group(1)), int(m.group(2))) for m in bars]
    assert counts == [(1, 2), (2, 2), (2, 2)], captured.err   # the reference, numpy; then "done"
    assert bars[-1].group(3) == "done"
    assert captured.out.startswith("case ")


def test_case_steps_match_the_steps_run_case_logs():
    """The bar's total is the number of steps run_case reports, with the anchors or without."""
    from relattn import _bench

    for with_torch in (False, True):
        logged = []
        _bench.run_case(_bench.CASES["tiny"], ["numpy"], budget_s=0.01, with_torch=with_torch, log=logged.append)
        assert len(logged) == _bench.case_steps(["numpy"], with_torch=with_torch), logged
        assert len(logged) == 2 + 2 * (with_torch and _bench.torch_problem() is None)


def test_progress_erases_itself_when_the_work_fails():
    from relattn import _bench

    term = _Terminal()
    with pytest.raises(KeyError):
        with _bench.Progress(3, stream=term) as progress:
            progress.step("one")
            raise KeyError("boom")
    assert term.screen() == [""] and "done" not in term.getvalue()
