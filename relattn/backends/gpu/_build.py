"""Compiling and loading the CUDA kernels.

Each family's source is the shared prelude (``cuda/common.cuh``), the headers
it shares with other families, and its own file (``cuda/<family>.cu``):
``family_source(name)``. The portable kernels are compiled by CuPy's
``RawModule`` (NVRTC), one module per (family, dtype or head_dim, device)
holding every instantiation the family may launch there. The Hopper kernels
(``ws``, ``wg``, ``wgt``) need the ``sm_90a`` target, to which CuPy cannot
compile (it adds its own ``-arch``), so this module drives NVRTC itself and
loads the cubin with ``cupy.cuda.function.Module``. Cubins are cached in
memory and, when ``RELATTN_CACHE_DIR`` (default ``~/.cache/relattn``) is
writable, on disk, keyed by a hash of the source, the options and the NVRTC
version.

Nothing here chooses a kernel: families (``families/``) name the
instantiation they want.
"""

from __future__ import annotations

import hashlib
import os
import threading

from .options import OPTIONS

CUDA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda")
SM90_OPTIONS = ("-arch=sm_90a", "-std=c++17", "--use_fast_math")
PORTABLE_OPTIONS = ("-std=c++17", "--use_fast_math")
MAX_SMEM_SM90 = 227 * 1024

# N of the 16-bit wgmma wrappers: key tiles, head dims, and 72 (relattn_ws's
# one-pass rel_h of 72 table rows)
WG_NS = tuple(sorted({64, 128} | set(range(16, 129, 16)) | {72}))
# N of the TF32 wgmma wrappers (relattn_wgt: key tiles and head dims <= 80)
WT_NS = (16, 32, 48, 64, 80)


class BuildError(RuntimeError):
    """A Hopper kernel could not be built here (the planner falls back)."""


_lock = threading.Lock()
_sources: dict = {}
_portable_modules: dict = {}
_portable_functions: dict = {}
_sm90_functions: dict = {}
_sm90_modules: dict = {}
_smem_set: dict = {}


def read_cuda(name: str) -> str:
    """Text of a file of relattn/backends/cuda."""
    with open(os.path.join(CUDA_DIR, name), "r", encoding="utf-8") as fh:
        return fh.read()


# What NVRTC compiles, from the files of relattn/backends/cuda: the prelude
# (common.cuh), for the Hopper kernels the generated wgmma wrappers, then the
# headers a family shares with others and its own file.
PRELUDE = "common.cuh"
# family -> (target, its files after the prelude): "portable" goes through
# portable_kernel (any compute capability from 8.0), "sm90" through sm90_kernel
FAMILY_FILES = {
    "mma": ("portable", ("mma_sync.cuh", "mma.cu")),       # relattn_mma
    "win": ("portable", ("mma_sync.cuh", "win.cu")),       # relattn_win
    "simt": ("portable", ("simt.cu",)),                    # relattn_simt
    "terms": ("portable", ("mma_sync.cuh", "terms.cu")),   # relattn_relterms, relattn_relterms_mma
    "bwd": ("portable", ("mma_sync.cuh", "bwd_common.cuh", "bwd16.cuh", "bwd.cu")),   # relattn_bwd_rows, _dq, _dkv (16-bit)
    "bwd32": ("portable", ("bwd_common.cuh", "bwd32.cu")),                # relattn_bwd32_* (float32)
    "bwd_terms": ("portable", ("bwd_terms.cu",)),   # relattn_bwd_terms_*: the pullback through the terms
    "tf32": ("portable", ("tf32_common.cuh", "tf32.cu")),  # relattn_tf32
    "wg": ("sm90", ("sm90_common.cuh", "wg.cu")),          # relattn_wg
    "ws": ("sm90", ("sm90_common.cuh", "ws.cu")),          # relattn_ws
    "wgt": ("sm90", ("sm90_common.cuh", "tf32_common.cuh", "wgt.cu")),   # relattn_wgt
    "bwd_wg": ("sm90", ("sm90_common.cuh", "bwd_common.cuh", "bwd16.cuh", "bwd_wg.cu")),   # relattn_bwd_wg_dq, _dkv
}


