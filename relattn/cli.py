"""The relattn command line: the SAM attention demo (main job), info, check, bench, warmup.

A usage mistake (a bad option value, an unknown case, an unavailable backend,
an output file that cannot be written) is reported as one line on stderr,
"relattn: error: ...", with exit status 2, before any slow work starts.
Progress bars and notices go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

import relattn
from relattn import backends
from relattn._arrays import describe


class UsageError(Exception):
    """A mistake in the command line: one line on stderr and exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as :class:`UsageError` (one line, no usage block)."""

    def error(self, message):
        message = message[len("argument "):] if message.startswith("argument ") else message
        raise UsageError(f"{message} (see {self.prog} --help)")


def _largest_reference_grid() -> int:
    """The largest grid side whose global float64 reference the numpy backend takes:
    one head's (grid**2)**2 float64 logits within its ``MAX_HEAD_BYTES``."""
    from relattn.backends.reference import MAX_HEAD_BYTES

    side = 1
    while (side + 1) ** 4 * 8 <= MAX_HEAD_BYTES:
        side += 1
    return side


MAX_GRID = _largest_reference_grid()


def _int_option(low, high=None, what=""):
    """An argparse type: an integer in ``[low, high]``."""
    expected = f"an integer {f'>= {low}' if high is None else f'in [{low}, {high}]'}{what}"

    def parse(text):
        try:
            value = int(text, 10)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {describe(text)}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {describe(value)}")
        return value

    return parse


def _positive_seconds(text):
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {describe(text)}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds, got {describe(text)}")
    return value


def _grid_list(text):
    """An argparse type: comma-separated grid sides, each in ``[1, MAX_GRID]``."""
    parse = _int_option(1, MAX_GRID, " for each grid side")
    parts = text.split(",") if isinstance(text, str) else []
    if not parts or any(not p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated grid sides such as 16,32, got {describe(text)}")
    return [parse(p.strip()) for p in parts]


def _check_backend(option, name):
    """``name`` ("auto" or a backend) must run here; the message says why not."""
    if name == "auto":
        return
    why = backends.get(name).unavailable_reason()
    if why is not None:
        raise UsageError(f"{option} {name}: unavailable here ({why})")


def _check_dtype(option, name):
    try:
        return relattn._arrays.resolve_dtype("dtype", name)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{option}: {str(exc).split(': ', 1)[-1]}") from None


def _check_writable(option, path):
    """Fail now, not after the benchmark, when ``path`` cannot be written.

    The file is opened for appending (never truncated); one this check creates
    is removed again. Non-blocking, so a FIFO without a reader is refused
    rather than waited on.
    """
    if os.path.isdir(path):
        raise UsageError(f"{option}: expected a file to write, got the directory {path!r}")
    existed = os.path.lexists(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), 0o666)
    except OSError as exc:
        raise UsageError(f"{option}: cannot write {path!r} ({exc.strerror or exc})") from None
    os.close(fd)
    if not existed:
        try:
            os.remove(path)
        except OSError:
            pass


def _best_array_module():
    if "cupy" in backends.available():
        import cupy

        return cupy
    return np


def _sync(xp):
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def _timed(fn, xp, repeats=3):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(xp)
        times.append(time.perf_counter() - t0)
    return out, times


