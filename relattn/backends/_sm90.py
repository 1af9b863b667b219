"""Hopper (sm_90a) wgmma attention kernel: compiling, caching and launching.

CuPy's ``RawModule`` always adds its own ``-arch`` option, and the warpgroup
instructions (``wgmma``) exist only for the ``sm_90a`` target, so this module
drives NVRTC itself (through CuPy's bindings), asks for an ``sm_90a`` cubin and
loads it with ``cupy.cuda.function.Module``. Cubins are cached in memory and,
when a cache directory is writable, on disk (``$RELATTN_CACHE_DIR`` or
``~/.cache/relattn``), keyed by a hash of the source, the options and the
NVRTC version.

Used by ``cupy_gpu.attention`` for float16 / bfloat16 on compute capability
9.0 devices; ``RELATTN_SM90=0`` turns it off (the portable ``mma.sync``
kernel then runs).
"""

from __future__ import annotations

import hashlib
import os
import threading

_OPTIONS = ("-arch=sm_90a", "-std=c++17", "--use_fast_math")
_BNS = (64, 128)
# k_w served by key tiles of one whole key row (REL 3): multiples of 16 (the
# k16 steps of P V) with the tile's rel_w kept in registers
_WHOLE_ROW_KW = (48, 80, 96, 112, 128)
_HDS = tuple(range(16, 129, 16))
# N of the TF32 wgmma wrappers (relattn_wgt: key tiles and head dims <= 64)
_TF32_NS = (16, 32, 48, 64, 80)

class BuildError(RuntimeError):
    """The sm_90a kernel could not be built here (the caller falls back)."""


_lock = threading.Lock()
_functions: dict = {}
_modules: dict = {}
_status: dict = {}
_source: list = []

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


def _wrappers() -> str:
    """C++ for struct RaWg<DT, N>: ``ss`` (A and B from shared memory) and
    ``rs`` (A from registers, B N-major from shared memory) wgmma m64nNk16;
    struct RaWt<N>: ``rs`` for TF32 m64nNk8 (B K-major; TF32 takes no
    transpose immediates), relattn_wgt's products."""
    rs_sig = "static __device__ __forceinline__ void rs(float* d, const u32* a, u64 db, int acc)"
    out = ["template <int DT, int N> struct RaWg;"]
    for dt, tn in ((0, "f16"), (1, "bf16")):
        for n in sorted(set(_BNS) | set(_HDS) | {72}):   # 72: relattn_ws rel 7's rel_h pass
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
    for n in _TF32_NS:
        op = f"wgmma.mma_async.sync.aligned.m64n{n}k8.f32.tf32.tf32"
        out.append(f"template <> struct RaWt<{n}> {{\n  {rs_sig} {{\n    {_rs_asm(op, n // 2, False)}\n  }}\n}};")
    return "\n".join(out) + "\n"


def source() -> str:
    """The complete CUDA source handed to NVRTC."""
    if not _source:
        from relattn.backends.cupy_gpu import read_cuda

        # the prelude's types come before the wrappers that use them
        _source.append(read_cuda("relattn_common.cuh") + "\n" + _wrappers() + "\n" + read_cuda("relattn_sm90.cu"))
    return _source[0]


def kernel_name(dt: int, hd: int, nwg: int, bn: int, rel: int, st: int) -> str:
    return f"relattn_wg<{dt}, {hd}, {nwg}, {bn}, {rel}, {st}>"


def unavailable_reason(device=None):
    """None when the sm_90a kernel can run on the current device, else why not."""
    if os.environ.get("RELATTN_SM90", "1") == "0":
        return "disabled by RELATTN_SM90=0"
    import cupy

    dev = cupy.cuda.Device() if device is None else device
    key = ("avail", dev.id)
    if key in _status:
        return _status[key]
    why = None
    cc = str(dev.compute_capability)
    if cc != "90":
        why = f"compute capability {cc[:-1]}.{cc[-1]} is not 9.0 (wgmma needs sm_90a)"
    else:
        try:
            from cupy_backends.cuda.libs import nvrtc

            major, minor = nvrtc.getVersion()
            if (major, minor) < (12, 0):
                why = f"NVRTC {major}.{minor} cannot target sm_90a (needs 12.0 or newer)"
        except Exception as exc:  # pragma: no cover - depends on the CuPy build
            why = f"CuPy's NVRTC bindings are not usable ({type(exc).__name__}: {exc})"
    _status[key] = why
    return why


