"""CuPy backend: fused flash-style attention with 2-D decomposed relative terms.

The kernels live in ``cuda/relattn_kernels.cu`` beside this file and are
compiled at run time through ``cupy.RawModule`` (NVRTC), once per
(dtype, padded head_dim, device). float16 / bfloat16 run on tensor cores
(``mma.sync``) with float32 accumulation; float32 and float64 run an exact
SIMT kernel (plain FMA, no TF32). On compute capability 9.0, head_dim 64 with
k_w == 64 (or no tables) runs the ``wgmma`` kernel of ``cuda/relattn_sm90.cu``
instead (see ``_sm90.py``). The S x S bias is never materialized: the kernels
add ``rel_h[i, ky] + rel_w[i, kx]`` per key tile; ``rel_terms`` /
``rel_terms_from_tables`` compute those terms on the GPU.

Importing this module does not import CuPy.
"""

from __future__ import annotations

import os
import threading

from relattn._arrays import dtype_name

NAME = "cupy"
ARRAY_MODULE = "cupy"

_KERNEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda", "relattn_kernels.cu")
_MAX_HEAD_DIM = 128
_HALF_NAMES = ("float16", "bfloat16")
# query rows per warp = 16 * MW; MW = 2 halves the shared-memory traffic per
# mma but needs ~255 registers (spills beyond head_dim 64).
_MW_ENV = os.environ.get("RELATTN_CUPY_MW")


def _choose_mw(hd: int, rel: int) -> int:
    # measured (H200, bf16): SAM-B global (hd 64, rel_w in registers) MW=1
    # 0.27 ms vs MW=2 0.30; windowed (generic rel) and hd 80 faster with MW=2.
    if _MW_ENV in ("1", "2"):
        return int(_MW_ENV)
    if hd > 80 or (rel == 1 and hd <= 64):
        return 1
    return 2
_LOG2E = 1.4426950408889634
_RELTERMS_MMA = os.environ.get("RELATTN_RELTERMS_MMA", "1") != "0"

_lock = threading.Lock()
_modules: dict = {}        # (kind, hd, device) -> RawModule
_functions: dict = {}      # (kind, hd, rel, device) -> RawKernel
_source: list = []


# --------------------------------------------------------------------- probing
_avail: list = []


def unavailable_reason():
    """None when CuPy and a CUDA device are usable, else a one-line reason
    (probed once per process: it is asked on every call)."""
    if not _avail:
        _avail.append(_probe())
    return _avail[0]


def _probe():
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"cupy is not importable ({type(exc).__name__}: {exc})".splitlines()[0]
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return "no CUDA device is visible"
    except Exception as exc:
        return f"no usable CUDA device ({type(exc).__name__}: {exc})".splitlines()[0]
    for name in ("relattn_common.cuh", "relattn_kernels.cu"):
        path = os.path.join(os.path.dirname(_KERNEL_FILE), name)
        if not os.path.isfile(path):
            return f"kernel source missing: {path}"
    return None


def _dtype_name(a) -> str:
    try:
        return dtype_name(a.dtype)   # cached: numpy's dtype.name is slow Python
    except Exception:
        return str(getattr(a, "dtype", "?"))


def not_supported_reasons(q, k, v, rel_h, rel_w, k_size):
    """Reasons this backend cannot take these inputs (empty list: it can)."""
    reasons = []
    try:
        import cupy
    except Exception:
        return ["cupy is not installed"]
    for name, a in (("q", q), ("k", k), ("v", v), ("rel_h", rel_h), ("rel_w", rel_w)):
        if a is not None and not isinstance(a, cupy.ndarray):
            reasons.append(f"{name} is not a cupy.ndarray (got {type(a).__name__})")
    if reasons:
        return reasons
    dt = _dtype_name(q)
    if dt not in ("float16", "bfloat16", "float32", "float64"):
        reasons.append(f"dtype {dt} is not supported (float16, bfloat16, float32, float64)")
    d = int(q.shape[-1])
    if d > _MAX_HEAD_DIM:
        reasons.append(f"head_dim {d} > {_MAX_HEAD_DIM} is not supported by the cupy kernels")
    elif dt == "float64" and _pad16(d) > 112:
        reasons.append(f"float64 with head_dim {d} > 112 does not fit the kernel's shared memory")
    try:
        dev = q.device.id
        for name, a in (("k", k), ("v", v), ("rel_h", rel_h), ("rel_w", rel_w)):
            if a is not None and a.device.id != dev:
                reasons.append(f"{name} is on device {a.device.id}, q on device {dev}")
    except Exception:
        pass
    sk = int(k.shape[2])
    if sk >= (1 << 22):
        reasons.append(f"{sk} keys exceed the kernels' limit of 2**22")
    return reasons