def _to_host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def cmd_demo(args) -> int:
    """SAM-B attention, global 64x64 and windowed 14x14, on the best backend, checked."""
    from relattn import _bench

    _check_backend("--backend", args.backend)
    dtype = _check_dtype("--dtype", args.dtype)
    xp = np if args.backend in ("numpy", "numba") else _best_array_module()
    rng = np.random.default_rng(args.seed)
    x_host = rng.standard_normal((1, args.grid, args.grid, 768), dtype=np.float32)
    print(f"relattn {relattn.__version__}: SAM-B attention (dim 768, 12 heads, head_dim 64), seed {args.seed}")
    print(f"array module: {xp.__name__}, dtype: {args.dtype}, backends available: {', '.join(backends.available())}",
          flush=True)
    worst = 0.0
    # Each step below can take seconds (the first numba call compiles, the float64
    # reference of the global case builds 12 x 4096 x 4096 logits): a bar on stderr says which runs.
    with _bench.Progress(4, clear=True) as progress:
        for label, input_size, window in (("global", (64, 64), 0), ("windowed", (14, 14), 14)):
            layer = relattn.Attention(768, 12, use_rel_pos=True, rel_pos_zero_init=False, input_size=input_size,
                                      window_size=window, dtype=dtype, backend=args.backend, rng=rng)
            layer.rel_pos_h = layer.rel_pos_h * 10.0  # trained SAM tables are far from N(0, 0.02)
            layer.rel_pos_w = layer.rel_pos_w * 10.0
            x = xp.asarray(x_host.astype(dtype))
            progress.step(f"{label}: 3 timed calls")
            out, times = _timed(lambda: layer(x), xp)
            progress.step(f"{label}: float64 reference (numpy)")
            reference = relattn.Attention(768, 12, use_rel_pos=True, input_size=input_size, window_size=window,
                                          dtype="float64", backend="numpy")
            reference.load_state_dict(layer.state_dict())
            expected = reference(x_host.astype(np.float64))
            got = _to_host(out).astype(np.float64)
            err = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
            worst = max(worst, err)
            name = _core_backend(layer, x)
            windows = f", {int(np.ceil(args.grid / 14)) ** 2} windows of 14x14" if window else ""
            print(
                f"  {label:<8} x{tuple(x.shape)}{windows}: backend {name}, "
                f"first call {times[0] * 1e3:.1f} ms, then {min(times[1:]) * 1e3:.1f} ms, "
                f"max rel error vs float64 reference {err:.2e}", flush=True
            )
    tolerance = 1e-5 if np.dtype(dtype) in (np.float32, np.float64) else 2e-2
    ok = worst <= tolerance
    print("OK" if ok else f"MISMATCH: error {worst:.2e} above {tolerance:.0e}")
    return 0 if ok else 1


def _core_backend(layer, x):
    """Name of the backend ``auto`` (or the forced one) takes for this layer's core."""
    xp = relattn._arrays.array_module(x)
    shape = (1, layer.num_heads, 196, layer.head_dim)
    probe = xp.zeros(shape, dtype=np.float32 if x.dtype != np.float64 else np.float64)
    first = relattn.explain(probe, probe, probe, backend=layer.backend).splitlines()[0]
    return first.split("'")[1]


def cmd_info(args) -> int:
    print(f"relattn {relattn.__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}, numpy {np.__version__}")
    print("backends (auto priority order):")
    # Each backend's status comes from its unavailable_reason() alone; the details
    # below are printed only for backends it reports available.
    reasons = {name: backends.get(name).unavailable_reason() for name in backends.names()}
    for name, why in reasons.items():
        print(f"  {name:<6} {'available' if why is None else 'unavailable: ' + why}")
    if "numba" in reasons and reasons["numba"] is None:
        try:
            import numba

            print(f"numba {numba.__version__}: {numba.get_num_threads()} threads "
                  f"(NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'unset')})")
        except Exception as exc:  # noqa: BLE001 - details only; the status line above stands
            print(f"numba threads: could not be read ({type(exc).__name__})")
    if "cupy" in reasons and reasons["cupy"] is None:
        try:
            import cupy

            for i in range(cupy.cuda.runtime.getDeviceCount()):
                props = cupy.cuda.runtime.getDeviceProperties(i)
                print(f"cuda device {i}: {props['name'].decode()} ({props['totalGlobalMem'] / 2**30:.0f} GiB)")
        except Exception as exc:  # noqa: BLE001 - details only; the status line above stands
            print(f"cuda devices: could not be listed ({type(exc).__name__})")
    bf16 = relattn._arrays.BFLOAT16 is not None
    print(f"dtypes: float16, float32, float64{', bfloat16 (ml_dtypes)' if bf16 else ' (bfloat16 needs ml_dtypes)'}")
    return 0


