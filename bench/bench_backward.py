"""Training cost: relattn's forward + backward beside PyTorch autograd, timed in the same run.

    python bench/bench_backward.py                              # CPU, float32, 2 threads, SAM-B cases
    python bench/bench_backward.py --case sam-b-global --runs 3 --layer
    python bench/bench_backward.py --device cuda --dtype bfloat16 --layer
    python bench/bench_backward.py --quick                      # small shapes: a smoke run

Attention core (q, k, v (B, heads, S, d) and the two tables in; the output and the
gradients of all five out), one forward + backward per call:

  torch seed autograd   SAM's eager formula under autograd: (q * scale) @ k^T, plus rel_h
                        and rel_w (get_rel_pos + einsum, as add_decomposed_rel_pos),
                        softmax, @ v; then torch.autograd.grad
  torch SDPA no bias    F.scaled_dot_product_attention(q, k, v) (default dispatch) and its
                        backward: no relative position at all, the plain-kernel ceiling
  relattn.torch bridge  relattn.torch.rel_pos_attention on torch tensors + autograd.grad
  relattn vjp           relattn.rel_pos_attention_vjp and its pullback on numpy (CPU:
                        numba's fused kernels) or CuPy (CUDA) arrays

Layer (--layer): one training step's forward + backward of SAM's Attention (qkv, rel
pos, attention, proj; windowed as SAM's Block: pad, partition, unpartition, crop), dx
and every parameter's gradient: relattn ``Attention.vjp`` + pullback against the
PyTorch seed module of bench/bench_module.py, same weights; on CUDA in 16 bits also
the step captured as CUDA graphs (``Attention.capture_vjp``: one replay for the
forward, one for the pullback, outputs copied out), and a training loop's step: the
captured step plus an SGD update of every parameter in place (``step.parameters``,
which the graphs follow) against the seed module's step plus ``torch._foreach_add_``.

Times: CPU, the median of --runs calls; CUDA, per call with --calls calls back to back
then one sync, and one call plus a sync (median of --runs), as bench/bench_calls.py.
Ratios ("x seed", "x SDPA") are time / anchor time. "peak MiB" is memory above the
inputs and the call's results (output and gradients): on the CPU the process's
resident-set high-water mark during one call (relattn._bench.host_peak_extra, the
allocator's free pages released first), the same method for every row; on CUDA the
high-water mark of live bytes: CuPy's allocations through a memory hook for relattn
(relattn._bench.device_peak_extra; plus torch's for the bridge) and
torch.cuda.max_memory_allocated for torch; blocks a caching pool keeps after a free
count on neither. "max diff" is the largest of
max|a - b| / max|b| over the output and each gradient, against the seed autograd.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # run from a checkout
sys.path.insert(0, HERE)                    # bench_module, bench_calls

CORE_CASES = ("sam-b-window", "sam-b-global", "sam-h-global")
QUICK = {   # name: (B, grid, heads, head_dim), tables of 2 * grid - 1 rows
    "sam-b-window": (4, (7, 7), 2, 32),
    "sam-b-global": (1, (16, 16), 2, 32),
    "sam-h-global": (1, (16, 16), 2, 40),
}
LAYER_SIDE = 64          # the windowed layer's input (SAM at 1024 px); 16 with --quick
MIB = 2.0 ** 20

# (device, case, what, limit): "what" is "seed" (time / seed autograd), "sdpa" (time /
# SDPA no bias), "memory" (peak MiB) for the relattn vjp row, or "layer" (seed module
# time / relattn layer time, a lower bound).
TARGETS = [
    ("cpu", "sam-b-global", "seed", 0.5),
    ("cpu", "sam-b-global", "memory", 64.0),
    ("cpu", "sam-b-window", "seed", 0.6),
    *[("cuda", c, w, lim) for c in CORE_CASES for w, lim in (("seed", 0.3), ("sdpa", 1.3))],
    *[("cuda", c, "layer", 3.0) for c in CORE_CASES],
]
TARGET_CONFIG = {"cpu": ("float32", 2), "cuda": ("bfloat16", None)}   # dtype, threads they are stated for


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: float32 on the CPU, bfloat16 on CUDA")
    ap.add_argument("--case", action="append", choices=list(CORE_CASES),
                    help="repeatable; default sam-b-window and sam-b-global")
    ap.add_argument("--quick", action="store_true", help="small variants of the cases (a smoke run)")
    ap.add_argument("--layer", action="store_true", help="also the whole Attention layer's training step")
    ap.add_argument("--threads", type=int, default=2,
                    help="numba, torch and BLAS threads on the CPU (default 2, the documented machine)")
    ap.add_argument("--runs", type=int, help="timed calls per row on the CPU (default 5); on CUDA the calls of "
                                             "the 1 + sync median (default 41)")
    ap.add_argument("--calls", type=int, default=20, help="CUDA: calls back to back per timing (default 20)")
    ap.add_argument("--no-torch", action="store_true", help="relattn rows only")
    ap.add_argument("--json", help="write the rows and target checks here")
    args = ap.parse_args(argv)
    if args.runs is None:
        args.runs = 41 if args.device == "cuda" else 5
    for name in ("threads", "runs", "calls"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.case = list(dict.fromkeys(args.case or ["sam-b-window", "sam-b-global"]))
    return args


def limit_threads(threads):
    """BLAS and numba thread counts, set before numpy and numba start (a user's own
    settings in the environment are kept)."""
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    if "NUMBA_NUM_THREADS" not in os.environ and threads > (os.cpu_count() or 1):
        os.environ["NUMBA_NUM_THREADS"] = str(threads)   # numba refuses more than its pool


# -- measuring -----------------------------------------------------------------------


def release_free_memory():
    """Hand the C allocator's free pages back to the system (glibc), so that a call
    reusing them shows in the resident set; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def nbytes(results):
    total = 0
    for r in results:
        if r is None:
            continue
        total += r.numel() * r.element_size() if hasattr(r, "element_size") else r.nbytes
    return total