def family_of(name: str) -> str:
    """The family (a key of ``FAMILY_FILES``) of a kernel instantiation's name:
    ``relattn_<family>`` or ``relattn_<family>_<kernel>``, the longest match."""
    base = name[len("relattn_"):name.index("<")] if "<" in name else name[len("relattn_"):]
    fams = [f for f in FAMILY_FILES if base == f or base.startswith(f + "_")]
    if not fams:
        raise KeyError(f"no kernel family for {name!r}")
    return max(fams, key=len)


def _target_files(target: str) -> tuple:
    """Every file of one target's families, each once, headers first."""
    files = [name for t, names in FAMILY_FILES.values() if t == target for name in names]
    names = list(dict.fromkeys(files))
    return tuple(n for n in names if n.endswith(".cuh")) + tuple(n for n in names if not n.endswith(".cuh"))


def _assemble(target: str, files) -> str:
    """The prelude, the wgmma wrappers (sm90: they use the prelude's types), then ``files``."""
    parts = [read_cuda(PRELUDE)]
    if target == "sm90":
        parts.append(wgmma_wrappers())
    parts.extend(read_cuda(name) for name in files)
    return "\n".join(parts)


def sources_present() -> str | None:
    """None when the kernel sources are installed, else which one is missing."""
    for name in (PRELUDE, *_target_files("portable"), *_target_files("sm90")):
        path = os.path.join(CUDA_DIR, name)
        if not os.path.isfile(path):
            return f"kernel source missing: {path}"
    return None


def portable_source() -> str:
    """The prelude, then every portable family's headers and kernels."""
    if "portable" not in _sources:
        _sources["portable"] = _assemble("portable", _target_files("portable"))
    return _sources["portable"]


def sm90_source() -> str:
    """The prelude, the generated wgmma wrappers (they use its types), then
    every Hopper family's headers and kernels."""
    if "sm90" not in _sources:
        _sources["sm90"] = _assemble("sm90", _target_files("sm90"))
    return _sources["sm90"]


def family_source(name: str) -> str:
    """What one family's kernels need (a key of ``FAMILY_FILES``): the prelude,
    for the Hopper families the wgmma wrappers, the shared headers it uses,
    then its own file."""
    key = ("family", name)
    if key not in _sources:
        target, files = FAMILY_FILES[name]
        _sources[key] = _assemble(target, files)
    return _sources[key]


def _rs_asm(op: str, nr: int, trans: bool) -> str:
    """The inline asm of one wgmma with A from registers (4 x b32) into nr
    float32 accumulators; ``trans``: 16-bit types' transpose immediates."""
    dl = ", ".join(f"%{i}" for i in range(nr))
    cons = ", ".join(f'"+f"(d[{i}])' for i in range(nr))
    imm = "1, 1, 1" if trans else "1, 1"
    return (
        f'asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{nr + 5}, 0;\\n'
        f'{op} {{{dl}}}, {{%{nr}, %{nr + 1}, %{nr + 2}, %{nr + 3}}}, %{nr + 4}, p, {imm};\\n}}\\n"'
        f' : {cons} : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));'
    )


def wgmma_wrappers() -> str:
    """C++ for struct RaWg<DT, N>: ``ss`` (A and B from shared memory) and
    ``rs`` (A from registers, B N-major from shared memory) wgmma m64nNk16;
    struct RaWt<N>: ``rs`` for TF32 m64nNk8 (B K-major; TF32 takes no
    transpose immediates), relattn_wgt's products."""
    rs_sig = "static __device__ __forceinline__ void rs(float* d, const u32* a, u64 db, int acc)"
    out = ["template <int DT, int N> struct RaWg;"]
    for dt, tn in ((0, "f16"), (1, "bf16")):
        for n in WG_NS:
            nr = n // 2
            dl = ", ".join(f"%{i}" for i in range(nr))
            cons = ", ".join(f'"+f"(d[{i}])' for i in range(nr))
            op = f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{tn}.{tn}"
            ss = (
                f'asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{nr + 2}, 0;\\n'
                f'{op} {{{dl}}}, %{nr}, %{nr + 1}, p, 1, 1, 0, 0;\\n}}\\n"'
                f' : {cons} : "l"(da), "l"(db), "r"(acc));'
            )
            out.append(
                f"template <> struct RaWg<{dt}, {n}> {{\n"
                f"  static __device__ __forceinline__ void ss(float* d, u64 da, u64 db, int acc) {{\n    {ss}\n  }}\n"
                f"  {rs_sig} {{\n    {_rs_asm(op, nr, True)}\n  }}\n"
                f"}};"
            )
    out.append("template <int N> struct RaWt;")
    for n in WT_NS:
        op = f"wgmma.mma_async.sync.aligned.m64n{n}k8.f32.tf32.tf32"
        out.append(f"template <> struct RaWt<{n}> {{\n  {rs_sig} {{\n    {_rs_asm(op, n // 2, False)}\n  }}\n}};")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------- portable