def cmd_check(args) -> int:
    """Every available backend against the float64 reference on random SAM-like cases."""
    rng = np.random.default_rng(args.seed)
    cases = [  # (B, heads, q grid, k grid, head_dim, table rows)
        (2, 3, (14, 14), (14, 14), 64, (27, 27)),
        (1, 2, (16, 12), (16, 12), 80, (31, 23)),
        (1, 2, (20, 20), (20, 20), 64, (27, 27)),      # tables upsampled
        (2, 1, (8, 8), (4, 4), 32, (15, 15)),          # q_size != k_size (pooled keys)
        (1, 1, (7, 9), (7, 9), 17, (13, 17)),
    ]
    failed = False
    for name in backends.available():
        xp = np if backends.get(name).ARRAY_MODULE == "numpy" else __import__("cupy")
        worst = 0.0
        for batch, heads, qs, ks, hd, rows in cases:
            q = rng.standard_normal((batch, heads, qs[0] * qs[1], hd))
            k, v = (rng.standard_normal((batch, heads, ks[0] * ks[1], hd)) for _ in range(2))
            th, tw = (0.5 * rng.standard_normal((r, hd)) for r in rows)
            ref = relattn.rel_pos_attention(q, k, v, th, tw, qs, ks, backend="numpy")
            for dtype, tol in (("float32", 2e-5), ("float64", 1e-10)):
                args_dev = [xp.asarray(a.astype(dtype)) for a in (q, k, v, th, tw)]
                out = _to_host(relattn.rel_pos_attention(*args_dev, qs, ks, backend=name))
                err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
                worst = max(worst, err / tol)
                if err > tol:
                    failed = True
                    print(f"  {name}: {dtype} case {qs}->{ks} hd {hd}: error {err:.2e} > {tol:.0e}")
        print(f"{name:<6} worst error / tolerance: {worst:.3f} {'OK' if worst <= 1 else 'FAIL'}")
    return 1 if failed else 0