class Measure:
    """Times and peak memory of one call ``fn() -> tuple of results``."""

    def __init__(self, device, runs, calls, torch):
        self.device, self.runs, self.calls, self.torch = device, runs, calls, torch
        if device == "cuda":
            import cupy

            self.cupy = cupy
            from bench_calls import back_to_back, one_plus_sync   # noqa: E402 - the per-call timers

            self.back_to_back, self.one_plus_sync = back_to_back, one_plus_sync

    def sync_for(self, kind):
        if self.device != "cuda":
            return lambda: None
        if kind == "relattn":
            return self.cupy.cuda.Device().synchronize
        return self.torch.cuda.synchronize

    def time(self, fn, kind):
        """{"time_ms": ...} (CPU) or {"time_ms" (back to back), "one_sync_ms"} (CUDA)."""
        from relattn import _bench

        sync = self.sync_for(kind)
        if self.device == "cuda":
            per_call = self.back_to_back(fn, self.calls, sync)
            return dict(time_ms=per_call * 1e3, one_sync_ms=self.one_plus_sync(fn, sync, runs=self.runs) * 1e3)
        return dict(time_ms=_bench.median_time(fn, min_runs=self.runs, max_runs=self.runs, budget_s=0) * 1e3)

    def peak(self, fn, kind, results_bytes):
        """MiB above the inputs and the results during one call, or None."""
        from relattn import _bench

        if self.device != "cuda":
            release_free_memory()
            peak = _bench.host_peak_extra(fn)
            return None if peak is None else max(0.0, (peak - results_bytes) / MIB)
        torch, cupy = self.torch, self.cupy
        uses_torch = kind in ("torch", "bridge") and torch is not None
        uses_pool = kind in ("relattn", "bridge")
        cupy.cuda.Device().synchronize()
        if uses_torch:
            torch.cuda.synchronize()
            base_t = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        # Live bytes on both sides: CuPy's pool through a memory hook, PyTorch's
        # caching allocator through max_memory_allocated (cached free blocks
        # count on neither).
        if uses_pool:
            grown = _bench.device_peak_extra(fn)
        else:
            fn()
            grown = 0
        if uses_torch:
            torch.cuda.synchronize()
            grown += torch.cuda.max_memory_allocated() - base_t
        return max(0.0, (grown - results_bytes) / MIB)