def _cache_dir():
    d = os.environ.get("RELATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "relattn")
    try:
        os.makedirs(d, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    return None


def _compile(name: str):
    """(cubin bytes, lowered name) for one kernel instantiation."""
    from cupy_backends.cuda.libs import nvrtc

    src = source()
    ver = nvrtc.getVersion()
    digest = hashlib.sha256(repr((src, _OPTIONS, name, ver)).encode()).hexdigest()[:32]
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
    prog = nvrtc.createProgram(src, "relattn_sm90.cu", (), ())
    try:
        nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, list(_OPTIONS))
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


def get_kernel(dt: int, hd: int, nwg: int, bn: int, rel: int, st: int):
    return _get_named(kernel_name(dt, hd, nwg, bn, rel, st))


def _get_named(name: str):
    """The loaded function of one kernel instantiation on the current device."""
    import cupy

    dev = cupy.cuda.Device().id
    key = (name, dev)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    with _lock:
        fn = _functions.get(key)
        if fn is not None:
            return fn
        try:
            cubin, lowered = _compile(name)
        except Exception as exc:
            # e.g. an NVRTC without sm_90a support: the portable kernel takes over
            why = f"building the sm_90a kernel failed ({type(exc).__name__}: {exc})".splitlines()[0]
            _status[("avail", dev)] = why
            raise BuildError(why) from exc
        mod = cupy.cuda.function.Module()
        mod.load(cubin)
        fn = mod.get_function(lowered)
        _modules[key] = mod  # keep the module loaded while its function is in use
        # a cap, not a reservation: any launch size fits (static shared memory
        # of relattn_ws, its mbarriers, counts against the same limit)
        _set_smem(fn, MAX_SMEM - (1024 if name.startswith("relattn_ws") else 0))
        _functions[key] = fn
        return fn


def _set_smem(fn, smem):
    from cupy.cuda import driver

    attr = getattr(driver, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", 8)
    driver.funcSetAttribute(fn.ptr, attr, int(smem))


def smem_bytes(hd: int, nwg: int, bn: int, rel: int, kh: int, kw: int, st: int = 2) -> int:
    n = 64 * nwg * hd * 2 + 2 * st * bn * hd * 2 + 1024  # + 1024: alignment of the swizzled tiles
    if rel == 2:
        n += 64 * nwg * ((kh + kw) | 1) * 4
    return n


MAX_SMEM = 227 * 1024


def choose(hd: int, sq: int, sk: int, kh: int, kw: int, has_rel: bool):
    """(nwg, bn, rel, stages) for a problem, or None when this kernel should not take it."""
    if not has_rel:
        rel = 0
    elif kw == 64:
        rel = 1
    elif kw in _WHOLE_ROW_KW:
        rel = 3   # one whole key row per tile (bn = kw)
    else:
        rel = 2
    env = os.environ.get("RELATTN_SM90_CFG")  # "nwg,bn[,stages]" for experiments
    st = 2
    if env:
        parts = [int(x) for x in env.split(",")]
        nwg, bn = parts[:2]
        st = parts[2] if len(parts) > 2 else 2
    elif hd == 64 and rel in (0, 1):
        # measured (H200, bf16, CUDA graph): SAM-B global 0.220 ms with one
        # warpgroup and 64-key tiles, 0.238 ms with (2, 128), 0.268 ms for the
        # mma.sync kernel
        nwg, bn = 1, 64
    elif hd == 64 and rel == 3:
        nwg, bn = 1, kw
    elif hd == 80 and rel in (0, 1):
        # SAM-H: 64 swizzled columns + 16 unswizzled ones per tile row; two
        # warpgroups share each K/V tile. Measured (H100, bf16, CUDA graph,
        # with the rel terms): 0.346 ms vs 0.403 for the mma.sync kernel;
        # (1, 64) 0.423, (2, 64, 3 stages) 0.348, (2, 128) 0.423, (3, 64) 0.419
        nwg, bn = 2, 64
    else:
        # other head dims run without the 128-byte swizzle, and the generic
        # bias path is no faster than the mma.sync kernel (SAM-H unswizzled
        # 0.465 vs 0.387 ms; 14x14 windows 0.057 vs 0.053 ms): leave those to it
        return None
    if (rel == 1 and bn % 64) or (rel == 3 and bn != kw):
        rel = 2
    if smem_bytes(hd, nwg, bn, rel, kh, kw, st) > MAX_SMEM:
        return None
    return nwg, bn, rel, st


def launch_spec(B: int, H: int, Sq: int, kh: int, kw: int, hd: int, dt: int, cfg):
    """(kernel, grid, block, extra arguments, shared bytes) of relattn_wg for a
    problem and a ``choose`` result. The kernel takes the arguments of the
    mma.sync kernel (see cupy_gpu) followed by ``extra``: the shared-memory
    descriptors' leading / stride byte offsets of Q-K and of V. Raises
    BuildError when the kernel cannot be built here."""
    import numpy as np

    nwg, bn, rel, st = cfg
    smem = smem_bytes(hd, nwg, bn, rel, kh, kw, st)
    fn = get_kernel(dt, hd, nwg, bn, rel, st)
    bm = 64 * nwg
    grid = (B * H * ((Sq + bm - 1) // bm),)
    if hd in (64, 80):  # 128-byte swizzle (head_dim 80: of the first 64 columns): 8-row atoms of 1024 bytes
        kq = (16, 1024)    # leading unused (K-major swizzled), stride: next 8 rows
        vv = (8192, 1024)  # N-major swizzled: leading = next 64 columns, stride = next 8 keys
    else:  # no swizzle: core matrices 128 B apart along K, row groups hd * 16 B apart
        kq = (128, hd * 16)
        vv = (hd * 16, 128)  # N-major: leading = next 8 keys, stride = next 8 columns
    return fn, grid, (128 * nwg,), tuple(np.int32(x) for x in (*kq, *vv)), smem


# --------------------------------------------------------------- relattn_wgt
# float32 as 3xTF32 on wgmma (head_dim <= 80; k_w == 64, k_w <= 16 or no
# terms). RELATTN_SM90_TF32: "0" off (relattn_tf32's mma.sync kernel runs),
# unset / "1" on, "32" / "64" the key tile (experiments).
def wgt_choose(hd: int, Sk: int, kh: int, kw: int, has_rel: bool):
    """(hd, bn, rel) of relattn_wgt for a float32 problem (hd: head_dim
    rounded up to 16), or None where it does not serve it."""
    env = os.environ.get("RELATTN_SM90_TF32", "1")
    if env == "0" or hd > 80:
        return None
    if not has_rel:
        rel = 0
    elif kh * kw != Sk:
        return None
    elif kw == 64:
        rel = 1
    elif kw <= 16:
        rel = 5
    else:
        return None
    # measured (H100, graph, core with the terms given): SAM-B windowed
    # 0.1002 ms with 32-key tiles (two key rows: 224 slots for 196 keys), 0.1071
    # with 64 (256 slots); relattn_tf32 0.1860. SAM-B global 0.7849 (64) / 0.7923
    # (32); relattn_tf32 1.0152. head_dim 80 fits the registers with 32-key
    # tiles only (k_w == 64: a key row in two tiles)
    bn = 32 if (rel == 5 or hd > 64) else 64
    if env in ("32", "64") and hd <= 64:
        bn = int(env)
    return hd, bn, rel


def wgt_smem_bytes(hd: int, bn: int) -> int:
    """Raw K tile, raw V rows (padded to 16 banks mod 32), four split operands, alignment."""
    vrow = hd + ((16 - hd % 32) + 32) % 32
    return 5 * bn * hd * 4 + bn * vrow * 4 + 128


def wgt_kernel(cfg):
    """(function, shared bytes) of relattn_wgt; raises BuildError."""
    hd, bn, rel = cfg
    return _get_named(f"relattn_wgt<{hd}, {bn}, {rel}>"), wgt_smem_bytes(hd, bn)


# ---------------------------------------------------------------- relattn_ws
# The warp-specialised kernel (TMA producer, consumer warpgroups) for
# head_dim 64 and 80. RELATTN_SM90_WS: "0" off, "nc,bn,stages,pp,rg[,mb]" a
# configuration (experiments); unset or "1": WS_DEFAULT.
# (nc, bn, stages, pp, rg) per head_dim. Measured (H100, bf16, CUDA graph,
# SAM-B global core without the terms): (3, 64, 4, 1, 160) 0.132 ms,
# (3, 64, 3, 1, 160) 0.133, (3, 64, 4, 0, 160) 0.141, (2, 128, 3, 1, 240)
# 0.144, (2, 64, 4, 0, 0) 0.155; relattn_wg 0.214.
# SAM-H core: (2, 128, 3, 1, 240) 0.223 ms, (3, 64, 3, 1, 160) 0.229,
# (2, 64, 4, 1, 240) 0.235; relattn_wg 0.319.
WS_DEFAULT = {64: (3, 64, 4, 1, 160, 1), 80: (2, 128, 3, 1, 240, 1)}
# Small key grids (k_w <= 16, k_h <= 16: SAM's 14 x 14 windows) in 16-slot key
# rows (rel 5 / 6): one consumer warpgroup, three blocks per SM (the registers
# capped at 136: no spills), so that one block's prologue and epilogue overlap
# the others' products. H200, bf16, CUDA graph, SAM-B windowed fused (no-bias
# SDPA 0.0214 ms): (1, 64, 3, 0, 0, 3) 0.0266 ms, (1, 64, 2, 0, 0, 3)
# 0.0277-0.0285, (2, 64, 4, 1, 240, 1) 0.0299-0.0306, (1, 64, 4, 0, 0, 2) 0.0295,
# (2, 128, 2, 1, 240, 1) 0.0306, (1, 128, 2, 0, 0, 2) 0.0318; relattn_win 0.042;
# (1, 32, 3, 0, 0, 4) 0.0266-0.0269, (1, 32, 4, 0, 0, 3) 0.0286.
# SAM-H windowed (head_dim 80): 32-key tiles (two key rows) at three blocks
# per SM, (1, 32, 3, 0, 0, 3) 0.0422 ms, (1, 32, 4, 0, 0, 3) 0.0423-0.0434,
# (1, 32, 3, 0, 0, 4) 0.0504-0.0523 (spills), (1, 64, 2, 0, 0, 3) 0.0521-0.0571,
# (2, 64, 4, 1, 240, 1) 0.0558-0.0565, (1, 64, 3, 0, 0, 3) (two blocks per SM)
# 0.0627-0.0638; relattn_win 0.075; SDPA 0.038.
# RELATTN_SM90_WSWIN=0 leaves them to relattn_win.
WS_WIN_DEFAULT = {64: (1, 64, 3, 0, 0, 3), 80: (1, 32, 3, 0, 0, 3)}
# k_w = 80 at head_dim 64 (SAM-B / SAM-L at 1280 px): key tiles of one 80-key
# row, rel_w in registers (rel 1, the terms computed before). RELATTN_SM90_WS80:
# "0" off, "nc,bn,stages,pp,rg[,mb]" with bn 80 (experiments).
WS_ROW80_DEFAULT = (2, 80, 4, 1, 240, 1)


def ws_row80_ok(hd: int, Sk: int, kh: int, kw: int) -> bool:
    """relattn_ws's 80-key-row tiles serve this problem (terms given)."""
    return (os.environ.get("RELATTN_SM90_WS80", "1") != "0" and hd == 64 and kw == 80 and 1 <= kh
            and kh * kw == Sk)


def ws_window_ok(Sk: int, kh: int, kw: int) -> bool:
    """relattn_ws's 16-slot key rows serve this key grid."""
    return (os.environ.get("RELATTN_SM90_WSWIN", "1") != "0" and 1 <= kw <= 16 and 1 <= kh <= 16
            and kh * kw == Sk)


def choose_ws(hd: int, Sq: int, Sk: int, kh: int, kw: int, has_rel: bool):
    """(nc, bn, rel, stages, pp, rg, mb) of relattn_ws for a problem, or None.
    An explicit RELATTN_SM90_CFG (a relattn_wg configuration) turns it off."""
    env = os.environ.get("RELATTN_SM90_WS")
    if env == "0" or hd not in WS_DEFAULT or (not env and os.environ.get("RELATTN_SM90_CFG")):
        return None
    window = has_rel and kw != 64 and ws_window_ok(Sk, kh, kw)
    row80 = has_rel and not window and ws_row80_ok(hd, Sk, kh, kw)
    spec = os.environ.get("RELATTN_SM90_WS80") if row80 else env   # 80-key rows: their own switch
    if spec and spec != "1":
        nc, bn, st, pp, rg, *mb = (int(x) for x in spec.split(","))
        mb = mb[0] if mb else 1
    else:
        nc, bn, st, pp, rg, mb = WS_ROW80_DEFAULT if row80 else (WS_WIN_DEFAULT if window else WS_DEFAULT)[hd]
    if has_rel and kw != 64 and not window and not row80:
        return None
    if (bn == 80) != row80:   # 80-key tiles are key rows of k_w = 80 only
        return None
    rel = (5 if window else 1) if has_rel else 0
    if ws_smem_bytes(hd, nc, bn, st) > MAX_SMEM - 1024:
        return None
    return nc, bn, rel, st, pp, rg, mb


def ws_smem_bytes(hd: int, nc: int, bn: int, st: int, fused: bool = False, window: bool = False,
                  h72: bool = False) -> int:
    """Q, the K/V stages and 1024 bytes of alignment; with ``fused`` (rel 4)
    the two tables (128 rows each) and a float32 scratch per consumer
    warpgroup: 64 x 136 when that fits, else 64 x 72 (the kernel then
    computes the terms in two passes; the same rule as relattn_ws's NH);
    ``fused`` and ``window`` (rel 6): tables of 32 rows, a 64 x 36 scratch;
    ``h72`` (rel 7: two passes, rel_h in one of 72 rows): a 64 x 80 scratch."""
    n = 64 * nc * hd * 2 + st * 2 * bn * hd * 2 + 1024
    if not fused:
        return n
    if window:
        return n + 2 * 32 * hd * 2 + nc * 64 * 36 * 4
    n += 2 * 128 * hd * 2
    if h72:
        return n + nc * 64 * 80 * 4
    return n + nc * 64 * (136 if ws_table_passes(hd, nc, bn, st) == 1 else 72) * 4


def ws_table_passes(hd: int, nc: int, bn: int, st: int) -> int:
    """Passes of relattn_ws's fused G = Q T^T over 128-row tables (rel 4): one
    when a 64 x 136 float32 scratch per consumer fits beside Q, the stages and
    the tables, else two of 64 rows (relattn_ws's NH)."""
    n = ws_smem_bytes(hd, nc, bn, st) + 2 * 128 * hd * 2
    return 1 if n + nc * 64 * 136 * 4 <= MAX_SMEM - 1024 else 2


def ws_kernel_name(dt: int, hd: int, nc: int, bn: int, rel: int, st: int, pp: int, rg: int, mb: int = 1) -> str:
    return f"relattn_ws<{dt}, {hd}, {nc}, {bn}, {rel}, {st}, {pp}, {rg}, {mb}>"


_TMAP_ENCODE: list = []


def _tmap_encoder():
    """cuTensorMapEncodeTiled from the CUDA driver library (ctypes)."""
    if not _TMAP_ENCODE:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuTensorMapEncodeTiled
        u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        _TMAP_ENCODE.append((fn, ctypes, u32p, u64p))
    return _TMAP_ENCODE[0]


def tensor_map(ptr: int, shape, strides, box_rows: int, box_cols: int = 64, swizzle: bool = True):
    """A CUtensorMap (a one-element numpy array of 128 bytes, passed to the
    kernel by value) for 16-bit data of ``shape`` (B, H, S, D) with element
    ``strides`` (batch, head, row; columns contiguous): dims (D, S, H, B),
    box ``box_cols`` columns x ``box_rows`` rows, 128-byte swizzle (or none),
    out-of-range elements read as zeros. Raises ValueError when the driver
    refuses it."""
    import numpy as np

    fn, ctypes, u32p, u64p = _tmap_encoder()
    B, H, S, D = shape
    sb, sh, ss = strides
    # a dimension of size one may have any stride: give it a valid one
    st = [ss * 2, (sh * 2) if H > 1 else 16, (sb * 2) if B > 1 else 16]
    dims = (ctypes.c_uint64 * 4)(D, S, H, B)
    gstr = (ctypes.c_uint64 * 3)(*st)
    box = (ctypes.c_uint32 * 4)(box_cols, box_rows, 1, 1)
    one = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
    buf = np.zeros(16, dtype=np.uint64)
    # UINT16 data, no interleave, swizzle 128 B / none, 256-byte L2 promotion, zero fill
    rc = fn(buf.ctypes.data, 1, 4, ctypes.c_void_p(ptr), dims, gstr, box, one, 0, 3 if swizzle else 0, 3, 0)
    if rc != 0:
        raise ValueError(f"cuTensorMapEncodeTiled refused shape {shape} strides {strides} (CUresult {rc})")
    return buf.view("V128")


def ws_usable(ptrs, strides, D: int) -> bool:
    """TMA needs 16-byte aligned bases and strides that are multiples of 16
    bytes; the kernel takes head dims up to 80, multiples of 8."""
    if D % 8 or D > 80:
        return False
    return all(p % 16 == 0 for p in ptrs) and all(s % 8 == 0 for st in strides for s in st)


def ws_launch_spec(B: int, H: int, Sq: int, hd: int, dt: int, cfg):
    """(kernel, grid, block, shared bytes, row tiles) of relattn_ws. The kernel
    is persistent: each block loops over the row tiles blockIdx.x, + gridDim.x,
    ...; the grid is one block per SM. RELATTN_WS_PERSIST (developers, tests):
    "0" one block per tile, an integer n >= 2 at most n blocks."""
    nc, bn, rel, st, pp, rg, mb = cfg
    fn = _get_named(ws_kernel_name(dt, hd, nc, bn, rel, st, pp, rg, mb))
    bm = 64 * nc
    ntot = B * H * ((Sq + bm - 1) // bm)
    env = os.environ.get("RELATTN_WS_PERSIST", "1")
    cap = ntot if env == "0" else int(env) if env.isdigit() and int(env) >= 2 else _sm_count() * mb
    grid = max(1, min(ntot, cap))
    return fn, (grid,), (128 * nc + (128 if rg else 32),), ws_smem_bytes(hd, nc, bn, st, rel in (4, 6, 7), rel == 6, rel == 7), ntot


def _sm_count() -> int:
    """Multiprocessors of the current device (relattn_ws runs one block per SM)."""
    import cupy

    dev = cupy.cuda.Device()
    n = _status.get(("sms", dev.id))
    if n is None:
        n = _status[("sms", dev.id)] = int(dev.attributes["MultiProcessorCount"])
    return n