def cmd_bench(args) -> int:
    from relattn import _bench

    # Every usage check before the slow part (importing torch, the reference, the timings).
    names = args.case or list(DEFAULT_CASES)
    unknown = [n for n in names if n not in _bench.CASES]
    if unknown:
        raise UsageError(f"--case: unknown {', '.join(map(repr, unknown))}; known cases: "
                         f"{', '.join(_bench.CASES)}")
    for name in args.backend or ():
        _check_backend("--backend", name)
    chosen = list(dict.fromkeys(args.backend or backends.available()))
    _check_dtype("--dtype", args.dtype)
    if args.json:
        _check_writable("--json", args.json)
    if args.plot:
        _check_plot_path(args.plot)

    with_torch = False
    if not args.no_torch:
        problem = _bench.torch_problem()   # imports torch first, before numba's threads start
        with_torch = problem is None
        if problem:
            print(f"relattn: {problem}, so the PyTorch anchors are skipped (pip install torch to get them; "
                  f"--no-torch skips them without this note)", file=sys.stderr, flush=True)
    results = []
    steps = len(names) * _bench.case_steps(chosen, args.dtype, with_torch)
    with relattn.gpu_float32_mode(args.gpu_float32):
        with _bench.Progress(steps) as progress:
            for name in names:
                results += _bench.run_case(_bench.CASES[name], chosen, dtype=args.dtype, with_torch=with_torch,
                                           budget_s=args.budget, log=progress.step)
    print(_bench.format_table(results), flush=True)
    if "numba" in chosen and args.first_call:
        times = _bench.numba_first_call_times()
        if times:
            print(f"numba import + first call in a fresh process: cold cache {times[0]:.2f} s (compiles), "
                  f"warm cache {times[1]:.2f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.__dict__ for r in results], fh, indent=2)
    if args.plot:
        grids = args.sweep_grids
        with _bench.Progress(_bench.sweep_steps(chosen, grids, with_torch)) as progress:
            data = _bench.sweep(chosen, grids, heads=args.sweep_heads, with_torch=with_torch,
                                budget_s=min(args.budget, SWEEP_BUDGET_S), progress=progress)
        _bench.plot(results, data, args.plot, title=f"relattn {relattn.__version__}, {platform.node()}",
                    sweep_shape=(args.sweep_heads, _sweep_shape()[1]))
        print(f"plot written to {args.plot}")
    return 0


def cmd_warmup(args) -> int:
    """Compile every numba kernel into numba's on-disk cache."""
    from relattn import _bench

    why = backends.get("numba").unavailable_reason()
    if why is not None:
        print(f"relattn: warmup: the numba backend is unavailable here ({why}); nothing to compile",
              file=sys.stderr)
        return 1
    from relattn.backends import _numba_kernels as kernels

    where = kernels._attention_fwd_f32.stats.cache_path
    if not where:
        print("relattn: warmup: numba cannot cache the kernels here (no writable cache directory), so every "
              "process would compile them again: set NUMBA_CACHE_DIR to a writable directory", file=sys.stderr)
        return 1
    jobs = [(np.dtype(dt), serial) for dt in (np.float32, np.float64) for serial in (False, True)]
    print(f"relattn warmup: compiling {len(jobs)} numba kernels into {where} "
          f"(10-30 s the first time; loaded from there when already cached) ...", flush=True)
    t0 = time.perf_counter()
    compiled = 0
    with _bench.Progress(len(jobs)) as progress:
        for dtype, serial in jobs:
            progress.step(f"{dtype.name}{' single-threaded' if serial else ''}")
            compiled += _warm_kernel(kernels, dtype, serial)
    print(f"{len(jobs)} kernels ready in {time.perf_counter() - t0:.1f} s ({compiled} compiled, "
          f"{len(jobs) - compiled} already cached); later processes load them from {where}")
    return 0


def _warm_kernel(kernels, dtype, serial) -> bool:
    """Call one kernel on a small problem, with the argument types the numba
    backend passes; True when it compiled (not found in numba's cache)."""
    from relattn.backends.numba_cpu import _dispatcher

    q = np.zeros((1, 16, 8), dtype)
    rel = np.zeros((1, 16, 4), dtype)
    out, nonfinite = np.empty_like(q), np.zeros((1, 16), np.bool_)
    args = (q, q, q, rel, rel, True, 4, dtype.type(0.125), 16, 16, out, nonfinite)
    kernels.attention_fwd(*args, serial=serial)
    return sum(_dispatcher(kernels, dtype, serial).stats.cache_misses.values()) > 0


def _check_plot_path(path):
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot: needs matplotlib (pip install relattn[plot])") from None
    suffix = os.path.splitext(path)[1][1:].lower()
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if suffix and suffix not in formats:
        raise UsageError(f"--plot: expected an image file ({', '.join('.' + f for f in sorted(formats))}), "
                         f"got {path!r}")
    _check_writable("--plot", path)


def main(argv=None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : list of str, optional
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 success, 1 a result check failed, 2 a usage mistake
        (reported as one line, ``relattn: error: ...``, on stderr).
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        command = {"info": cmd_info, "check": cmd_check, "bench": cmd_bench,
                   "warmup": cmd_warmup}.get(args.command, cmd_demo)
        return command(args)
    except UsageError as exc:
        print(f"relattn: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


DEFAULT_CASES = ("sam-b-global", "sam-b-window")
SWEEP_BUDGET_S = 0.5  # at most, per implementation and grid of the --plot sweep
DTYPES = ["float32", "float16", "bfloat16", "float64"]

_DESCRIPTION = """\
The relattn command line. Without a command it runs the demo: SAM-B attention
(global on a 64x64 token grid, windowed 14x14) on the best available backend,
timed and checked against a float64 reference.

The first use of the CPU (numba) kernels compiles them, a few seconds per dtype,
and numba caches them on disk; 'relattn warmup' does this ahead.

Exit status: 0 success, 1 a result check failed, 2 a usage mistake (one line
on stderr: "relattn: error: ...")."""

_DEMO = """\
SAM-B attention (dim 768, 12 heads, head_dim 64), global on a 64x64 token grid
and windowed 14x14, on the best available backend (or --backend), timed and
checked against a float64 reference. Exit status 1 when the error is above the
tolerance."""

_CHECK = """\
Every available backend against the float64 reference on small random SAM-like
problems (windows, rectangular grids, pooled keys, resized tables), in float32
and float64. Exit status 1 when any error is above its tolerance."""

_BENCH = """\
Time the attention core (relative-position terms included) on each backend,
with its peak extra memory and error against a float64 reference; with PyTorch
installed, also the PyTorch seed form (SDPA with the S x S mask) and SDPA
without a bias, as anchors measured in the same run."""

_WARMUP = """\
Compile every CPU kernel (numba: float32 and float64, threaded and
single-threaded) into numba's on-disk cache, so that a deployment pays the
compilation once, at install time; prints where the cache lives. That is
NUMBA_CACHE_DIR when set, else the __pycache__ next to
relattn/backends/_numba_kernels.py, else (not writable) numba's user cache
directory. The cache holds per Python version, numba version and CPU model:
warm up where relattn runs, as the user and with the NUMBA_CACHE_DIR it runs
with. Exit status 1 when numba is unavailable or cannot cache."""


def _bench_epilog():
    from relattn import _bench

    lines = [f"cases (--case; default: {' and '.join(DEFAULT_CASES)}):"]
    for case in _bench.CASES.values():
        shape = f"{case.batch} x {case.grid[0]}x{case.grid[1]} tokens, {case.heads} heads of {case.head_dim}"
        lines.append(f"  {case.name:<21}{case.note} [{shape}]")
    lines += ["", "Without PyTorch (pip install torch) the anchors are skipped, with a note on stderr.",
              "Progress goes to stderr, the table to stdout."]
    return "\n".join(lines)


def _build_parser():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="relattn", description=_DESCRIPTION, formatter_class=formatter)
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND",
                                help="one of these (default: demo)")
    demo = sub.add_parser("demo", help="SAM-B attention on the best backend, timed and checked (the default)",
                          description=_DEMO, formatter_class=formatter)
    seed = _int_option(0)
    for p in (parser, demo):
        p.add_argument("--backend", default="auto", choices=["auto", *backends.names()],
                       help="backend of the attention core (default: auto, the best available one)")
        p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the layers (default: float32)")
        p.add_argument("--grid", type=_int_option(1, MAX_GRID), default=64, metavar="N",
                       help=f"token grid side, 1 to {MAX_GRID} (default: 64, a 1024 px image)")
        p.add_argument("--seed", type=seed, default=0, metavar="N",
                       help="random seed of the inputs and weights (default: 0)")
    sub.add_parser("info", help="version, backends, devices, threads, dtypes",
                   description="Print the version, each backend and whether it runs here (and if not, why), "
                               "numba's threads, the CUDA devices and the dtypes.")
    check = sub.add_parser("check", help="every available backend against the float64 reference",
                           description=_CHECK, formatter_class=formatter)
    check.add_argument("--seed", type=seed, default=0, metavar="N", help="random seed of the problems (default: 0)")
    bench = sub.add_parser("bench", help="time the benchmark cases on every backend",
                           description=_BENCH, epilog=_bench_epilog(), formatter_class=formatter)
    bench.add_argument("--case", action="append", metavar="NAME",
                       help="a case to time (repeatable; names below)")
    bench.add_argument("--backend", action="append", choices=backends.names(),
                       help="a backend to time (repeatable; default: every available one)")
    bench.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the inputs (default: float32)")
    bench.add_argument("--budget", type=_positive_seconds, default=3.0, metavar="SECONDS",
                       help="seconds of timing per implementation and case (default: 3)")
    bench.add_argument("--gpu-float32", default=relattn.get_gpu_float32_mode(), choices=relattn.precision.GPU_FLOAT32_MODES,
                       help="how float32 runs on the GPU (default: %(default)s)")
    bench.add_argument("--no-torch", action="store_true", help="skip the PyTorch anchors")
    bench.add_argument("--first-call", action="store_true",
                       help="also time numba's first call in fresh processes, with a cold and a warm cache")
    bench.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    bench.add_argument("--plot", metavar="PATH",
                       help="also write an image: time and memory per case, time against grid size (needs matplotlib)")
    bench.add_argument("--sweep-grids", type=_grid_list, default=",".join(map(str, _sweep_grids())), metavar="N,N,...",
                       help=f"grid sides of the --plot sweep, each 1 to {MAX_GRID} (default: %(default)s)")
    bench.add_argument("--sweep-heads", type=_int_option(1, 64), default=_sweep_shape()[0], metavar="N",
                       help="heads (of 64 dims) in the --plot sweep, 1 to 64 (default: %(default)s; SAM-B has 12)")
    sub.add_parser("warmup", help="compile the CPU kernels into numba's cache ahead of use",
                   description=_WARMUP, formatter_class=formatter)
    return parser


def _sweep_grids():
    from relattn import _bench

    return _bench.SWEEP_GRIDS


def _sweep_shape():
    from relattn import _bench

    return _bench.SWEEP_HEADS, _bench.SWEEP_HEAD_DIM


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