def max_diff(results, reference):
    """max over pairs of max|a - b| / max|b| (float64 on the host)."""
    import numpy as np

    worst = 0.0
    for a, b in zip(results, reference):
        a, b = host64(a), host64(b)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30)))
    return worst


def host64(a):
    import numpy as np

    if hasattr(a, "detach"):            # torch
        return a.detach().float().cpu().numpy().astype(np.float64)
    if type(a).__module__.startswith("cupy"):
        from relattn.backends.gpu import cublas

        a = cublas.to_float32(a).get() if a.dtype.itemsize == 2 else a.get()
    return np.asarray(a).astype(np.float64)


# -- the rows ------------------------------------------------------------------------


def core_case(name, quick):
    from relattn import _bench

    if not quick:
        return _bench.CASES[name]
    batch, grid, heads, hd = QUICK[name]
    return _bench.Case(f"{name}-quick", batch, grid, heads, hd, tuple(2 * g - 1 for g in grid), "quick variant")


def torch_dtype(torch, name):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def seed_core(torch, q, k, v, th, tw, grid):
    """SAM's eager attention with add_decomposed_rel_pos, on (B, heads, S, d) tensors."""
    from relattn import _bench

    b, h, s, d = q.shape
    gh, gw = grid
    q3, k3, v3 = (t.reshape(b * h, s, d) for t in (q, k, v))
    attn = (q3 * d ** -0.5) @ k3.transpose(-2, -1)
    rh = _bench._torch_get_rel_pos(gh, gh, th)          # SAM's get_rel_pos
    rw = _bench._torch_get_rel_pos(gw, gw, tw)
    r_q = q3.reshape(b * h, gh, gw, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    attn = (attn.view(b * h, gh, gw, gh, gw) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(b * h, s, s)
    return (attn.softmax(dim=-1) @ v3).view(b, h, s, d)


SGD = " + SGD"   # rows whose step also updates every parameter in place (lr * gradient)
LR = 1e-4


def _seed_row(rows, what):
    """The seed anchor of row ``what``: the one with the same SGD update or without."""
    sgd = what.endswith(SGD)
    return next((r for r in rows if r["what"].startswith("torch seed") and r["what"].endswith(SGD) == sgd), None)


def _sgd(dtype):
    """``update(params, grads)``: p -= LR * g in place on CuPy arrays (bfloat16
    through their bits, one launch per parameter), an optimizer's work in the
    step the captured graphs follow."""
    import cupy
    import numpy as np

    if np.dtype(dtype).name != "bfloat16":
        def update(params, grads):
            for key, p in params.items():
                p -= LR * grads[key]
        return update
    kernel = cupy.ElementwiseKernel(
        "uint16 g, float32 lr", "uint16 p",
        "unsigned int f = __float_as_uint(__uint_as_float(((unsigned int)p) << 16)"
        " - lr * __uint_as_float(((unsigned int)g) << 16));"
        " p = (unsigned short)((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);",
        "bench_sgd_bf16")

    def update(params, grads):
        for key, p in params.items():
            kernel(grads[key].view(cupy.uint16), np.float32(LR), p.view(cupy.uint16))
    return update


def timed_row(rows, case_name, what, kind, fn, reference, args, measure, log):
    """Time ``fn`` (after one warm-up call), measure its peak memory, print and keep the
    row (ratios against the anchors already in ``rows``); returns the warm-up's results."""
    log(f"[{case_name}] {what} ...")
    results = fn()                                   # warm-up (compilation, caches)
    row = dict(case=case_name, what=what, device=args.device, dtype=args.dtype)
    row.update(measure.time(fn, kind))
    row["peak_mib"] = measure.peak(fn, kind, nbytes(results))
    row["max_diff"] = None if reference is None else max_diff(results, reference)
    seed = _seed_row(rows, what)
    sdpa = next((r for r in rows if r["what"].startswith("torch SDPA")), None)
    row["x_seed"] = None if seed is None else row["time_ms"] / seed["time_ms"]
    row["x_sdpa"] = None if sdpa is None else row["time_ms"] / sdpa["time_ms"]
    rows.append(row)
    print_row(row, args.device)
    return results


def run_core(case, args, measure, torch, log):
    """The rows of one core case: anchors first, then relattn's."""
    import numpy as np

    import relattn
    from relattn import _bench, backends
    from relattn._arrays import resolve_dtype

    dtype = resolve_dtype("dtype", args.dtype)
    host = _bench.make_inputs(case)
    dout_host = np.random.default_rng(1).standard_normal(host[0].shape[:3] + (case.head_dim,), dtype=np.float32)
    rows, seed_results = [], None

    def add(what, kind, fn, reference=None):
        return timed_row(rows, case.name, what, kind, fn, reference, args, measure, log)

    if torch is not None and (args.device == "cpu" or torch.cuda.is_available()):
        tdt = torch_dtype(torch, args.dtype)
        leaves = [torch.from_numpy(a).to(device=args.device, dtype=tdt).requires_grad_() for a in host]
        dout_t = torch.from_numpy(dout_host).to(device=args.device, dtype=tdt)

        def seed_step():
            out = seed_core(torch, *leaves, case.grid)
            return (out.detach(), *torch.autograd.grad(out, leaves, dout_t))

        def sdpa_step():
            out = torch.nn.functional.scaled_dot_product_attention(*leaves[:3])
            return (out.detach(), *torch.autograd.grad(out, leaves[:3], dout_t))

        def bridge_step():
            out = relattn.torch.rel_pos_attention(*leaves, q_size=case.grid)
            return (out.detach(), *torch.autograd.grad(out, leaves, dout_t))

        seed_results = add("torch seed autograd (SAM eager)", "torch", seed_step)
        add("torch SDPA no bias (default)", "torch", sdpa_step)
        add("relattn.torch bridge", "bridge", bridge_step, seed_results)

    arrays = [a.astype(dtype) for a in host]
    dout = dout_host.astype(dtype)
    if args.device == "cuda":
        import cupy

        arrays, dout = [cupy.asarray(a) for a in arrays], cupy.asarray(dout)
        backend = "cupy"
    else:
        backend = "numba" if backends.get("numba").unavailable_reason() is None else "numpy"

    def vjp_step():
        out, pullback = relattn.rel_pos_attention_vjp(*arrays, case.grid, case.grid)
        return (out, *pullback(dout))

    add(f"relattn vjp + pullback ({backend})", "relattn", vjp_step, seed_results)
    return rows


def run_layer(case, args, measure, torch, log):
    """Attention.vjp's step against the seed module's forward + backward, same weights."""
    import numpy as np

    import relattn
    from relattn._arrays import resolve_dtype

    dtype = resolve_dtype("dtype", args.dtype)
    dim = case.heads * case.head_dim
    window = case.grid[0] if "window" in case.name else 0
    side = (16 if args.quick else LAYER_SIDE) if window else case.grid[0]
    name = f"{case.name} layer"
    layer = relattn.Attention(dim, case.heads, use_rel_pos=True, rel_pos_zero_init=False, input_size=case.grid,
                              window_size=window, dtype=dtype, rng=0)
    rng = np.random.default_rng(2)
    x_host = rng.standard_normal((1, side, side, dim), dtype=np.float32)
    dy_host = rng.standard_normal((1, side, side, dim), dtype=np.float32)
    keys = list(layer.state_dict())
    rows, seed_results = [], None

    def add(what, kind, fn, reference=None):
        return timed_row(rows, name, what, kind, fn, reference, args, measure, log)

    if torch is not None and (args.device == "cpu" or torch.cuda.is_available()):
        from bench_module import seed_module   # noqa: E402 - the seed card's module

        tdt = torch_dtype(torch, args.dtype)
        seed = seed_module(torch, dim, case.heads, case.grid)
        seed.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in layer.state_dict().items()})
        seed = seed.to(device=args.device, dtype=tdt)
        params = [dict(seed.named_parameters())[k] for k in keys]
        x_t = torch.from_numpy(x_host).to(device=args.device, dtype=tdt).requires_grad_()
        dy_t = torch.from_numpy(dy_host).to(device=args.device, dtype=tdt)
        F = torch.nn.functional

        def seed_forward(x):
            if not window:
                return seed(x)
            pad = -side % window                       # SAM's Block: pad, partition, attend, unpartition, crop
            n = (side + pad) // window
            xp = F.pad(x, (0, 0, 0, pad, 0, pad))
            w = xp.view(1, n, window, n, window, dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, dim)
            y = seed(w).view(1, n, n, window, window, dim).permute(0, 1, 3, 2, 4, 5)
            return y.reshape(1, n * window, n * window, dim)[:, :side, :side]

        def seed_step():
            y = seed_forward(x_t)
            return (y.detach(), *torch.autograd.grad(y, [x_t, *params], dy_t))

        seed_results = add("torch seed module step", "torch", seed_step)
        if args.device == "cuda":
            def seed_sgd_step():
                y, dx, *grads = seed_step()
                with torch.no_grad():
                    torch._foreach_add_(params, grads, alpha=-LR)
                return (y, dx, *grads)

            add("torch seed module step" + SGD, "torch", seed_sgd_step)

    x, dy = x_host.astype(dtype), dy_host.astype(dtype)
    if args.device == "cuda":
        import cupy

        x, dy = cupy.asarray(x), cupy.asarray(dy)

    def layer_step():
        y, pullback = layer.vjp(x)
        dx, grads = pullback(dy)
        return (y, dx, *(grads[k] for k in keys))

    add("relattn Attention.vjp step", "relattn", layer_step, seed_results)
    if args.device == "cuda" and x.dtype.itemsize == 2:
        step = layer.capture_vjp(x)

        def captured_step():
            y, pullback = step(x)
            dx, grads = pullback(dy)
            return (y, dx, *(grads[k] for k in keys))

        add("relattn Attention.capture_vjp step (graphs)", "relattn", captured_step, seed_results)
        update = _sgd(x.dtype)

        def captured_sgd_step():
            y, pullback = step(x)
            dx, grads = pullback(dy, copy=False)
            update(step.parameters, grads)
            return (y, dx, *(grads[k] for k in keys))

        add("relattn capture_vjp step" + SGD, "relattn", captured_sgd_step)
    return rows


