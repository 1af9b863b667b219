"""Benchmark cases and runners, shared by ``bench/bench.py`` and ``relattn bench``.

Each case times the attention core (``rel_pos_attention`` including the rel_h /
rel_w terms) on every available backend and, when PyTorch is importable, the
PyTorch seed form (einsum terms + materialized S x S mask + SDPA) as the anchor
measured in the same run, plus PyTorch SDPA with no bias as the plain-kernel
ceiling: on CUDA twice, as SDPA dispatches by default (PyTorch 2.11 on the H100
picks cuDNN's fused attention) and restricted to its flash backend (the kernel
the targets' anchor).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import numpy as np

from relattn import backends
from relattn._arrays import resolve_dtype
from relattn.functional import rel_pos_attention


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    grid: tuple
    heads: int
    head_dim: int
    table_rows: tuple  # rows of the stored tables (resized when != 2*grid-1)
    note: str

    @property
    def tokens(self):
        return self.grid[0] * self.grid[1]

    @property
    def flops(self):
        return 4 * self.batch * self.heads * self.tokens**2 * self.head_dim


CASES = {
    c.name: c
    for c in [
        Case("sam-b-global", 1, (64, 64), 12, 64, (127, 127), "SAM-B global block, 1024 px"),
        Case("sam-b-window", 25, (14, 14), 12, 64, (27, 27), "SAM-B windowed block, 25 windows of 14x14"),
        Case("sam-h-global", 1, (64, 64), 16, 80, (127, 127), "SAM-H global block, head_dim 80"),
        Case("sam-b-global-1280px", 1, (80, 80), 12, 64, (127, 127), "SAM-B global at 1280 px: tables 127 -> 159"),
        Case("tiny", 2, (8, 8), 2, 16, (15, 15), "smoke test"),
    ]
}


def make_inputs(case: Case, seed: int = 0):
    """float32 numpy q, k, v (B, heads, S, d) and the two tables."""
    rng = np.random.default_rng(seed)
    shape = (case.batch, case.heads, case.tokens, case.head_dim)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    tables = [0.1 * rng.standard_normal((rows, case.head_dim), dtype=np.float32) for rows in case.table_rows]
    return q, k, v, tables[0], tables[1]


# -- memory ----------------------------------------------------------------------


def _status_kib(key):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def host_peak_extra(fn):
    """Run ``fn`` once; return bytes of peak RSS above the RSS before it (Linux), or None."""
    if not _reset_peak_rss():
        fn()
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, (peak - before) * 1024)


def device_peak_extra(fn):
    """Run ``fn`` once on CuPy; return the high-water mark of the bytes it held
    allocated from CuPy's memory pool above those held before it (live bytes, as
    PyTorch's ``max_memory_allocated``: blocks the pool caches after a free are
    not counted). The memory hook sees every allocation of this thread."""
    import cupy

    class _Peak(cupy.cuda.MemoryHook):
        name = "relattn_peak"

        def __init__(self):
            self.live = self.peak = 0

        def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
            self.live += mem_size
            self.peak = max(self.peak, self.live)

        def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
            self.live -= mem_size

    cupy.cuda.get_current_stream().synchronize()
    hook = _Peak()
    with hook:
        fn()
        cupy.cuda.get_current_stream().synchronize()
    return hook.peak


# -- timing ----------------------------------------------------------------------


def median_time(fn, min_runs=3, max_runs=20, budget_s=3.0, sync=None):
    times = []
    start_all = time.perf_counter()
    while len(times) < max_runs:
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_runs and time.perf_counter() - start_all > budget_s:
            break
    return statistics.median(times)


@dataclasses.dataclass
class Result:
    case: str
    impl: str
    dtype: str
    time_s: float
    gflops: float
    peak_extra_mib: float | None
    max_rel_err: float | None
    vs_anchor: float | None = None
    first_call_s: float | None = None
    gpu_time_s: float | None = None  # CUDA-graph replay of the same call: GPU time, no Python
    host_time_s: float | None = None  # GPU backends: issuing one call (Python and launches), the GPU idle


def _rel_err(out, ref):
    out = np.asarray(out, dtype=np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def reference_output(case: Case, inputs):
    """float64 reference output of the materialized-bias formula."""
    q, k, v, th, tw = (a.astype(np.float64) for a in inputs)
    return rel_pos_attention(q, k, v, th, tw, case.grid, case.grid, backend="numpy")


def run_backend(case: Case, name: str, inputs, dtype, ref, budget_s=3.0):
    mod = backends.get(name)
    q, k, v, th, tw = (a.astype(dtype) for a in inputs)
    sync = None
    if mod.ARRAY_MODULE == "cupy":
        import cupy

        q, k, v, th, tw = (cupy.asarray(a) for a in (q, k, v, th, tw))
        sync = cupy.cuda.get_current_stream().synchronize

    def call():
        return rel_pos_attention(q, k, v, th, tw, case.grid, case.grid, backend=name)

    t0 = time.perf_counter()
    out = call()
    if sync:
        sync()
    first = time.perf_counter() - t0
    t = median_time(call, budget_s=budget_s, sync=sync)
    gpu_time = None
    if mod.ARRAY_MODULE == "cupy":
        import cupy

        gpu_time = graph_time(call)
        host = host_time(call, sync)
        peak = max(0.0, (device_peak_extra(call) - out.nbytes) / 2**20)
        out = out.get()
    else:
        peak = host_peak_extra(call)
        peak = None if peak is None else max(0.0, (peak - out.nbytes) / 2**20)
    err = _rel_err(out, ref) if ref is not None else None
    return Result(case.name, name, np.dtype(dtype).name if dtype != "bfloat16" else "bfloat16",
                  t, case.flops / t / 1e9, peak, err, first_call_s=first, gpu_time_s=gpu_time,
                  host_time_s=host if mod.ARRAY_MODULE == "cupy" else None)


def host_time(fn, sync, runs=21):
    """Median wall time of issuing one call of ``fn`` with the GPU idle
    (synchronised before and after): what a call costs the host."""
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        sync()
    return sorted(times)[len(times) // 2]


def graph_time(fn, replays=50):
    """Median-free GPU time per call of ``fn`` replayed as a captured CUDA graph, or None.

    Capture only succeeds when ``fn`` neither synchronises nor copies from the
    host, so a number here also shows the call is free of host round trips.
    """
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    try:
        with stream:
            fn()  # warm caches on this stream
            stream.synchronize()
            stream.begin_capture()
            try:
                fn()
            finally:
                graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            for _ in range(replays):
                graph.launch(stream)
            stop.record(stream)
            stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop) / 1e3 / replays
    except Exception:  # noqa: BLE001 - capture unsupported for this call
        return None


def torch_anchor(case: Case, inputs, dtype_name, threads, ref, budget_s=3.0, with_bias=True, device="cpu",
                 sdpa_backend=None):
    """The PyTorch seed form (or SDPA with no bias), on ``device``, same inputs.
    ``sdpa_backend`` ("flash", no bias only): SDPA restricted to that backend
    instead of its default dispatch."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    tdtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
              "float16": torch.float16}[dtype_name]
    q, k, v, th, tw = (torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=tdtype) for a in inputs)
    sync = torch.cuda.synchronize if device != "cpu" else None
    b, h, s, d = q.shape
    gh, gw = case.grid

    def seed_form():
        rh = _torch_get_rel_pos(gh, gh, th)
        rw = _torch_get_rel_pos(gw, gw, tw)
        r_q = q.reshape(b * h, gh, gw, d)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
        mask = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, h, s, s)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def plain():
        if sdpa_backend is None:
            return F.scaled_dot_product_attention(q, k, v)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([{"flash": SDPBackend.FLASH_ATTENTION}[sdpa_backend]]):
            return F.scaled_dot_product_attention(q, k, v)

    fn = seed_form if with_bias else plain
    with torch.no_grad():
        out = fn()
        t = median_time(fn, budget_s=budget_s, sync=sync)
        if device == "cpu":
            peak = host_peak_extra(fn)
        else:
            gpu_time = _torch_graph_time(torch, fn)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
    peak = None if peak is None else max(0.0, (peak - out.numel() * out.element_size()) / 2**20)
    err = _rel_err(out.float().cpu().numpy(), ref) if (ref is not None and with_bias) else None
    name = "torch-seed-form" if with_bias else f"torch-sdpa-{sdpa_backend + '-' if sdpa_backend else ''}nobias"
    if device != "cpu":
        name += "-cuda"
    return Result(case.name, name, dtype_name, t, case.flops / t / 1e9, peak, err,
                  gpu_time_s=gpu_time if device != "cpu" else None)