# ------------------------------------------------------------------- compiling
def _pad16(d: int) -> int:
    return max(16, (d + 15) // 16 * 16)


def _read_source() -> str:
    """The CUDA source handed to NVRTC: the shared prelude, then the kernels."""
    if not _source:
        _source.append(read_cuda("relattn_common.cuh") + "\n" + read_cuda("relattn_kernels.cu"))
    return _source[0]


def read_cuda(name: str) -> str:
    """Text of a file of relattn/backends/cuda."""
    with open(os.path.join(os.path.dirname(_KERNEL_FILE), name), "r", encoding="utf-8") as fh:
        return fh.read()


def _names(kind: str, hd: int):
    if kind == "relterms":
        return {(dt, bn): f"relattn_relterms<{dt}, {bn}>" for dt in (0, 1, 2) for bn in (16, 32, 64)}
    if kind == "relterms_mma":
        return {(dt, tt): f"relattn_relterms_mma<{dt}, {hd}, {tt}>" for dt in (0, 1) for tt in (0, 1, 2)}
    if kind in _HALF_NAMES:
        dt = 1 if kind == "bfloat16" else 0
        return {(rel, mw): f"relattn_mma<{dt}, {hd}, {mw}, {rel}>" for rel in (0, 1, 2) for mw in (1, 2)}
    if kind == "tf32":
        return {(split, rel, safe, sh): f"relattn_tf32<{hd}, {split}, {rel}, {safe}, {sh}>"
                for split in (1, 3) for rel in (0, 1, 2) for safe in ((0, 1) if split == 3 else (0,))
                for sh in ((0, 1) if split == 3 and not safe and hd <= _TF32_SH_MAX_HD else (0,))}
    if kind == "win":
        return {(dt, kwp, fuse): f"relattn_win<{dt}, {hd}, {kwp}, {fuse}>"
                for dt in (0, 1) for kwp in (16, 32) for fuse in ((0, 1) if kwp == 16 else (0,))}
    t = "float" if kind == "float32" else "double"
    return {rel: f"relattn_simt<{t}, {hd}, {rel}>" for rel in (0, 2)}


def _get_kernel(kind: str, hd: int, rel, smem: int):
    import cupy

    dev = cupy.cuda.Device().id
    key = (kind, hd, rel, dev)
    fn = _functions.get(key)
    if fn is None:
        with _lock:
            fn = _functions.get(key)
            if fn is None:
                mkey = (kind, hd, dev)
                names = _names(kind, hd)
                mod = _modules.get(mkey)
                if mod is None:
                    mod = _modules[mkey] = cupy.RawModule(
                        code=_read_source(),
                        options=("-std=c++17", "--use_fast_math"),
                        name_expressions=list(names.values()),
                    )
                fn = _functions[key] = mod.get_function(names[rel])
    _ensure_smem(fn, smem)
    return fn


def _ensure_smem(fn, smem):
    """Raise a kernel's dynamic shared-memory limit to smem bytes (kernels whose
    size varies with the problem get the largest one asked for)."""
    if smem > 48 * 1024 and _smem_limit.get(id(fn), 0) < smem:
        with _lock:
            if _smem_limit.get(id(fn), 0) < smem:
                fn.max_dynamic_shared_size_bytes = smem
                _smem_limit[id(fn)] = smem


_smem_limit: dict = {}


# -------------------------------------------------------------------- helpers
# A "plan" is what one call decides from the signature of its arrays (shape,
# strides, dtype, 16-byte alignment, device): kernel, grid, shared memory and
# every scalar argument. ``run`` functions only allocate and launch; the
# dispatch in relattn.functional caches them per signature, so a repeated call
# costs a dictionary look-up and the launches.
def _same(x):
    return x


def _u16(x):
    import cupy

    return x.view(cupy.uint16)


def _u16_copy(x):
    import cupy

    return x.view(cupy.uint16).copy()


def _copy(x):
    return x.copy()  # C order, a fresh (aligned) allocation


def _contiguous(x):
    import cupy

    return cupy.ascontiguousarray(x)


def _padded(x, width):
    """x with its last axis zero-padded to ``width``."""
    import cupy

    p = cupy.zeros(x.shape[:-1] + (width,), dtype=x.dtype)
    p[..., : x.shape[-1]] = x
    return p


def _operand_prep(x, width, align):
    """How the tensor-core kernels get x: ``(prep, strides)``, where prep(x) is
    a view or copy with last stride 1, the first three strides multiples of
    ``align`` elements, a 16-byte aligned base and the last axis ``width`` long
    (zero-padded), and strides are prep(x)'s element strides (axes 0-2). 16-bit
    dtypes are read as uint16."""
    half = x.dtype.itemsize == 2
    d = int(x.shape[-1])
    B, H, S = (int(n) for n in x.shape[:3])
    dense = [H * S * width, S * width, width]
    if d != width:
        prep = (lambda a: _padded(_u16(a), width)) if half else (lambda a: _padded(a, width))
        return prep, dense
    st = _elem_strides(x)[:3]
    ok = (x.strides[-1] == x.dtype.itemsize or d == 1) and all(s % align == 0 for s in st) \
        and x.data.ptr % 16 == 0
    if ok:
        return (_u16 if half else _same), st
    return (_u16_copy if half else _copy), dense


def _dense_prep(x, dtype=None):
    """prep(a) -> a as a C-contiguous array of ``dtype`` (x's own when None),
    decided from x: a no-op when x is one."""
    import cupy
    import numpy as np

    dtype = x.dtype if dtype is None else np.dtype(dtype)
    if x.dtype == dtype:
        return _same if x.flags.c_contiguous else _contiguous
    if _dtype_name(x) == "bfloat16" and dtype == np.float32:
        return _bf16_to_f32
    return lambda a: cupy.ascontiguousarray(a, dtype=dtype)


def _table_prep(x):
    """prep(a) -> a 16-bit table as a C-contiguous uint16 view with a 16-byte
    aligned base (the fused kernels copy its rows with 16-byte cp.async),
    decided from x: a copy when x is not one already."""
    if x.flags.c_contiguous and x.data.ptr % 16 == 0:
        return _u16
    return lambda a: _u16(a.copy())


def _bf16_to_f32(t):
    import cupy

    return (cupy.ascontiguousarray(t).view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32)


def _elem_strides(x):
    isz = x.dtype.itemsize
    return [s // isz for s in x.strides]


def _i64(x):
    import numpy as np

    return np.int64(x)


def _ints(*values):
    """Scalar kernel arguments: int32 sizes."""
    import numpy as np

    return tuple(np.int32(x) for x in values)


def _sm90_config(hd, Sq, Sk, kh, kw, has_rel, ws=False):
    """(nwg, bn, rel, stages) of the Hopper wgmma kernel for this problem (with
    ``ws``: (nc, bn, rel, stages, pp, rg) of the warp-specialised one), or None
    (another GPU, RELATTN_SM90=0, or shared memory too small for the terms)."""
    from relattn.backends import _sm90

    if _sm90.unavailable_reason() is not None:
        return None
    return (_sm90.choose_ws if ws else _sm90.choose)(hd, Sq, Sk, kh, kw, has_rel)


def _ws_plan(cfg, q, Sk, qp, kp, vp, kh, kw, sc, dt, rel_args):
    """The run function of relattn_ws (TMA loads: tensor maps built per call
    from the operands' addresses), or None when it cannot serve these arrays.
    ``rel_args(x, y)`` gives the kernel's nine arguments between the tensor
    maps and ``out`` from the run function's last two arguments (rel_h / rel_w,
    or with rel 4 the two tables)."""
    import cupy

    from relattn.backends import _sm90

    B, H, Sq, D = (int(s) for s in q.shape)
    nc, bn = cfg[:2]
    (pq, qs), (pk, ks), (pv, vs) = qp, kp, vp
    d8 = (D + 7) // 8 * 8
    hd = _pad16(d8)
    if not _sm90.ws_usable((16,), (qs, ks, vs), d8):
        return None
    try:
        fn, grid, block, smem, ntot = _sm90.ws_launch_spec(B, H, Sq, hd, dt, cfg)
        _sm90.tensor_map(int(q.data.ptr) // 16 * 16, (B, H, Sq, d8), qs, 64 * nc)  # the driver takes these shapes
    except (_sm90.BuildError, ValueError, OSError, AttributeError) as exc:
        import warnings

        warnings.warn(f"relattn: {exc}; using the wgmma kernel", RuntimeWarning, stacklevel=4)
        return None
    tail = _ints(H, Sq, Sk, d8, kh, kw)
    ntot = _ints(ntot)[0]
    shape, dtype, u16 = (B, H, Sq, D), q.dtype, cupy.uint16
    padded = (B, H, Sq, d8) if d8 != D else None
    tmap = _sm90.tensor_map
    # A tensor map depends on the operand's address only (shape, strides and
    # box are the plan's): the last few per operand are kept, since repeated
    # calls often get the same memory-pool blocks back.
    # head_dim 80: a second map per operand for columns 64-79 (8-column boxes)
    maps = ({}, {}, {})
    kv_rows = kw if cfg[2] in (5, 6) else bn   # 16-slot key rows: one box per key row
    specs = (((B, H, Sq, d8), qs, 64 * nc), ((B, H, Sk, d8), ks, kv_rows), ((B, H, Sk, d8), vs, kv_rows))

    def tensor_maps(i, ptr):
        m = maps[i].get(ptr)
        if m is None:
            if len(maps[i]) >= 8:
                maps[i].clear()
            m = maps[i][ptr] = (tmap(ptr, *specs[i]), tmap(ptr, *specs[i], box_cols=8, swizzle=False)) \
                if hd == 80 else (tmap(ptr, *specs[i]),) * 2
        return m

    def run(q, k, v, x, y):
        a, b, c = pq(q), pk(k), pv(v)
        out = cupy.empty(shape, dtype=dtype)
        ou = out.view(u16) if padded is None else cupy.empty(padded, dtype=u16)
        (qa, qb), (ka, kb), (va, vb) = tensor_maps(0, a.data.ptr), tensor_maps(1, b.data.ptr), tensor_maps(2, c.data.ptr)
        args = (qa, ka, va, qb, kb, vb, *rel_args(x, y), ou, *tail, sc, ntot)
        fn(grid, block, args, shared_mem=smem)
        if padded is not None:
            out.view(u16)[...] = ou[..., :D]
        return out

    return run


def fused_plan(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale):
    """``run(q, k, v, rel_pos_h, rel_pos_w) -> out`` with the relative terms
    computed inside the attention kernel, or None when this problem is not one
    such a kernel serves. Both need float16 / bfloat16 q with tables of the same
    dtype and head_dim a multiple of 8, and compute q . t in float32 on the
    tensor cores (the arithmetic of the separate terms kernel on 16-bit tables):
    for small grids (q and key grids at most 16 x 16: SAM's 14 x 14 windows)
    relattn_ws in 16-slot key rows (rel 6; Hopper, head_dim 64 / 80;
    ``RELATTN_SM90_WSWIN=0`` or ``RELATTN_SM90_FUSE=0`` turn it off), else
    relattn_win (FUSE 1, key grid within its limits; ``RELATTN_WIN_FUSE=0``
    turns it off); relattn_ws (rel 4, or rel 7 with rel_h in one pass) for
    SAM's global grids (head_dim 57..64 or 72..80, k_w == 64, k_h <= 64,
    tables of at most 128 rows after SAM's resize; ``RELATTN_SM90_FUSE=0``
    turns it off). Off, the terms kernel runs first."""
    import cupy
    import numpy as np

    from relattn.relpos import _device_index32, resize_rel_pos

    kind = _dtype_name(q)
    (qh, qw), (kh, kw) = (int(n) for n in q_size), (int(n) for n in k_size)
    B, H, Sq, D = (int(s) for s in q.shape)
    Sk = int(k.shape[2])
    hd = _pad16(D)
    if (kind not in _HALF_NAMES or _dtype_name(rel_pos_h) != kind or _dtype_name(rel_pos_w) != kind
            or D % 8 or B * H * Sq == 0 or Sk == 0):
        return None
    Lh, Lw = 2 * max(qh, kh) - 1, 2 * max(qw, kw) - 1
    from relattn.backends import _sm90

    cfg = wscfg = None
    if (os.environ.get("RELATTN_SM90_FUSE", "1") != "0" and hd in (64, 80) and kw <= 16 and Lh <= 32
            and Lw <= 32):   # relattn_ws in 16-slot key rows, ahead of relattn_win
        c = _sm90_config(hd, Sq, Sk, kh, kw, True, ws=True)
        if (c is not None and c[2] == 5
                and _sm90.ws_smem_bytes(hd, c[0], c[1], c[3], True, True) <= _sm90.MAX_SMEM - 1024):
            wscfg = c[:2] + (6,) + c[3:]
    win = _win_fused_config(hd, Sq, kh, kw, Lh, Lw)
    if win is None and wscfg is None:
        if (os.environ.get("RELATTN_SM90_FUSE", "1") == "0" or hd not in (64, 80) or kw != 64 or kh > 64
                or Lh > 128 or Lw > 128):
            return None
        cfg = _sm90_config(hd, Sq, Sk, kh, kw, True, ws=True)
        if cfg is None:
            return None
        cfg = cfg[:2] + (4,) + cfg[3:]
        if _sm90.ws_smem_bytes(hd, cfg[0], cfg[1], cfg[3], True) > _sm90.MAX_SMEM - 1024:
            return None
        if _rel_h_one_pass(hd, cfg, qh, kh, qw, Sq):
            cfg = cfg[:2] + (7,) + cfg[3:]
    resize = (Lh if rel_pos_h.shape[0] != Lh else None, Lw if rel_pos_w.shape[0] != Lw else None)
    ex_h = rel_pos_h if resize[0] is None else cupy.empty((Lh, D), dtype=rel_pos_h.dtype)
    ex_w = rel_pos_w if resize[1] is None else cupy.empty((Lw, D), dtype=rel_pos_w.dtype)
    ph, pw = _table_prep(ex_h), _table_prep(ex_w)
    idx_h, idx_w = _device_index32(cupy, qh, kh), _device_index32(cupy, qw, kw)
    dummy = cupy.zeros((1,), dtype=cupy.float32)
    dt = 1 if kind == "bfloat16" else 0
    lens = _ints(Lh, Lw, qw)
    sc = np.float32(float(scale) * _LOG2E)

    def tables(th, tw):
        if resize[0] is not None:
            th = resize_rel_pos(th, Lh)
        if resize[1] is not None:
            tw = resize_rel_pos(tw, Lw)
        return (dummy, dummy, ph(th), pw(tw), idx_h, idx_w)

    qp, kp, vp = (_operand_prep(x, D, 8) for x in (q, k, v))
    if wscfg is not None:
        run = _ws_plan(wscfg, q, Sk, qp, kp, vp, kh, kw, sc, dt, lambda th, tw: tables(th, tw) + lens)
        if run is not None or win is None:
            return run
    if cfg is not None:
        return _ws_plan(cfg, q, Sk, qp, kp, vp, kh, kw, sc, dt, lambda th, tw: tables(th, tw) + lens)
    spb, smem = win
    groups = -(-((Sq + 15) // 16) // spb)
    fn = _get_kernel("win", hd, (dt, 16, 1), smem)
    (pq, qs), (pk, ks), (pv, vs) = qp, kp, vp
    grid, tail = (B * H * groups,), _core_tail(H, Sq, Sk, D, kh, kw, (*qs, *ks, *vs)) + (sc, *_ints(groups, spb), *lens)
    shape, dtype, u16 = (B, H, Sq, D), q.dtype, cupy.uint16

    def run(q, k, v, th, tw):
        out = cupy.empty(shape, dtype=dtype)
        fn(grid, (128,), (pq(q), pk(k), pv(v), *tables(th, tw), out.view(u16)) + tail, shared_mem=smem)
        return out

    return run


def _rel_h_one_pass(hd, cfg, qh, kh, qw, Sq) -> bool:
    """relattn_ws rel 7: where the fused terms take two passes over 64 table
    rows (shared memory too short for one of 128: SAM-H's head_dim 80), rel_h
    in one pass of 72 rows instead, when every 64-row warpgroup's rel_h rows
    lie within 72 rows from the kernel's base (the index of its first row's
    last key row, rounded down to 8) inside the 128 rows held.
    ``RELATTN_WS_H72=0`` turns it off."""
    import numpy as np

    from relattn.backends import _sm90
    from relattn.relpos import _relative_index

    nc, bn, _, st = cfg[:4]
    if (os.environ.get("RELATTN_WS_H72", "1") == "0" or _sm90.ws_table_passes(hd, nc, bn, st) != 2
            or _sm90.ws_smem_bytes(hd, nc, bn, st, True, False, True) > _sm90.MAX_SMEM - 1024):
        return False
    idx = _relative_index(qh, kh)
    bm = 64 * nc   # every warpgroup of every row tile, rows past the end read as the last (as the kernel does)
    for r0 in range(0, -(-Sq // bm) * bm, 64):
        qys = np.minimum(np.arange(r0, r0 + 64), Sq - 1) // qw
        rows = idx[qys[0]:qys[-1] + 1]
        base = int(idx[qys[0], kh - 1]) & ~7
        if int(rows.min()) < base or int(rows.max()) - base >= 72 or base + 72 > 128:
            return False
    return True


def _win_fused_config(hd, Sq, kh, kw, Lh, Lw):
    """(slices per block, shared bytes) of relattn_win with the terms fused
    (FUSE 1), or None: 16-slot key rows and tables of at most 32 rows (q and
    key grids at most 16 x 16); shared memory = K / V + the two tables (32
    rows each) + a 4 x 16 x 32 float32 scratch + 512 bytes of index tables."""
    if os.environ.get("RELATTN_WIN_FUSE", "1") == "0" or Lh > 32 or Lw > 32:
        return None
    win = _win_config(hd, Sq, kh, kw)
    if win is None or win[0] != 16:
        return None
    return win[1], win[2] + 2 * 32 * (hd + 8) * 2 + 4 * 16 * 32 * 4 + 512


def _win_config(hd, Sq, kh, kw):
    """(kwp, slices per block, shared bytes) of the small-grid kernel
    relattn_win, or None: key rows of k_w <= 32 padded to kwp = 16 / 32 slots,
    the whole key grid (k_h * kwp <= 256 slots) resident in shared memory
    (dense rows; a padding slot reads the next key row's key from K, masked,
    and a zero row from V).
    ``RELATTN_WIN=0`` turns it off; ``RELATTN_WIN_SPB`` sets the 16-query
    slices per block (default: all of them, at most 16)."""
    if os.environ.get("RELATTN_WIN", "1") == "0" or kw > 32:
        return None
    kwp = 16 if kw <= 16 else 32
    if kh * kwp > 256:
        return None
    smem = (2 * kh * kw + kwp - kw + 1) * (hd + 8) * 2   # K (kwp - k_w zero rows after), V (one)
    nsl = (Sq + 15) // 16
    env = os.environ.get("RELATTN_WIN_SPB")
    spb = int(env) if env else min(nsl, 16)
    return kwp, max(1, spb), smem


# The environment variables read while planning (developer switches): part of
# the plan cache key, so changing one takes effect on the next call.
_KNOBS = ("RELATTN_WIN", "RELATTN_WIN_SPB", "RELATTN_WIN_FUSE", "RELATTN_SM90", "RELATTN_SM90_CFG",
          "RELATTN_SM90_WS", "RELATTN_SM90_FUSE", "RELATTN_WS_PERSIST", "RELATTN_TF32_SH", "RELATTN_SM90_WSWIN",
          "RELATTN_WS_H72", "RELATTN_SM90_WS80", "RELATTN_SM90_TF32")


def plan_key():
    """What besides the arrays' signature a plan depends on: the current device,
    the float32 mode and the developer switches."""
    import cupy

    from relattn.precision import get_gpu_float32_mode

    env = os.environ
    return (cupy.cuda.runtime.getDevice(), get_gpu_float32_mode(), *(env.get(n) for n in _KNOBS))


# ------------------------------------------------------------------ attention
def attention(q, k, v, rel_h, rel_w, k_size, scale):
    """Attention core on the GPU; see relattn.backends for the contract."""
    return core_plan(q, k, v, rel_h, rel_w, k_size, scale)(q, k, v, rel_h, rel_w)


def core_plan(q, k, v, rel_h, rel_w, k_size, scale):
    """``run(q, k, v, rel_h, rel_w) -> out``, valid for every call whose arrays
    have the signature of these (shape, strides, dtype, 16-byte alignment,
    device), with this k_size, scale and :func:`plan_key`."""
    import cupy
    import numpy as np

    B, H, Sq, D = (int(s) for s in q.shape)
    Sk = int(k.shape[2])
    kind = _dtype_name(q)
    shape, dtype = (B, H, Sq, D), q.dtype
    if B * H * Sq * D == 0:
        return lambda *_: cupy.empty(shape, dtype=dtype)
    if Sk == 0:  # softmax over no keys is undefined
        bits = cupy.uint16 if dtype.itemsize == 2 else dtype
        nan = 0x7E00 if kind == "float16" else (0x7FC0 if kind == "bfloat16" else np.nan)

        def run_nan(*_):
            out = cupy.empty(shape, dtype=dtype)
            out.view(bits).fill(nan)
            return out

        return run_nan
    kh, kw = (int(s) for s in k_size) if k_size is not None else (1, Sk)
    has_rel = rel_h is not None and rel_w is not None
    if not has_rel:
        kh, kw = 1, max(Sk, 1)
    if kind in _HALF_NAMES:
        return _half_plan(q, k, v, rel_h, rel_w, kh, kw, has_rel, scale)
    if kind == "float32":
        from relattn.precision import get_gpu_float32_mode

        mode = get_gpu_float32_mode()
        if mode != "fma" and _tf32_ok():
            run = _tf32_plan(q, k, v, rel_h, rel_w, kh, kw, has_rel, scale, 3 if mode == "3xtf32" else 1)
            if run is not None:
                return run
    return _simt_plan(q, k, v, rel_h, rel_w, kh, kw, has_rel, scale)


def _rel_preps(rel_h, rel_w, has_rel, dtype_name):
    """(prep_h, prep_w, dummy): how the terms reach the kernel, and the
    one-element array passed in their place without terms."""
    import cupy

    if has_rel:
        return _dense_prep(rel_h, dtype_name), _dense_prep(rel_w, dtype_name), None
    return None, None, cupy.zeros((1,), dtype=dtype_name)


def _core_tail(H, Sq, Sk, D, kh, kw, strides):
    """The scalar arguments every attention kernel takes after its pointers."""
    return _ints(H, Sq, Sk, D, kh, kw) + tuple(_i64(s) for s in strides)


def _half_plan(q, k, v, rel_h, rel_w, kh, kw, has_rel, scale):
    """float16 / bfloat16: the small-grid, wgmma or mma.sync kernel."""
    import cupy
    import numpy as np

    B, H, Sq, D = (int(s) for s in q.shape)
    Sk = int(k.shape[2])
    kind = _dtype_name(q)
    dt = 1 if kind == "bfloat16" else 0
    d8 = (D + 7) // 8 * 8
    hd = _pad16(d8)
    BH = B * H
    (pq, qs), (pk, ks), (pv, vs) = (_operand_prep(x, d8, 8) for x in (q, k, v))
    ph, pw, dummy = _rel_preps(rel_h, rel_w, has_rel, "float32")
    rel = (1 if (kw == 64 and Sk % 64 == 0) else 2) if has_rel else 0
    head = _core_tail(H, Sq, Sk, d8, kh, kw, (*qs, *ks, *vs))
    sc = np.float32(float(scale) * _LOG2E)
    spec, mid = None, ()
    ws = _sm90_config(hd, Sq, Sk, kh, kw, has_rel, ws=True)
    win = _win_config(hd, Sq, kh, kw) if has_rel else None
    # relattn_ws: k_w == 64 or no terms; small key grids in 16-slot key rows
    # (rel 5) ahead of relattn_win, which serves them otherwise (RELATTN_SM90_WSWIN=0)
    if ws is not None and (win is None or ws[2] == 5):
        def rel_args(rel_h, rel_w, zero=np.int32(0)):
            rh, rw = (ph(rel_h), pw(rel_w)) if dummy is None else (dummy, dummy)
            return rh, rw, rh, rw, rh, rw, zero, zero, zero   # rel 0 / 1 / 5: no tables

        run = _ws_plan(ws, q, Sk, (pq, qs), (pk, ks), (pv, vs), kh, kw, sc, dt, rel_args)
        if run is not None:
            return run
    if win is not None:
        kwp, spb, smem = win
        groups = -(-((Sq + 15) // 16) // spb)
        spec = (_get_kernel("win", hd, (dt, kwp, 0), smem), (BH * groups,), (128,),
                head + (sc, *_ints(groups, spb, 0, 0, 1)), smem)
        mid = (cupy.zeros((8,), dtype=cupy.uint16),) * 2 + (cupy.zeros((1,), dtype=cupy.int32),) * 2  # no tables
    cfg = None if win is not None else _sm90_config(hd, Sq, Sk, kh, kw, has_rel)
    if cfg is not None:
        from relattn.backends import _sm90

        try:
            fn, grid, block, extra, smem = _sm90.launch_spec(B, H, Sq, kh, kw, hd, dt, cfg)
        except _sm90.BuildError as exc:
            import warnings

            warnings.warn(f"relattn: {exc}; using the portable mma.sync kernel", RuntimeWarning, stacklevel=3)
        else:
            spec = (fn, grid, block, head + (sc, np.float32(1.0 / kw)) + extra, smem)
    if spec is None:
        mw = _choose_mw(hd, rel)
        smem = 2 * 2 * 64 * (hd + 8) * 2
        if rel == 1 and mw == 2:
            smem += 64 * mw * 72 * 4
        bm = 64 * mw
        spec = (_get_kernel(kind, hd, (rel, mw), smem), (BH * ((Sq + bm - 1) // bm),), (128,),
                head + (sc, np.float32(1.0 / kw)), smem)
    fn, grid, block, tail, smem = spec
    shape, dtype, u16 = (B, H, Sq, D), q.dtype, cupy.uint16
    padded = (B, H, Sq, d8) if d8 != D else None

    def run(q, k, v, rel_h, rel_w):
        out = cupy.empty(shape, dtype=dtype)
        ou = out.view(u16) if padded is None else cupy.empty(padded, dtype=u16)
        rh, rw = (ph(rel_h), pw(rel_w)) if dummy is None else (dummy, dummy)
        fn(grid, block, (pq(q), pk(k), pv(v), rh, rw, *mid, ou) + tail, shared_mem=smem)
        if padded is not None:
            out.view(u16)[...] = ou[..., :D]
        return out

    return run


def _simt_plan(q, k, v, rel_h, rel_w, kh, kw, has_rel, scale):
    """float32 (FMA mode) / float64: the exact SIMT kernel, strided loads."""
    import cupy
    import numpy as np

    B, H, Sq, D = (int(s) for s in q.shape)
    Sk = int(k.shape[2])
    kind = _dtype_name(q)
    hd = _pad16(D)
    ph, pw, dummy = _rel_preps(rel_h, rel_w, has_rel, kind)
    rel = 2 if has_rel else 0
    isz = q.dtype.itemsize
    ldt = 64 + 4
    smem = (2 * hd * ldt + 64 * hd + 64 * ldt) * isz
    fn = _get_kernel(kind, hd, rel, smem)
    st = [s for x in (q, k, v) for s in _elem_strides(x)]
    sc = float(scale) * _LOG2E
    tail = _core_tail(H, Sq, Sk, D, kh, kw, st) + (
        np.float32(sc) if kind == "float32" else np.float64(sc), np.float32(1.0 / kw))
    grid = (B * H * ((Sq + 63) // 64),)
    shape, dtype = (B, H, Sq, D), q.dtype

    def run(q, k, v, rel_h, rel_w):
        out = cupy.empty(shape, dtype=dtype)
        rh, rw = (ph(rel_h), pw(rel_w)) if dummy is None else (dummy, dummy)
        fn(grid, (256,), (q, k, v, rh, rw, out) + tail, shared_mem=smem)
        return out

    return run


def _tf32_ok():
    """TF32 tensor cores (mma.sync m16n8k8 .tf32) need compute capability 8.0."""
    import cupy

    dev = cupy.cuda.Device()
    ok = _TF32_OK.get(dev.id)
    if ok is None:
        ok = _TF32_OK[dev.id] = int(dev.compute_capability) >= 80
    return ok


_TF32_OK: dict = {}
_SMEM_OPTIN: dict = {}


def _smem_optin() -> int:
    """The current device's largest dynamic shared memory per block (opt-in),
    bytes: 227 KB on Hopper, 163 KB on A100, 99 KB on sm_86 / sm_89."""
    import cupy

    dev = cupy.cuda.Device()
    n = _SMEM_OPTIN.get(dev.id)
    if n is None:
        try:
            n = int(dev.attributes["MaxSharedMemoryPerBlockOptin"])
        except Exception:   # an attribute table without it: the documented limits
            cc = int(dev.compute_capability)
            n = 227 * 1024 if cc >= 90 else 163 * 1024 if cc in (80, 87) else 99 * 1024
        _SMEM_OPTIN[dev.id] = n
    return n


# relattn_tf32's SH variant (8 warps, K / V split once per block into shared
# memory) up to this padded head_dim (its shared memory: 208 KB at 96)
_TF32_SH_MAX_HD = 96


def _tf32_shared_split(hd: int, nb_sh: int, nb0: int) -> bool:
    """Whether the 3xTF32 call runs relattn_tf32's SH variant. RELATTN_TF32_SH:
    "0" never, "1" wherever it compiles; unset: head_dim 48..96 when its grid
    (nb_sh blocks of 128 rows, one per SM) fills the device or the older
    layout's (nb0 blocks of 64 rows) would take more than one wave. Measured
    on the H100 (core, 3xTF32): SAM-B global 1.088 -> 1.003-1.014 ms, SAM-H
    1.78 -> 1.64, head_dim 48 1.113 -> 1.080, 96 with 56 x 56 queries on 14 x 14
    keys 0.072 -> 0.053; slower with few blocks (head_dim 96, 8 heads of 32 x
    32: 0.147 -> 0.244, 64 blocks on 132 SMs) and at head_dim 32 (0.761 -> 0.896)."""
    env = os.environ.get("RELATTN_TF32_SH")
    if env == "0" or hd > _TF32_SH_MAX_HD or tf32_smem_bytes(hd, 1) > _smem_optin():
        return False
    if env == "1":
        return True
    if hd < 48:
        return False
    from relattn.backends import _sm90

    n_sm = _sm90._sm_count()
    per_sm0 = max(1, min(2, _smem_optin() // tf32_smem_bytes(hd, 0)))   # 2 at most: registers
    return nb_sh >= n_sm or nb0 > n_sm * per_sm0


def _wgt_kernel(hd, Sk, kh, kw, has_rel):
    """(function, shared bytes) of the Hopper 3xTF32 kernel relattn_wgt where
    it serves the problem and builds here, else None (relattn_tf32 runs)."""
    from relattn.backends import _sm90

    if _sm90.unavailable_reason() is not None:
        return None
    cfg = _sm90.wgt_choose(hd, Sk, kh, kw, has_rel)
    if cfg is None:
        return None
    try:
        return _sm90.wgt_kernel(cfg)
    except _sm90.BuildError:
        return None


def tf32_smem_bytes(hd: int, sh: int) -> int:
    """Shared memory of relattn_tf32: Q and two raw K/V stages (rows padded as
    in the kernel), or with ``sh`` 128 Q rows, one raw stage and the split
    stage (uint4 rows of hd / 2 + 4 per key, hd + 2 per key pair)."""
    raw = 64 * (hd + 8) + 64 * (hd + 4)
    if not sh:
        return (64 * (hd + 8) + 2 * raw) * 4
    return (128 * (hd + 8) + raw) * 4 + (64 * (hd // 2 + 4) + 32 * (hd + 2)) * 16


def _tf32_plan(q, k, v, rel_h, rel_w, kh, kw, has_rel, scale, split):
    """float32 on tensor cores: 3xTF32 (split == 3) or plain TF32 (split == 1);
    3xTF32 on Hopper's wgmma (relattn_wgt) where it serves the problem
    (_sm90.wgt_choose), else in relattn_tf32's SH variant where that pays
    (_tf32_shared_split). Either way relattn_tf32's IEEE-safe pass follows.
    None where even the 64-row layout needs more shared memory than the device
    gives a block (head_dim 112-128 before Hopper): the FMA kernel runs."""
    import cupy
    import numpy as np

    B, H, Sq, D = (int(s) for s in q.shape)
    Sk = int(k.shape[2])
    d4 = (D + 3) // 4 * 4
    hd = _pad16(d4)
    (pq, qs), (pk, ks), (pv, vs) = (_operand_prep(x, d4, 4) for x in (q, k, v))
    ph, pw, dummy = _rel_preps(rel_h, rel_w, has_rel, "float32")
    rel = (1 if kw == 64 else 2) if has_rel else 0
    smem = tf32_smem_bytes(hd, 0)
    if smem > _smem_optin():
        return None
    nblocks = B * H * ((Sq + 63) // 64)
    nb_sh = B * H * ((Sq + 127) // 128)
    wgt = _wgt_kernel(hd, Sk, kh, kw, has_rel) if split == 3 else None
    sh = int(split == 3 and wgt is None and _tf32_shared_split(hd, nb_sh, nblocks))
    # 3xTF32: a second, IEEE-safe pass over the blocks the first one flagged
    # (non-finite inputs; see relattn_tf32; flags per 64 rows either way); the
    # flags need no clearing
    sm1 = tf32_smem_bytes(hd, sh)
    if wgt is not None:   # Hopper: relattn_wgt (wgmma) for the fast pass
        launches = [(wgt[0], nblocks, 128, wgt[1])]
    else:
        launches = [(_get_kernel("tf32", hd, (split, rel, 0, sh), sm1), nb_sh if sh else nblocks, 256 if sh else 128, sm1)]
    if split == 3:
        launches.append((_get_kernel("tf32", hd, (split, rel, 1, 0), smem), nblocks, 128, smem))
    tail = _core_tail(H, Sq, Sk, d4, kh, kw, (*qs, *ks, *vs)) + (
        np.float32(float(scale) * _LOG2E), np.float32(1.0 / kw))
    shape = (B, H, Sq, D)
    padded = (B, H, Sq, d4) if d4 != D else None
    f32, i32 = cupy.float32, cupy.int32

    def run(q, k, v, rel_h, rel_w):
        out = cupy.empty(shape, dtype=f32)
        of = out if padded is None else cupy.empty(padded, dtype=f32)
        flags = cupy.empty((nblocks,), dtype=i32) if split == 3 else of
        rh, rw = (ph(rel_h), pw(rel_w)) if dummy is None else (dummy, dummy)
        args = (pq(q), pk(k), pv(v), rh, rw, of, flags) + tail
        for fn, grid, nt, sm in launches:
            fn((grid,), (nt,), args, shared_mem=sm)
        if padded is not None:
            out[...] = of[..., :D]
        return out

    return run


# ---------------------------------------------------------- relative terms
def rel_terms(q, Rh, Rw):
    """rel_h, rel_w from q and the gathered tables, on the GPU.

    q: (B, heads, Sq, d) cupy array (float16, bfloat16, float32 or float64),
    Sq == qh * qw; Rh: (qh, kh, d), Rw: (qw, kw, d) (``get_rel_pos`` output,
    any float dtype). Returns ``rel_h`` (B, heads, Sq, kh) and ``rel_w``
    (B, heads, Sq, kw), contiguous, float32 (float64 for float64 q), with

        rel_h[b, h, y*qw + x, ky] = sum_c q[b, h, y*qw + x, c] * Rh[y, ky, c]
        rel_w[b, h, y*qw + x, kx] = sum_c q[b, h, y*qw + x, c] * Rw[x, kx, c]

    accumulated in float32 (float64). Not part of the backend contract: a
    helper for callers that keep everything on the GPU.
    """
    import cupy

    B, H, Sq, D = (int(s) for s in q.shape)
    qh, kh = int(Rh.shape[0]), int(Rh.shape[1])
    qw, kw = int(Rw.shape[0]), int(Rw.shape[1])
    if qh * qw != Sq:
        raise ValueError(f"rel_terms: Sq={Sq} != qh*qw={qh}*{qw}")
    kind = _dtype_name(q)
    if kind not in ("float16", "bfloat16", "float32"):
        T = cupy.float64 if kind == "float64" else cupy.float32
        r = q.astype(T).reshape(B, H, qh, qw, D)
        rel_h = cupy.einsum("bhyxc,ykc->bhyxk", r, cupy.asarray(Rh, dtype=T))
        rel_w = cupy.einsum("bhyxc,xkc->bhyxk", r, cupy.asarray(Rw, dtype=T))
        return (cupy.ascontiguousarray(rel_h).reshape(B, H, Sq, kh),
                cupy.ascontiguousarray(rel_w).reshape(B, H, Sq, kw))
    # the gathered tables are (qh * kh, d) row tables read through an identity index
    th, tw = Rh.reshape(qh * kh, D), Rw.reshape(qw * kw, D)
    run = _terms_run(q, th, tw, (qh, qw), (kh, kw), _identity_index(qh, kh), _identity_index(qw, kw))
    return run(q, th, tw)


_TABLE_TT = {"float16": 0, "bfloat16": 1, "float32": 2}


def _mma_terms_ok(dt, D):
    return dt < 2 and _pad16(D) <= 112 and _RELTERMS_MMA


def _identity_index(n, k):
    import numpy as np
    from relattn.relpos import _on_device
    import cupy

    return _on_device(cupy, ("identity32", n, k), np.arange(n * k, dtype=np.int32).reshape(n, k))


def _table_preps(th, tw, mma):
    """(prep_h, prep_w, tt, aligned): how the row tables reach the terms
    kernel, the table dtype code the kernel is built for, and whether both
    prepared tables start on 16 bytes."""
    if not mma:  # the SIMT kernel reads float32 tables
        return _dense_prep(th, "float32"), _dense_prep(tw, "float32"), 2, True
    names = (_dtype_name(th), _dtype_name(tw))
    if names[0] != names[1] or names[0] not in _TABLE_TT:  # one kernel reads both: one dtype
        return _dense_prep(th, "float32"), _dense_prep(tw, "float32"), 2, True
    ph, pw = _dense_prep(th), _dense_prep(tw)
    aligned = all(p is not _same or t.data.ptr % 16 == 0 for p, t in ((ph, th), (pw, tw)))
    return ph, pw, _TABLE_TT[names[0]], aligned


def _relterms_tile(k: int):
    """(rows, columns) of relattn_relterms's output tile for key grids up to k
    (the kernel's BM for its BN)."""
    return (128, 16) if k <= 16 else (64, 32) if k <= 32 else (64, 64)


def _terms_run(q, th, tw, q_size, k_size, idx_h, idx_w, resize=(None, None)):
    """``run(q, th, tw) -> (rel_h, rel_w)``: the terms kernel reading the rows of
    the (L, d) tables th / tw through the int32 index tables idx_h (qh, kh) and
    idx_w (qw, kw); ``resize`` gives the row counts to resize each table to
    first (None: use as is). Valid for arrays of the signature of these."""
    import cupy
    import numpy as np

    B, H, Sq, D = (int(s) for s in q.shape)
    (qh, qw), (kh, kw) = q_size, k_size
    dt = {"float16": 0, "bfloat16": 1, "float32": 2}[_dtype_name(q)]
    mma = _mma_terms_ok(dt, D)
    pq = _same if dt == 2 else _u16
    if q.strides[-1] != q.dtype.itemsize and D > 1:
        pq = _copy if dt == 2 else _u16_copy
        st = [H * Sq * D, Sq * D, D]
    else:
        st = _elem_strides(q)[:3]
    # a resized table is a new contiguous array of the same dtype
    ex_h = th if resize[0] is None else cupy.empty((resize[0], D), dtype=th.dtype)
    ex_w = tw if resize[1] is None else cupy.empty((resize[1], D), dtype=tw.dtype)
    ph, pw, tt, aligned = _table_preps(ex_h, ex_w, mma)
    BH = B * H
    # output tile (rows, columns): the SIMT kernel narrows its columns for small grids
    bm, bn = (64, 64) if mma else _relterms_tile(max(kh, kw))
    nblk_h = qh * ((BH * qw + bm - 1) // bm) * ((kh + bn - 1) // bn)
    nblk_w = qw * ((BH * qh + bm - 1) // bm) * ((kw + bn - 1) // bn)
    head = _ints(H, qh, qw, D, kh, kw) + tuple(_i64(s) for s in st) + _ints(BH, nblk_h)
    if mma:
        fn = _get_kernel("relterms_mma", _pad16(D), (dt, tt), 0)
        # 16-byte loads when every row start is 16-byte aligned
        vec = D % 8 == 0 and all(s % 8 == 0 for s in st) and (pq is not _u16 or q.data.ptr % 16 == 0) and aligned
        tail, block = head + (np.int32(vec),), (128,)
    else:
        fn = _get_kernel("relterms", 0, (dt, bn), 0)
        tail, block = head, (256,)
    grid = (nblk_h + nblk_w,)
    f32 = cupy.float32
    Lh, Lw = resize
    if Lh is not None or Lw is not None:
        from relattn.relpos import resize_rel_pos

    def run(q, th, tw):
        if Lh is not None:
            th = resize_rel_pos(th, Lh)
        if Lw is not None:
            tw = resize_rel_pos(tw, Lw)
        rel_h = cupy.empty((B, H, Sq, kh), dtype=f32)
        rel_w = cupy.empty((B, H, Sq, kw), dtype=f32)
        if grid[0]:
            fn(grid, block, (pq(q), ph(th), pw(tw), idx_h, idx_w, rel_h, rel_w) + tail)
        return rel_h, rel_w

    return run


def rel_terms_from_tables(q, rel_pos_h, rel_pos_w, q_size, k_size):
    """rel_h, rel_w (float32) from q and the stored tables, on the GPU.

    Same result as ``rel_terms(q, get_rel_pos(...), get_rel_pos(...))`` but the
    kernel gathers the table rows itself (no per-call gather; no dtype
    conversion of the tables for half-precision q). q: float16 / bfloat16
    with head_dim <= 112 (tensor cores) or float32 (FMA); other inputs go
    through :func:`rel_terms`. Tables are resized first when
    their length differs from ``2 * max(q, k) - 1`` (SAM's rule).
    """
    return terms_plan(q, rel_pos_h, rel_pos_w, q_size, k_size)(q, rel_pos_h, rel_pos_w)


def terms_plan(q, rel_pos_h, rel_pos_w, q_size, k_size):
    """``run(q, rel_pos_h, rel_pos_w) -> (rel_h, rel_w)`` of
    :func:`rel_terms_from_tables`, valid for arrays of the signature of these."""
    import cupy

    from relattn.relpos import _device_index32, get_rel_pos

    D = int(q.shape[-1])
    (qh, qw), (kh, kw) = q_size, k_size
    dt = {"float16": 0, "bfloat16": 1, "float32": 2}.get(_dtype_name(q))
    if dt is None or not (dt == 2 or _mma_terms_ok(dt, D)):
        return lambda q, th, tw: rel_terms(q, get_rel_pos(qh, kh, th), get_rel_pos(qw, kw, tw))
    Lh, Lw = 2 * max(qh, kh) - 1, 2 * max(qw, kw) - 1
    resize = (Lh if rel_pos_h.shape[0] != Lh else None, Lw if rel_pos_w.shape[0] != Lw else None)
    return _terms_run(q, rel_pos_h, rel_pos_w, q_size, k_size,
                      _device_index32(cupy, qh, kh), _device_index32(cupy, qw, kw), resize)
