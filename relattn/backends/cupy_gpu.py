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
        return {dt: f"relattn_relterms<{dt}>" for dt in (0, 1, 2)}
    if kind == "relterms_mma":
        return {(dt, tt): f"relattn_relterms_mma<{dt}, {hd}, {tt}>" for dt in (0, 1) for tt in (0, 1, 2)}
    if kind in _HALF_NAMES:
        dt = 1 if kind == "bfloat16" else 0
        return {(rel, mw): f"relattn_mma<{dt}, {hd}, {mw}, {rel}>" for rel in (0, 1, 2) for mw in (1, 2)}
    if kind == "tf32":
        return {(split, rel, safe): f"relattn_tf32<{hd}, {split}, {rel}, {safe}>"
                for split in (1, 3) for rel in (0, 1, 2) for safe in ((0, 1) if split == 3 else (0,))}
    if kind == "win":
        return {(dt, kwp): f"relattn_win<{dt}, {hd}, {kwp}>" for dt in (0, 1) for kwp in (16, 32)}
    t = "float" if kind == "float32" else "double"
    return {rel: f"relattn_simt<{t}, {hd}, {rel}>" for rel in (0, 2)}


def _get_kernel(kind: str, hd: int, rel, smem: int):
    import cupy

    dev = cupy.cuda.Device().id
    key = (kind, hd, rel, dev)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    with _lock:
        fn = _functions.get(key)
        if fn is not None:
            return fn
        mkey = (kind, hd, dev)
        names = _names(kind, hd)
        mod = _modules.get(mkey)
        if mod is None:
            mod = cupy.RawModule(
                code=_read_source(),
                options=("-std=c++17", "--use_fast_math"),
                name_expressions=list(names.values()),
            )
            _modules[mkey] = mod
        fn = mod.get_function(names[rel])
        if smem > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = smem
        _functions[key] = fn
        return fn


def _ensure_smem(fn, smem):
    """Raise a kernel's dynamic shared-memory limit to smem bytes (once per size)."""
    if smem > 48 * 1024 and _smem_limit.get(id(fn), 0) < smem:
        with _lock:
            fn.max_dynamic_shared_size_bytes = smem
            _smem_limit[id(fn)] = smem


_smem_limit: dict = {}