def portable_kernel(module_key, names: dict, which, smem: int, source: str | None = None):
    """The function ``names[which]`` of the RawModule holding every name of
    ``names`` (compiled once per ``module_key`` and device from ``source``,
    by default :func:`portable_source`; a family passes its
    :func:`family_source`), with its dynamic shared-memory limit raised to at
    least ``smem`` bytes."""
    import cupy

    dev = cupy.cuda.runtime.getDevice()
    key = (module_key, which, dev)
    fn = _portable_functions.get(key)
    if fn is None:
        with _lock:
            fn = _portable_functions.get(key)
            if fn is None:
                mkey = (module_key, dev)
                mod = _portable_modules.get(mkey)
                if mod is None:
                    mod = _portable_modules[mkey] = cupy.RawModule(
                        code=portable_source() if source is None else source, options=PORTABLE_OPTIONS,
                        name_expressions=list(names.values()))
                fn = _portable_functions[key] = mod.get_function(names[which])
    if smem > 48 * 1024 and _smem_set.get(id(fn), 0) < smem:
        with _lock:
            if _smem_set.get(id(fn), 0) < smem:
                fn.max_dynamic_shared_size_bytes = smem
                _smem_set[id(fn)] = smem
    return fn


# -------------------------------------------------------------------- sm_90a
def _cache_dir():
    d = OPTIONS.cache_dir
    try:
        os.makedirs(d, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    return None


def _compile_sm90(name: str):
    """(cubin bytes, lowered name) for one kernel instantiation."""
    from cupy_backends.cuda.libs import nvrtc

    family = family_of(name)
    src = family_source(family)
    ver = nvrtc.getVersion()
    digest = hashlib.sha256(repr((src, SM90_OPTIONS, name, ver)).encode()).hexdigest()[:32]
    cdir = _cache_dir()
    path = os.path.join(cdir, f"sm90-{digest}.cubin") if cdir else None
    if path and os.path.isfile(path):
        try:
            with open(path, "rb") as fh:
                blob = fh.read()
            lowered, _, cubin = blob.partition(b"\0")
            if cubin:
                return cubin, lowered.decode()
        except OSError:
            pass
    prog = nvrtc.createProgram(src, f"{family}.cu", (), ())
    try:
        nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, list(SM90_OPTIONS))
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise RuntimeError(f"relattn: NVRTC failed to build {name} for sm_90a:\n{log}") from exc
        lowered = nvrtc.getLoweredName(prog, name)
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    if path:
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(lowered.encode() + b"\0" + cubin)
            os.replace(tmp, path)
        except OSError:
            try:
                os.remove(tmp)
            except OSError:
                pass
    return cubin, lowered


def sm90_kernel(name: str):
    """The loaded function of one sm_90a instantiation on the current device;
    BuildError when it cannot be built here (that device then runs no more
    Hopper kernels)."""
    import cupy

    from . import _device

    dev = cupy.cuda.runtime.getDevice()
    key = (name, dev)
    fn = _sm90_functions.get(key)
    if fn is not None:
        return fn
    with _lock:
        fn = _sm90_functions.get(key)
        if fn is not None:
            return fn
        try:
            cubin, lowered = _compile_sm90(name)
        except Exception as exc:
            why = f"building the sm_90a kernel failed ({type(exc).__name__}: {exc})".splitlines()[0]
            _device.mark_hopper_broken(_device.current(), why)
            raise BuildError(why) from exc
        mod = cupy.cuda.function.Module()
        mod.load(cubin)
        fn = mod.get_function(lowered)
        _sm90_modules[key] = mod  # keep the module loaded while its function is in use
        # a cap, not a reservation: any launch size fits (static shared memory
        # of relattn_ws, its mbarriers, counts against the same limit)
        _set_smem(fn, MAX_SMEM_SM90 - (1024 if name.startswith("relattn_ws") else 0))
        _sm90_functions[key] = fn
        return fn


