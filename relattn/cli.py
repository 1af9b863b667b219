"""The ``relattn`` command line: the SAM attention demo (main job), info, check, bench.

A usage mistake (a bad option value, an unknown case, an unavailable backend,
an output file that cannot be written) is reported as one line on stderr,
``relattn: error: ...``, with exit status 2, before any slow work starts.
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
    _check_backend("--backend", args.backend)
    dtype = _check_dtype("--dtype", args.dtype)
    xp = np if args.backend in ("numpy", "numba") else _best_array_module()
    rng = np.random.default_rng(args.seed)
    x_host = rng.standard_normal((1, args.grid, args.grid, 768), dtype=np.float32)
    print(f"relattn {relattn.__version__}: SAM-B attention (dim 768, 12 heads, head_dim 64), seed {args.seed}")
    print(f"array module: {xp.__name__}, dtype: {args.dtype}, backends available: {', '.join(backends.available())}")
    worst = 0.0
    for label, input_size, window in (("global", (64, 64), 0), ("windowed", (14, 14), 14)):
        layer = relattn.Attention(768, 12, use_rel_pos=True, rel_pos_zero_init=False, input_size=input_size,
                                  window_size=window, dtype=dtype, backend=args.backend, rng=rng)
        layer.rel_pos_h = layer.rel_pos_h * 10.0  # trained SAM tables are far from N(0, 0.02)
        layer.rel_pos_w = layer.rel_pos_w * 10.0
        x = xp.asarray(x_host.astype(dtype))
        out, times = _timed(lambda: layer(x), xp)
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
            f"max rel error vs float64 reference {err:.2e}"
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
    names = args.case or ["sam-b-global", "sam-b-window"]
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

    if not args.no_torch:
        _bench.import_torch_first()
    with_torch = not args.no_torch
    steps = len(names) * (1 + len(chosen) + 5 * with_torch)
    grids = args.sweep_grids if args.plot else []
    steps += len(grids) * (len(chosen) + 2 * with_torch)
    progress = _bench.Progress(steps)
    results = []
    with relattn.gpu_float32_mode(args.gpu_float32):
        for name in names:
            results += _bench.run_case(_bench.CASES[name], chosen, dtype=args.dtype, with_torch=with_torch,
                                       budget_s=args.budget, log=progress.step)
    print(_bench.format_table(results))
    if "numba" in chosen and args.first_call:
        times = _bench.numba_first_call_times()
        if times:
            print(f"numba import + first call in a fresh process: cold cache {times[0]:.2f} s (compiles), "
                  f"warm cache {times[1]:.2f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.__dict__ for r in results], fh, indent=2)
    if args.plot:
        data = _bench.sweep(chosen, grids, with_torch=with_torch, budget_s=min(args.budget, 1.0), progress=progress)
        _bench.plot(results, data, args.plot, title=f"relattn {relattn.__version__}, {platform.node()}")
        print(f"plot written to {args.plot}")
    return 0


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
        command = {"info": cmd_info, "check": cmd_check, "bench": cmd_bench}.get(args.command, cmd_demo)
        return command(args)
    except UsageError as exc:
        print(f"relattn: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _build_parser():
    parser = _Parser(prog="relattn", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="SAM-B attention on the best backend, checked (the default)")
    seed = _int_option(0)
    for p in (parser, demo):
        p.add_argument("--backend", default="auto", choices=["auto", *backends.names()])
        p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
        p.add_argument("--grid", type=_int_option(1, MAX_GRID), default=64,
                       help=f"token grid side, 1 to {MAX_GRID} (default 64: 1024 px)")
        p.add_argument("--seed", type=seed, default=0)
    sub.add_parser("info", help="version, backends, devices, threads, dtypes")
    check = sub.add_parser("check", help="every available backend against the reference")
    check.add_argument("--seed", type=seed, default=0)
    bench = sub.add_parser("bench", help="time the benchmark cases on every backend")
    bench.add_argument("--case", action="append", help="case name (repeatable)")
    bench.add_argument("--backend", action="append", choices=backends.names())
    bench.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    bench.add_argument("--budget", type=_positive_seconds, default=3.0,
                       help="seconds of timing per implementation")
    bench.add_argument("--gpu-float32", default=relattn.get_gpu_float32_mode(), choices=relattn.precision.GPU_FLOAT32_MODES,
                       help="how float32 runs on the GPU (see relattn.set_gpu_float32_mode)")
    bench.add_argument("--no-torch", action="store_true", help="skip the PyTorch anchors")
    bench.add_argument("--first-call", action="store_true",
                       help="also time numba's first call in fresh processes, cold and warm kernel cache")
    bench.add_argument("--json", help="write the results here")
    bench.add_argument("--plot", help="write a PNG: time and memory per backend, and time against grid size")
    bench.add_argument("--sweep-grids", type=_grid_list, default="16,32,48,64,80,96",
                       help=f"grid sides for the --plot sweep (each 1 to {MAX_GRID})")
    return parser


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