# -------------------------------------------------------------------- helpers
def _prep_half(x, d8: int):
    """16-bit view of x usable by the mma kernel: last stride 1, other strides
    multiples of 8 elements, 16-byte aligned base, last dim padded to d8."""
    import cupy

    u = x.view(cupy.uint16)
    d = u.shape[-1]
    if d != d8:
        p = cupy.zeros(u.shape[:-1] + (d8,), dtype=cupy.uint16)
        p[..., :d] = u
        return p
    st = [s // 2 for s in u.strides]
    ok = (
        u.strides[-1] == 2 or u.shape[-1] == 1
    ) and all(s % 8 == 0 for s in st[:3]) and u.data.ptr % 16 == 0
    if not ok:
        u = cupy.ascontiguousarray(u)
    return u


def _elem_strides(x):
    isz = x.dtype.itemsize
    return [s // isz for s in x.strides]


def _i64(x):
    import numpy as np

    return np.int64(x)


def _sm90_config(hd, Sq, Sk, kh, kw, has_rel):
    """(nwg, bn, rel) of the Hopper wgmma kernel for this problem, or None
    (another GPU, RELATTN_SM90=0, or shared memory too small for the terms)."""
    from relattn.backends import _sm90

    if _sm90.unavailable_reason() is not None:
        return None
    return _sm90.choose(hd, Sq, Sk, kh, kw, has_rel)


def _win_config(hd, Sq, kh, kw):
    """(kwp, slices per block, shared bytes) of the small-grid kernel
    relattn_win, or None: key rows of k_w <= 32 padded to kwp = 16 / 32 slots,
    the whole key grid (k_h * kwp <= 256 slots) resident in shared memory.
    ``RELATTN_WIN=0`` turns it off; ``RELATTN_WIN_SPB`` sets the 16-query
    slices per block (default: all of them, at most 16)."""
    if os.environ.get("RELATTN_WIN", "1") == "0" or kw > 32:
        return None
    kwp = 16 if kw <= 16 else 32
    if kh * kwp > 256:
        return None
    smem = 2 * kh * kwp * (hd + 8) * 2
    nsl = (Sq + 15) // 16
    env = os.environ.get("RELATTN_WIN_SPB")
    spb = int(env) if env else min(nsl, 16)
    return kwp, max(1, spb), smem


# ------------------------------------------------------------------ attention
def attention(q, k, v, rel_h, rel_w, k_size, scale):
    """Attention core on the GPU; see relattn.backends for the contract."""
    import cupy
    import numpy as np

    B, H, Sq, D = (int(s) for s in q.shape)
    Sk = int(k.shape[2])
    kind = _dtype_name(q)
    out = cupy.empty((B, H, Sq, D), dtype=q.dtype)
    if out.size == 0:
        return out
    if Sk == 0:  # softmax over no keys is undefined
        out.view(cupy.uint16 if q.dtype.itemsize == 2 else q.dtype).fill(
            0x7E00 if kind == "float16" else (0x7FC0 if kind == "bfloat16" else np.nan)
        )
        return out

    kh, kw = (int(s) for s in k_size) if k_size is not None else (1, Sk)
    has_rel = rel_h is not None and rel_w is not None
    BH = B * H

    if kind in _HALF_NAMES:
        d8 = (D + 7) // 8 * 8
        hd = _pad16(d8)
        qu, ku, vu = _prep_half(q, d8), _prep_half(k, d8), _prep_half(v, d8)
        if has_rel:
            rh = cupy.ascontiguousarray(rel_h, dtype=cupy.float32)
            rw = cupy.ascontiguousarray(rel_w, dtype=cupy.float32)
            rel = 1 if (kw == 64 and Sk % 64 == 0) else 2
        else:
            rh = rw = cupy.zeros((1,), dtype=cupy.float32)
            rel = 0
            kh, kw = 1, max(Sk, 1)
        ou = out.view(cupy.uint16) if d8 == D else cupy.empty((B, H, Sq, d8), dtype=cupy.uint16)
        win = _win_config(hd, Sq, kh, kw) if has_rel else None
        if win is not None:
            kwp, spb, smem = win
            fn = _get_kernel("win", hd, (1 if kind == "bfloat16" else 0, kwp), 0)
            _ensure_smem(fn, smem)   # grows with k_h
            groups = -(-((Sq + 15) // 16) // spb)
            qs, ks, vs = _elem_strides(qu), _elem_strides(ku), _elem_strides(vu)
            fn((BH * groups,), (128,),
               (qu, ku, vu, rh, rw, ou,
                np.int32(H), np.int32(Sq), np.int32(Sk), np.int32(d8), np.int32(kh), np.int32(kw),
                _i64(qs[0]), _i64(qs[1]), _i64(qs[2]),
                _i64(ks[0]), _i64(ks[1]), _i64(ks[2]),
                _i64(vs[0]), _i64(vs[1]), _i64(vs[2]),
                np.float32(float(scale) * _LOG2E), np.int32(groups), np.int32(spb)),
               shared_mem=smem)
            if d8 != D:
                out.view(cupy.uint16)[...] = ou[..., :D]
            return out
        cfg = _sm90_config(hd, Sq, Sk, kh, kw, has_rel)
        if cfg is not None:
            from relattn.backends import _sm90

            try:
                _sm90.attention(qu, ku, vu, rh, rw, ou, H, Sq, Sk, d8, kh, kw, hd,
                                1 if kind == "bfloat16" else 0, float(scale) * _LOG2E, cfg)
            except _sm90.BuildError as exc:
                import warnings

                warnings.warn(f"relattn: {exc}; using the portable mma.sync kernel", RuntimeWarning, stacklevel=2)
            else:
                if d8 != D:
                    out.view(cupy.uint16)[...] = ou[..., :D]
                return out
        mw = _choose_mw(hd, rel)
        smem = 2 * 2 * 64 * (hd + 8) * 2
        if rel == 1 and mw == 2:
            smem += 64 * mw * 72 * 4
        fn = _get_kernel(kind, hd, (rel, mw), smem)
        qs, ks, vs = _elem_strides(qu), _elem_strides(ku), _elem_strides(vu)
        bm = 64 * mw
        grid = (BH * ((Sq + bm - 1) // bm),)
        fn(
            grid, (128,),
            (qu, ku, vu, rh, rw, ou,
             np.int32(H), np.int32(Sq), np.int32(Sk), np.int32(d8), np.int32(kh), np.int32(kw),
             _i64(qs[0]), _i64(qs[1]), _i64(qs[2]),
             _i64(ks[0]), _i64(ks[1]), _i64(ks[2]),
             _i64(vs[0]), _i64(vs[1]), _i64(vs[2]),
             np.float32(float(scale) * _LOG2E), np.float32(1.0 / kw)),
            shared_mem=smem,
        )
        if d8 != D:
            out.view(cupy.uint16)[...] = ou[..., :D]
        return out

    if kind == "float32":
        from relattn.precision import get_gpu_float32_mode

        mode = get_gpu_float32_mode()
        if mode != "fma" and _tf32_ok():
            return _attention_tf32(q, k, v, rel_h, rel_w, kh, kw, has_rel, scale, out, 3 if mode == "3xtf32" else 1)

    # float32 / float64: exact SIMT kernel, strided loads
    T = cupy.float32 if kind == "float32" else cupy.float64
    hd = _pad16(D)
    if has_rel:
        rh = cupy.ascontiguousarray(rel_h, dtype=T)
        rw = cupy.ascontiguousarray(rel_w, dtype=T)
        rel = 2
    else:
        rh = rw = cupy.zeros((1,), dtype=T)
        rel = 0
        kh, kw = 1, max(Sk, 1)
    isz = np.dtype(T).itemsize
    ldt = 64 + 4
    smem = (2 * hd * ldt + 64 * hd + 64 * ldt) * isz
    fn = _get_kernel(kind, hd, rel, smem)
    qs, ks, vs = _elem_strides(q), _elem_strides(k), _elem_strides(v)
    grid = (BH * ((Sq + 63) // 64),)
    sc = float(scale) * _LOG2E
    fn(
        grid, (256,),
        (q, k, v, rh, rw, out,
         np.int32(H), np.int32(Sq), np.int32(Sk), np.int32(D), np.int32(kh), np.int32(kw),
         _i64(qs[0]), _i64(qs[1]), _i64(qs[2]), _i64(qs[3]),
         _i64(ks[0]), _i64(ks[1]), _i64(ks[2]), _i64(ks[3]),
         _i64(vs[0]), _i64(vs[1]), _i64(vs[2]), _i64(vs[3]),
         np.float32(sc) if kind == "float32" else np.float64(sc), np.float32(1.0 / kw)),
        shared_mem=smem,
    )
    return out


def _tf32_ok():
    """TF32 tensor cores (mma.sync m16n8k8 .tf32) need compute capability 8.0."""
    import cupy

    dev = cupy.cuda.Device()
    ok = _TF32_OK.get(dev.id)
    if ok is None:
        ok = _TF32_OK[dev.id] = int(dev.compute_capability) >= 80
    return ok


_TF32_OK: dict = {}


def _prep_f32(x, d4: int):
    """float32 view usable by the TF32 kernel: last stride 1, row strides
    multiples of 4 elements, 16-byte aligned base, last dim padded to d4."""
    import cupy

    d = x.shape[-1]
    if d != d4:
        p = cupy.zeros(x.shape[:-1] + (d4,), dtype=cupy.float32)
        p[..., :d] = x
        return p
    st = _elem_strides(x)
    ok = (x.strides[-1] == 4 or d == 1) and all(s % 4 == 0 for s in st[:3]) and x.data.ptr % 16 == 0
    return x if ok else cupy.ascontiguousarray(x)


def _attention_tf32(q, k, v, rel_h, rel_w, kh, kw, has_rel, scale, out, split):
    """float32 on tensor cores: 3xTF32 (split == 3) or plain TF32 (split == 1)."""
    import cupy
    import numpy as np

    B, H, Sq, D = (int(s) for s in q.shape)
    Sk = int(k.shape[2])
    d4 = (D + 3) // 4 * 4
    hd = _pad16(d4)
    qf, kf, vf = _prep_f32(q, d4), _prep_f32(k, d4), _prep_f32(v, d4)
    if has_rel:
        rh = cupy.ascontiguousarray(rel_h, dtype=cupy.float32)
        rw = cupy.ascontiguousarray(rel_w, dtype=cupy.float32)
        rel = 1 if kw == 64 else 2
    else:
        rh = rw = cupy.zeros((1,), dtype=cupy.float32)
        rel = 0
        kh, kw = 1, max(Sk, 1)
    # Q + two K/V stages, float32 rows padded as in relattn_tf32
    smem = (64 * (hd + 8) + 2 * (64 * (hd + 8) + 64 * (hd + 4))) * 4
    of = out if d4 == D else cupy.empty((B, H, Sq, d4), dtype=cupy.float32)
    qs, ks, vs = _elem_strides(qf), _elem_strides(kf), _elem_strides(vf)
    nblocks = B * H * ((Sq + 63) // 64)
    # 3xTF32: a second, IEEE-safe pass over the blocks the first one flagged
    # (non-finite inputs; see relattn_tf32); the flags need no clearing
    flags = cupy.empty((nblocks,), dtype=cupy.int32) if split == 3 else of
    args = (qf, kf, vf, rh, rw, of, flags,
            np.int32(H), np.int32(Sq), np.int32(Sk), np.int32(d4), np.int32(kh), np.int32(kw),
            _i64(qs[0]), _i64(qs[1]), _i64(qs[2]),
            _i64(ks[0]), _i64(ks[1]), _i64(ks[2]),
            _i64(vs[0]), _i64(vs[1]), _i64(vs[2]),
            np.float32(float(scale) * _LOG2E), np.float32(1.0 / kw))
    for safe in ((0, 1) if split == 3 else (0,)):
        fn = _get_kernel("tf32", hd, (split, rel, safe), smem)
        fn((nblocks,), (128,), args, shared_mem=smem)
    if d4 != D:
        out[...] = of[..., :D]
    return out


# ---------------------------------------------------------- relative terms
def _table_f32(t):
    import cupy

    if t.dtype.name == "bfloat16":
        t = (cupy.ascontiguousarray(t).view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32)
    return cupy.ascontiguousarray(t, dtype=cupy.float32)


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
    if kind == "float64" or kind not in ("float16", "bfloat16", "float32"):
        T = cupy.float64 if kind == "float64" else cupy.float32
        r = q.astype(T).reshape(B, H, qh, qw, D)
        rel_h = cupy.einsum("bhyxc,ykc->bhyxk", r, cupy.asarray(Rh, dtype=T))
        rel_w = cupy.einsum("bhyxc,xkc->bhyxk", r, cupy.asarray(Rw, dtype=T))
        return (cupy.ascontiguousarray(rel_h).reshape(B, H, Sq, kh),
                cupy.ascontiguousarray(rel_w).reshape(B, H, Sq, kw))
    rel_h = cupy.empty((B, H, Sq, kh), dtype=cupy.float32)
    rel_w = cupy.empty((B, H, Sq, kw), dtype=cupy.float32)
    if rel_h.size == 0 and rel_w.size == 0:
        return rel_h, rel_w
    dt = {"float16": 0, "bfloat16": 1, "float32": 2}[kind]
    qv = q.view(cupy.uint16) if dt < 2 else q
    st = _elem_strides(qv)
    if qv.strides[-1] != qv.dtype.itemsize and D > 1:
        qv = cupy.ascontiguousarray(qv)
        st = _elem_strides(qv)
    BH = B * H
    nblk_h = qh * ((BH * qw + 63) // 64) * ((kh + 63) // 64)
    nblk_w = qw * ((BH * qh + 63) // 64) * ((kw + 63) // 64)
    if _mma_terms_ok(dt, D):
        # the gathered tables are read through an identity index
        th, tw = _table_rows(Rh), _table_rows(Rw)
        _launch_terms_mma(qv, st, dt, D, th, tw, _identity_index(qh, kh), _identity_index(qw, kw),
                          rel_h, rel_w, H, qh, qw, kh, kw, BH, nblk_h, nblk_w)
        return rel_h, rel_w
    _launch_terms_simt(qv, st, dt, D, _table_f32(Rh), _table_f32(Rw),
                       _identity_index(qh, kh), _identity_index(qw, kw),
                       rel_h, rel_w, H, qh, qw, kh, kw, BH, nblk_h)
    return rel_h, rel_w


def _launch_terms_simt(qv, st, dt, D, th, tw, idx_h, idx_w, rel_h, rel_w, H, qh, qw, kh, kw, BH, nblk_h):
    import numpy as np

    nblk_w = qw * ((BH * qh + 63) // 64) * ((kw + 63) // 64)
    fn = _get_kernel("relterms", 0, dt, 0)
    fn((nblk_h + nblk_w,), (256,),
       (qv, th, tw, idx_h, idx_w, rel_h, rel_w,
        np.int32(H), np.int32(qh), np.int32(qw), np.int32(D), np.int32(kh), np.int32(kw),
        _i64(st[0]), _i64(st[1]), _i64(st[2]), np.int32(BH), np.int32(nblk_h)))


_TABLE_TT = {"float16": 0, "bfloat16": 1, "float32": 2}


def _mma_terms_ok(dt, D):
    return dt < 2 and _pad16(D) <= 112 and _RELTERMS_MMA


def _table_rows(t):
    """(rows, D) contiguous view of a table in float16 / bfloat16 / float32."""
    import cupy

    if _dtype_name(t) not in _TABLE_TT:
        t = t.astype(cupy.float32)
    t = cupy.ascontiguousarray(t)
    return t.reshape(-1, t.shape[-1])


def _identity_index(n, k):
    import numpy as np
    from relattn.relpos import _on_device
    import cupy

    return _on_device(cupy, ("identity32", n, k), np.arange(n * k, dtype=np.int32).reshape(n, k))


def _launch_terms_mma(qv, st, dt, D, th, tw, idx_h, idx_w, rel_h, rel_w, H, qh, qw, kh, kw, BH, nblk_h, nblk_w):
    import numpy as np

    tt_h, tt_w = _TABLE_TT[_dtype_name(th)], _TABLE_TT[_dtype_name(tw)]
    if tt_h != tt_w:  # one kernel reads both tables: bring them to one dtype
        th, tw = th.astype("float32"), tw.astype("float32")
        tt_h = 2
    fn = _get_kernel("relterms_mma", _pad16(D), (dt, tt_h), 0)
    # 16-byte loads when every row start is 16-byte aligned
    vec = (D % 8 == 0 and all(s_ % 8 == 0 for s_ in st[:3]) and qv.data.ptr % 16 == 0
           and th.data.ptr % 16 == 0 and tw.data.ptr % 16 == 0)
    fn((nblk_h + nblk_w,), (128,),
       (qv, th, tw, idx_h, idx_w, rel_h, rel_w,
        np.int32(H), np.int32(qh), np.int32(qw), np.int32(D), np.int32(kh), np.int32(kw),
        _i64(st[0]), _i64(st[1]), _i64(st[2]), np.int32(BH), np.int32(nblk_h), np.int32(vec)))


def rel_terms_from_tables(q, rel_pos_h, rel_pos_w, q_size, k_size):
    """rel_h, rel_w (float32) from q and the stored tables, on the GPU.

    Same result as ``rel_terms(q, get_rel_pos(...), get_rel_pos(...))`` but the
    kernel gathers the table rows itself (no per-call gather; no dtype
    conversion of the tables for half-precision q). q: float16 / bfloat16
    with head_dim <= 112 (tensor cores) or float32 (FMA); other inputs go
    through :func:`rel_terms`. Tables are resized first when
    their length differs from ``2 * max(q, k) - 1`` (SAM's rule).
    """
    import cupy

    from relattn.relpos import _device_index32, get_rel_pos, resize_rel_pos

    B, H, Sq, D = (int(s) for s in q.shape)
    (qh, qw), (kh, kw) = q_size, k_size
    dt = {"float16": 0, "bfloat16": 1}.get(_dtype_name(q), 2)
    if not (_mma_terms_ok(dt, D) or dt == 2):
        return rel_terms(q, get_rel_pos(qh, kh, rel_pos_h), get_rel_pos(qw, kw, rel_pos_w))
    th, tw = rel_pos_h, rel_pos_w
    if th.shape[0] != 2 * max(qh, kh) - 1:
        th = resize_rel_pos(th, 2 * max(qh, kh) - 1)
    if tw.shape[0] != 2 * max(qw, kw) - 1:
        tw = resize_rel_pos(tw, 2 * max(qw, kw) - 1)
    rel_h = cupy.empty((B, H, Sq, kh), dtype=cupy.float32)
    rel_w = cupy.empty((B, H, Sq, kw), dtype=cupy.float32)
    qv = q.view(cupy.uint16) if dt < 2 else q
    if qv.strides[-1] != qv.dtype.itemsize and D > 1:
        qv = cupy.ascontiguousarray(qv)
    st = _elem_strides(qv)
    BH = B * H
    nblk_h = qh * ((BH * qw + 63) // 64) * ((kh + 63) // 64)
    nblk_w = qw * ((BH * qh + 63) // 64) * ((kw + 63) // 64)
    if dt == 2:
        _launch_terms_simt(qv, st, dt, D, _table_f32(th), _table_f32(tw),
                           _device_index32(cupy, qh, kh), _device_index32(cupy, qw, kw),
                           rel_h, rel_w, H, qh, qw, kh, kw, BH, nblk_h)
        return rel_h, rel_w
    _launch_terms_mma(qv, st, dt, D, _table_rows(th), _table_rows(tw),
                      _device_index32(cupy, qh, kh), _device_index32(cupy, qw, kw),
                      rel_h, rel_w, H, qh, qw, kh, kw, BH, nblk_h, nblk_w)
    return rel_h, rel_w