def _set_smem(fn, smem):
    from cupy.cuda import driver

    attr = getattr(driver, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", 8)
    driver.funcSetAttribute(fn.ptr, attr, int(smem))


# ------------------------------------------------------------------ launching
_driver: list = []


def _libcuda():
    if not _driver:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        vp, u = ctypes.c_void_p, ctypes.c_uint
        lib.cuLaunchKernel.argtypes = [vp, u, u, u, u, u, u, u, vp, vp, vp]
        lib.cuLaunchKernel.restype = ctypes.c_int
        _driver.append(lib)
    return _driver[0]


_CUDA_ERROR_INVALID_CONTEXT = 201


def _make_context_current():
    """Make the current device's primary context current on this thread, as
    CUDA runtime calls do on first use (a driver-API launch does not)."""
    import cupy

    cupy.cuda.runtime.setDevice(cupy.cuda.runtime.getDevice())


class RawLaunch:
    """One kernel launch through ``cuLaunchKernel`` with its argument block
    built once: a planned call writes only the pointers (and 128-byte TMA
    descriptors) that change and launches, instead of CuPy converting every
    argument on every call.

    ``spec`` lists the kernel's parameters in order: ``"ptr"`` (a device
    pointer set per call), ``"map"`` (a 128-byte CUtensorMap set per call), or
    a fixed numpy scalar (``np.int32``, ``np.uint32``, ``np.float32``, ``np.int64``) or
    integer pointer held for the plan's life.
    """

    def __init__(self, fn, grid, block, smem, spec):
        """``fn``: a loaded ``cupy.cuda.Function`` or a ``cupy.RawKernel``
        (its function on the current device)."""
        import ctypes

        import numpy as np

        self._lib = _libcuda()
        func = fn if hasattr(fn, "ptr") else fn.kernel   # a RawKernel: its function on the current device
        self._fn = (fn, func)   # keeps the module's function alive
        self._func = ctypes.c_void_p(func.ptr)
        self._dims = (*grid, *(1,) * (3 - len(grid)), *block, *(1,) * (3 - len(block)), int(smem))
        nmaps = sum(1 for s in spec if isinstance(s, str) and s == "map")
        self._maps = np.zeros(nmaps * 128 + 64, dtype=np.uint8)   # 64-byte aligned 128-byte slots
        base = (-self._maps.ctypes.data) % 64
        self._keep, self._ptr_slots, self._map_addr, addrs = [], [], [], []
        m = 0
        for s in spec:
            if isinstance(s, str) and s == "map":
                addr = self._maps.ctypes.data + base + 128 * m
                m += 1
                self._map_addr.append(addr)
                addrs.append(addr)
                continue
            if isinstance(s, str) and s == "ptr":
                slot = ctypes.c_void_p(0)
                self._ptr_slots.append(slot)
            else:   # fixed for the plan's life
                kind = {np.dtype(np.int32): ctypes.c_int, np.dtype(np.uint32): ctypes.c_uint,
                        np.dtype(np.float32): ctypes.c_float,
                        np.dtype(np.int64): ctypes.c_longlong}.get(getattr(s, "dtype", None))
                slot = ctypes.c_void_p(int(s)) if kind is None else kind(s.item())
            self._keep.append(slot)
            addrs.append(ctypes.addressof(slot))
        self._params = (ctypes.c_void_p * len(addrs))(*addrs)
        self._memmove = ctypes.memmove
        self._lock = threading.Lock()

    def __call__(self, ptrs, maps, stream_ptr):
        """Launch with ``ptrs`` (the "ptr" parameters in order) and ``maps``
        (host addresses of the 128-byte descriptors, in order) on ``stream_ptr``."""
        with self._lock:   # the block is shared by the plan's callers; the driver copies it at launch
            for slot, p in zip(self._ptr_slots, ptrs):
                slot.value = p
            for addr, src in zip(self._map_addr, maps):
                self._memmove(addr, src, 128)
            status = self._lib.cuLaunchKernel(self._func, *self._dims, stream_ptr, self._params, None)
            if status == _CUDA_ERROR_INVALID_CONTEXT:   # a thread whose CUDA context is not yet current
                _make_context_current()
                status = self._lib.cuLaunchKernel(self._func, *self._dims, stream_ptr, self._params, None)
        if status != 0:
            raise RuntimeError(f"relattn: cuLaunchKernel failed (CUresult {status})")