# -- output --------------------------------------------------------------------------


def header(device):
    if device == "cuda":
        cols = f"{'per call':>10} {'1+sync':>10}"
    else:
        cols = f"{'time':>10}"
    return f"{'case':<24} {'what':<36} {cols} {'x seed':>7} {'x SDPA':>7} {'peak MiB':>9} {'max diff':>9}"


def print_row(row, device):
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    times = f"{row['time_ms']:10.3f}"
    if device == "cuda":
        times += f" {row['one_sync_ms']:10.4f}"
    print(f"{row['case']:<24} {row['what']:<36} {times} {num(row.get('x_seed'), '7.2f'):>7} "
          f"{num(row.get('x_sdpa'), '7.2f'):>7} {num(row['peak_mib'], '9.1f'):>9} {num(row['max_diff'], '9.1e'):>9}",
          flush=True)


def check_targets(device, case_name, core_rows, layer_rows, args):
    """Target lines for one case; returns their records."""
    out = []
    base = case_name.replace("-quick", "")
    vjp = next((r for r in core_rows if r["what"].startswith("relattn vjp")), None)
    layer = next((r for r in layer_rows if r["what"].startswith("relattn")), None)
    checks = []
    for dev, case, what, limit in TARGETS:
        if dev != device or case != base:
            continue
        if what == "layer":
            if args.layer:   # the eager step, and the captured one where it ran
                checks += [(what, limit, r) for r in layer_rows if r["what"].startswith("relattn")]
        else:
            checks.append((what, limit, None))
    for what, limit, layer_row in checks:
        if what == "layer":
            kind = ("captured" if "capture" in layer_row["what"] else "eager") + \
                (", both with an SGD update" if layer_row["what"].endswith(SGD) else "")
            label = f"layer step ({kind}): seed module / relattn >= {limit:g}x"
            seed_layer = _seed_row(layer_rows, layer_row["what"])
            value = None if seed_layer is None else seed_layer["time_ms"] / layer_row["time_ms"]
            met = value is not None and value >= limit
        else:
            key = {"seed": "x_seed", "sdpa": "x_sdpa", "memory": "peak_mib"}[what]
            label = {"seed": f"fwd+bwd <= {limit:g}x seed autograd", "sdpa": f"fwd+bwd <= {limit:g}x SDPA no bias",
                     "memory": f"peak extra memory <= {limit:g} MiB"}[what]
            value = None if vjp is None else vjp.get(key)
            met = value is not None and value <= limit
        if value is None:
            status = "not measured (anchor missing)"
        elif met:
            status = "target met"
        else:
            status = f"not met ({value:.2f} vs {limit:.2f})"
        out.append(dict(case=case_name, target=label, value=value, limit=limit, met=met if value is not None else None))
        print(f"  {case_name}: {label}: {'-' if value is None else f'{value:.2f}'}  {status}", flush=True)
    if out:
        dtype, threads = TARGET_CONFIG[device]
        notes = []
        if args.dtype != dtype:
            notes.append(f"the targets are stated for {dtype}")
        if threads is not None and args.threads != threads:
            notes.append(f"for {threads} threads")
        if args.quick:
            notes.append("--quick shapes: indicative only")
        if notes:
            print(f"  ({'; '.join(notes)})", flush=True)
    seed_layer = _seed_row(layer_rows, "")
    if device == "cpu" and args.layer and layer is not None and seed_layer is not None:
        print(f"  {case_name}: layer step: seed module / relattn = {seed_layer['time_ms'] / layer['time_ms']:.2f}x "
              f"(the 3x layer target is stated for GPU bfloat16)", flush=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        limit_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)   # noqa: E731 - progress, off the table

    from relattn import _bench

    torch, missing = None, []
    if args.no_torch:
        missing.append("PyTorch anchors skipped (--no-torch): relattn rows only")
    elif _bench.import_torch_first():   # torch before numba's thread pool starts
        import torch
    else:
        missing.append(f"{_bench.torch_problem()}: relattn rows only")
    if args.device == "cuda":
        try:
            import cupy

            cupy.cuda.runtime.getDeviceCount()
            gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        except Exception as exc:  # noqa: BLE001 - no CuPy, no driver, no device
            print(f"--device cuda: no usable CUDA device for relattn ({type(exc).__name__}: "
                  f"{' '.join(str(exc).split())[:160]}); install CuPy (pip install -e \".[gpu]\") on a "
                  f"CUDA machine, or use --device cpu", file=sys.stderr)
            return 2
        if torch is not None and not torch.cuda.is_available():
            missing.append("this PyTorch has no CUDA: relattn rows only")
            torch = None
    import numpy as np

    from relattn import backends

    if args.device == "cpu":
        numba_why = backends.get("numba").unavailable_reason()
        if numba_why is None:
            import numba

            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        else:
            missing.append(f"numba unavailable ({numba_why}): relattn runs the numpy reference backward")
        if torch is not None:
            torch.set_num_threads(args.threads)
        where = f"CPU, {args.threads} threads (numba, torch; BLAS {os.environ.get('OPENBLAS_NUM_THREADS')})"
    else:
        where = f"{gpu}, cupy {cupy.__version__}"
    if args.dtype == "bfloat16" and args.device == "cpu":
        from relattn._arrays import BFLOAT16

        if BFLOAT16 is None:
            print("--dtype bfloat16 on the CPU needs ml_dtypes (pip install -e \".[bf16]\")", file=sys.stderr)
            return 2
    print(f"relattn fwd+bwd: {where}, {args.dtype}, numpy {np.__version__}, "
          f"torch {getattr(torch, '__version__', '-')}")
    for line in missing:
        print(f"note: {line}")
    measure = Measure(args.device, args.runs, args.calls, torch)
    unit = "ms; per call: back to back" if args.device == "cuda" else f"ms, median of {args.runs}"
    print(f"({unit}; x seed / x SDPA: time / anchor time; peak MiB above inputs and results)")
    print(header(args.device))
    rows, targets = [], []
    for name in args.case:
        case = core_case(name, args.quick)
        core_rows = run_core(case, args, measure, torch, log)
        layer_rows = []
        if args.layer:
            layer_rows = run_layer(case, args, measure, torch, log)
        targets += check_targets(args.device, case.name, core_rows, layer_rows, args)
        rows += core_rows + layer_rows
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(config=dict(device=args.device, dtype=args.dtype, threads=args.threads, runs=args.runs,
                                       quick=args.quick, torch=getattr(torch, "__version__", None)),
                           rows=rows, targets=targets), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