def _torch_graph_time(torch, fn, replays=50):
    """GPU time per call of ``fn`` as a replayed torch CUDA graph, or None."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / replays
    except Exception:  # noqa: BLE001
        return None


def _torch_get_rel_pos(q_size, k_size, rel_pos):
    import torch
    import torch.nn.functional as F

    rows = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != rows:
        rel_pos = F.interpolate(rel_pos.float().T[None], size=rows, mode="linear")[0].T.to(rel_pos.dtype)
    qc = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    kc = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    return rel_pos[((qc - kc) + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


def anchor_jobs(backend_names, dtype="float32", with_torch=True):
    """The PyTorch anchors ``run_case`` times: (device, with_bias, sdpa_backend) each.
    Empty without PyTorch (or ``with_torch`` false)."""
    if not with_torch or not import_torch_first():
        return []
    import torch

    dt = np.dtype(resolve_dtype("dtype", dtype)).name
    gpu = "cupy" in backend_names and torch.cuda.is_available()
    devices = ["cuda"] if gpu else ["cpu"]
    if gpu and any(backends.get(n).ARRAY_MODULE == "numpy" for n in backend_names):
        devices.append("cpu")
    jobs = []
    for device in devices:
        for with_bias, sdpa_backend in ((True, None), (False, None), (False, "flash")):
            if sdpa_backend and (device == "cpu" or dt not in ("float16", "bfloat16")):
                continue   # (the flash backend: CUDA, 16-bit only)
            jobs.append((device, with_bias, sdpa_backend))
    return jobs


def case_steps(backend_names, dtype="float32", with_torch=True) -> int:
    """How many times ``run_case`` calls its ``log`` for one case (one per timed step)."""
    return 1 + len(anchor_jobs(backend_names, dtype, with_torch)) + len(backend_names)


def run_case(case: Case, backend_names, dtype="float32", with_torch=True, budget_s=3.0, log=print):
    """All results for one case, anchors first; ratios are to the torch seed form
    (on the GPU for the cupy backend when torch has CUDA, on the CPU otherwise).
    ``log`` is called once before each step (see ``case_steps``)."""
    dt = resolve_dtype("dtype", dtype)
    jobs = anchor_jobs(backend_names, dtype, with_torch)
    inputs = make_inputs(case)
    log(f"[{case.name}] computing the float64 reference ...")
    ref = reference_output(case, inputs)
    results = []
    threads = _threads()
    for device, with_bias, sdpa_backend in jobs:
        label = "seed form" if with_bias else f"SDPA {sdpa_backend or 'default'} no bias"
        log(f"[{case.name}] torch {label} ({device}) ...")
        try:
            results.append(torch_anchor(case, inputs, dtype, threads, ref, budget_s, with_bias, device,
                                        sdpa_backend))
        except RuntimeError as exc:  # e.g. no flash kernel for this dtype / card
            if not sdpa_backend:
                raise
            print(f"[{case.name}] torch SDPA {sdpa_backend}: not available ({str(exc).splitlines()[0][:80]})",
                  file=sys.stderr)
    for name in backend_names:
        log(f"[{case.name}] {name} ...")
        results.append(run_backend(case, name, inputs, dt, ref, budget_s))
    # Ratios: GPU results against the CUDA seed form, CPU results against the CPU one.
    anchors = {r.impl: r for r in results if r.impl.startswith("torch-seed-form")}
    for r in results:
        on_gpu = r.impl == "cupy" or r.impl.endswith("-cuda")
        anchor = anchors.get("torch-seed-form-cuda" if on_gpu else "torch-seed-form")
        if anchor is not None:
            r.vs_anchor = r.time_s / anchor.time_s
    return results


def import_torch_first() -> bool:
    """Import torch (the anchor) before numba starts its OpenMP thread pool;
    False when PyTorch cannot be imported (see ``torch_problem``).

    Measured on the 2-core CPU machine: when numba's pool starts first, torch's own
    OpenMP runtime then runs SDPA up to 25x slower (1.59 s instead of 0.042 s for
    the windowed case); imported first, both run at full speed.
    """
    return torch_problem() is None


def torch_problem() -> str | None:
    """None when PyTorch imports (it is imported here), else why not, in a few words."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "torch":
            return "PyTorch is not installed"
        return f"PyTorch failed to import ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    return None


def _threads():
    try:
        import numba

        return numba.get_num_threads()
    except ImportError:  # pragma: no cover
        import os

        return os.cpu_count() or 1


def format_table(results) -> str:
    """The results as a text table.  Columns that no result fills are left out:
    ``x seed`` (the ratio to the PyTorch seed form) without the PyTorch anchors,
    ``graph`` and ``host`` without a GPU backend."""

    def ms(seconds):
        return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.3f} s"

    columns = [  # (header, width, left-aligned, cell, optional)
        ("case", 20, True, lambda r: r.case, False),
        ("impl", 30, True, lambda r: r.impl, False),
        ("dtype", 9, True, lambda r: r.dtype, False),
        ("time", 11, False, lambda r: ms(r.time_s), False),
        ("GFLOP/s", 9, False, lambda r: f"{r.gflops:.1f}", False),
        ("peak MiB", 10, False, lambda r: None if r.peak_extra_mib is None else f"{r.peak_extra_mib:.1f}", False),
        ("rel err", 10, False, lambda r: None if r.max_rel_err is None else f"{r.max_rel_err:.1e}", False),
        ("x seed", 8, False, lambda r: None if r.vs_anchor is None else f"{r.vs_anchor:.2f}", True),
        ("graph", 11, False, lambda r: None if r.gpu_time_s is None else ms(r.gpu_time_s), True),
        ("host", 11, False, lambda r: None if r.host_time_s is None else ms(r.host_time_s), True),
    ]
    cells = [[cell(r) for *_, cell, _ in columns] for r in results]
    keep = [i for i, (*_, optional) in enumerate(columns)
            if not optional or any(row[i] is not None for row in cells)]

    def line(values):
        out = ""
        for i in keep:
            _, width, left, _, _ = columns[i]
            text = "-" if values[i] is None else str(values[i])
            out += f"{text:<{width}}" if left else f"{text:>{width}}"
        return out.rstrip()

    head = line([c[0] for c in columns])
    return "\n".join([head, "-" * len(head), *(line(row) for row in cells)])


# -- grid-size sweep and plots ------------------------------------------------------


class Progress:
    """A dependency-free progress bar on stderr, used as a context manager.

    ``step(label)`` is called before each step.  On a terminal the bar is
    redrawn in place; leaving the ``with`` block completes it (``N/N``) and ends
    its line, so whatever is printed next starts on a line of its own (with
    ``clear=True`` it is erased instead).  While the bar is drawn, anything else
    written to ``sys.stdout`` or ``sys.stderr`` (a notice, a result line) first
    erases it and the bar is drawn again below.  Not on a terminal, each step
    is a line of its own and the last one says ``N/N done``.
    """

    def __init__(self, total, stream=None, width=28, clear=False):
        self.total, self.done, self.width, self.clear = max(1, total), 0, width, clear
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label = ""
        self._drawn = 0  # characters of the bar on the terminal's current line (0: none)
        self._saved = None

    # -- drawing ----------------------------------------------------------------

    def _line(self):
        filled = int(self.width * min(self.done, self.total) / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        return f"[{bar}] {self.done}/{self.total} {self.label[:50]}"

    def _draw(self):
        line = self._line()
        if self.tty:
            pad = max(0, self._drawn - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._drawn = len(line) + pad
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _erase(self):
        if self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self.stream.flush()
            self._drawn = 0

    # -- use ----------------------------------------------------------------------

    def step(self, label):
        self.done += 1
        self.total = max(self.total, self.done)
        self.label = label
        self._draw()

    def finish(self):
        """Complete the bar (``N/N done``) and end its line, or erase it (``clear``)."""
        self.done, self.label = self.total, "done"
        if self.tty and self.clear:
            self._erase()
            return
        self._draw()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0

    def __enter__(self):
        self._saved = sys.stdout, sys.stderr
        if self.tty:
            sys.stdout, sys.stderr = _Guarded(sys.stdout, self), _Guarded(sys.stderr, self)
        return self

    def __exit__(self, exc_type, *exc):
        if self.tty:
            sys.stdout, sys.stderr = self._saved
        if exc_type is None:
            self.finish()
        else:  # a traceback (or ^C) starts on a line of its own, the bar not claiming "done"
            self._erase()
        return False


class _Guarded:
    """A text stream that erases the progress bar before anything is written to
    it, and redraws the bar after a completed line."""

    def __init__(self, stream, progress):
        self._stream, self._progress = stream, progress

    def write(self, text):
        progress = self._progress
        if text:
            progress._erase()
        n = self._stream.write(text)
        if text.endswith("\n") and progress.done:
            self._stream.flush()
            progress._draw()
        return n

    def __getattr__(self, name):
        return getattr(self._stream, name)


SWEEP_GRIDS = (8, 16, 24, 32)
SWEEP_HEADS = 4
SWEEP_HEAD_DIM = 64


def sweep_steps(backend_names, grids, with_torch=True) -> int:
    """How many times ``sweep`` steps its progress bar."""
    return len(grids) * (len(backend_names) + 2 * bool(with_torch))


def sweep(backend_names, grids=SWEEP_GRIDS, heads=SWEEP_HEADS, head_dim=SWEEP_HEAD_DIM, with_torch=True,
          budget_s=0.5, progress=None):
    """Time the core against grid size (S = g*g): {impl: [(g, seconds), ...]}.

    The default (grids up to 32x32, 4 heads) takes seconds on 2 cores.  The
    numpy backend builds each head's S x S logits, so its time and memory grow
    as S^2: a 96x96 grid has 81 times the logits of a 32x32 one.
    """
    threads = _threads()
    out = {}
    for g in grids:
        case = Case(f"grid-{g}", 1, (g, g), heads, head_dim, (2 * g - 1, 2 * g - 1), "sweep")
        inputs = make_inputs(case)
        impls = list(backend_names)
        if with_torch:
            impls = ["torch-seed-form", "torch-sdpa-nobias", *impls]
        for impl in impls:
            if progress:
                progress.step(f"sweep: {impl} {g}x{g}")
            if impl.startswith("torch"):
                r = torch_anchor(case, inputs, "float32", threads, None, budget_s, impl == "torch-seed-form")
            else:
                r = run_backend(case, impl, inputs, np.float32, None, budget_s)
            out.setdefault(impl, []).append((g, r.time_s))
    return out


def plot(results, sweep_data, path, title="", sweep_shape=(SWEEP_HEADS, SWEEP_HEAD_DIM)):
    """Bar charts of time and peak memory per case and implementation, and time vs grid
    size (``sweep_shape``: the sweep's heads and head_dim, for the axis label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in results))
    impls = list(dict.fromkeys(r.impl for r in results))
    ncols = 3 if sweep_data else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5))
    width = 0.8 / max(1, len(impls))
    for ax, attr, label in ((axes[0], "time_s", "median time (ms)"), (axes[1], "peak_extra_mib", "peak extra memory (MiB)")):
        for i, impl in enumerate(impls):
            vals = []
            for case in cases:
                r = next((r for r in results if r.case == case and r.impl == impl), None)
                v = None if r is None else getattr(r, attr)
                vals.append(np.nan if v is None else (v * 1e3 if attr == "time_s" else v))
            ax.bar(np.arange(len(cases)) + i * width, vals, width, label=impl)
        ax.set_xticks(np.arange(len(cases)) + width * (len(impls) - 1) / 2)
        ax.set_xticklabels(cases, rotation=15)
        if attr == "time_s":
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    if sweep_data:
        ax = axes[2]
        for impl, points in sweep_data.items():
            g, t = zip(*points)
            ax.plot(np.square(g), np.array(t) * 1e3, marker="o", label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        sides = sorted({g for points in sweep_data.values() for g, _ in points})
        ax.set_xlabel(f"tokens S = grid^2 ({sides[0]}x{sides[0]} .. {sides[-1]}x{sides[-1]})")
        ax.set_ylabel(f"time (ms), {sweep_shape[0]} heads, head_dim {sweep_shape[1]}")
        ax.set_title("time grows as S^2")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_FIRST_CALL_SCRIPT = """
import time, numpy as np
t0 = time.perf_counter()
import relattn
q = np.ones((1, 2, 64, 64), np.float32)
t = np.zeros((15, 64), np.float32)
relattn.rel_pos_attention(q, q, q, t, t, (8, 8), backend="numba")
print(time.perf_counter() - t0)
"""


def numba_first_call_times():
    """(cold, warm) seconds for import + first numba call in fresh processes:
    cold with an empty kernel cache (compilation), warm with the cache it left."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        times = []
        for _ in range(2):
            proc = subprocess.run([sys.executable, "-c", _FIRST_CALL_SCRIPT], env=env, capture_output=True,
                                  text=True, timeout=900)
            if proc.returncode != 0:
                return None
            times.append(float(proc.stdout.strip().splitlines()[-1]))
    return tuple(times)
