"""relattn_ws: Hopper's warp-specialised kernel (float16 / bfloat16).

A producer warp streams Q, K and V tiles by TMA (the bulk tensor copy
engine); consumer warpgroups run the products on ``wgmma`` and the online
softmax. Persistent: one block per SM (``mb`` per SM for small grids) loops
over the row tiles. Head dims 64 and 80 (49..80 padded to them).

Bias modes (the kernel's ``REL`` template argument):
"""

from __future__ import annotations

import dataclasses
import enum

from .. import _build, tuning
from .._operands import LOG2E, ints, operand_prep, pad16, same, table_prep, terms_prep, u16

NAME = "ws"
KERNEL = "relattn_ws"
DTYPES = ("float16", "bfloat16")
MAX_SMEM = _build.MAX_SMEM_SM90 - 1024   # its mbarriers are static shared memory
# run(..., lse=...) also keeps each row's log-sum-exp (log2 domain) for the
# fused backward, which then skips its row pass
WRITES_LSE = True


class Bias(enum.IntEnum):
    NONE = 0          # plain attention
    KEY_ROWS = 1      # terms given; a key tile is whole rows of 64 (or one row of 80) keys, rel_w in registers
    FUSED = 4         # terms computed in the kernel from the tables (128 rows each): SAM's global grids
    WINDOW = 5        # terms given; key rows in 16-slot groups (small grids: SAM's 14 x 14 windows)
    FUSED_WINDOW = 6  # terms computed in the kernel, 16-slot key rows, tables of at most 32 rows
    FUSED_H72 = 7     # as FUSED, rel_h in one pass of 72 table rows (where FUSED takes two passes of 64)


__doc__ += "".join(f"\n``{b.name}`` ({b.value})" for b in Bias)


@dataclasses.dataclass(frozen=True)
class Config:
    nc: int        # consumer warpgroups (64 query rows each)
    bn: int        # keys per tile
    bias: Bias
    stages: int    # K / V tiles in flight
    pp: int        # consumers ping-pong their softmax and products
    rg: int        # registers per consumer thread (setmaxnreg), 0: no split
    mb: int        # blocks per SM
    persist: int = 1   # 1: one block per SM (x mb); 0: one block per row tile; n >= 2: at most n blocks

    def describe(self) -> str:
        return (f"nc={self.nc} bn={self.bn} bias={self.bias.name} stages={self.stages} pp={self.pp} "
                f"rg={self.rg} mb={self.mb}" + ("" if self.persist == 1 else f" persist={self.persist}"))


def smem_bytes(hd: int, nc: int, bn: int, st: int, fused: bool = False, window: bool = False,
               h72: bool = False) -> int:
    """Q, the K/V stages and 1024 bytes of alignment; with ``fused`` (FUSED)
    the two tables (128 rows each) and a float32 scratch per consumer
    warpgroup: 64 x 136 when that fits, else 64 x 72 (the kernel then
    computes the terms in two passes; the same rule as the kernel's NH);
    ``fused`` and ``window`` (FUSED_WINDOW): tables of 32 rows, a 64 x 36
    scratch; ``h72`` (FUSED_H72: two passes, rel_h in one of 72 rows): a
    64 x 80 scratch."""
    n = 64 * nc * hd * 2 + st * 2 * bn * hd * 2 + 1024
    if not fused:
        return n
    if window:
        return n + 2 * 32 * hd * 2 + nc * 64 * 36 * 4
    n += 2 * 128 * hd * 2
    if h72:
        return n + nc * 64 * 80 * 4
    return n + nc * 64 * (136 if table_passes(hd, nc, bn, st) == 1 else 72) * 4


def table_passes(hd: int, nc: int, bn: int, st: int) -> int:
    """Passes of the fused G = Q T^T over 128-row tables (FUSED): one when a
    64 x 136 float32 scratch per consumer fits beside Q, the stages and the
    tables, else two of 64 rows."""
    n = smem_bytes(hd, nc, bn, st) + 2 * 128 * hd * 2
    return 1 if n + nc * 64 * 136 * 4 <= MAX_SMEM else 2


def kernel_name(dt: int, hd: int, c: Config, lse: bool = False) -> str:
    """The instantiation of configuration ``c``; ``lse``: the one that also
    stores each row's log-sum-exp (compiled only where a vjp asks for it)."""
    return (f"relattn_ws<{dt}, {hd}, {c.nc}, {c.bn}, {int(c.bias)}, {c.stages}, {c.pp}, {c.rg}, {c.mb}, "
            f"{'true' if lse else 'false'}>")


def _shape(p, fused):
    """(hd, kind): the tuning row of this problem, or (hd, reason)."""
    kh, kw = p.k_size
    hd = pad16((p.D + 7) // 8 * 8)
    if not p.terms:
        return hd, "rows"
    window = kw != 64 and 1 <= kw <= 16 and 1 <= kh <= 16 and kh * kw == p.Sk
    if fused:
        Lh, Lw = p.table_rows
        if window:
            return (hd, "window") if Lh <= 32 and Lw <= 32 else (hd, f"fused terms: tables of {Lh} / {Lw} rows > 32")
        if kw == 64 and kh <= 64 and Lh <= 128 and Lw <= 128:
            return hd, "rows"
        return hd, f"fused terms: k grid {p.k_size} (k_w == 64, k_h <= 64, tables <= 128 rows) or a small grid"
    if window:
        return hd, "window"
    if hd == 64 and kw == 80 and kh * kw == p.Sk:
        return hd, "row80"
    if kw == 64:
        return hd, "rows"
    return hd, f"k_w {kw}: key tiles of 64-key rows, one 80-key row (head_dim 64) or 16-slot rows (k_w <= 16)"


def not_supported_reasons(p, dev, fused: bool) -> list[str]:
    reasons = []
    if not dev.hopper:
        reasons.append(f"Hopper kernels unavailable: {dev.hopper_reason}")
    if p.dtype not in DTYPES:
        reasons.append(f"dtype {p.dtype} (takes {', '.join(DTYPES)})")
    if fused and not p.fusable:
        reasons.append("fused terms need tables of q's 16-bit dtype and head_dim a multiple of 8")
    hd, kind = _shape(p, fused)
    if hd not in (64, 80):
        reasons.append(f"head_dim {p.D} (takes 49..80)")
    elif (kind, hd) not in tuning.WS:
        reasons.append(kind)
    return reasons


def config(p, dev, fused: bool, options: dict) -> Config:
    hd, kind = _shape(p, fused)
    nc, bn, st, pp, rg, mb = tuning.WS[(kind, hd)]
    bias = {"rows": Bias.KEY_ROWS, "row80": Bias.KEY_ROWS, "window": Bias.WINDOW}[kind] if p.terms else Bias.NONE
    if fused:
        bias = Bias.FUSED_WINDOW if kind == "window" else Bias.FUSED
    c = Config(nc, bn, bias, st, pp, rg, mb)
    c = dataclasses.replace(c, **options) if options else c
    if c.bias == Bias.FUSED and not options.get("bias") and _rel_h_one_pass(p, hd, c):
        c = dataclasses.replace(c, bias=Bias.FUSED_H72)
    return c


def config_reasons(p, c: Config) -> list[str]:
    """Why configuration ``c`` cannot run this problem (empty: it can)."""
    hd = pad16((p.D + 7) // 8 * 8)
    if (c.bn == 80) != (p.k_size[1] == 80 and c.bias == Bias.KEY_ROWS):
        return [f"bn {c.bn}: 80-key tiles are for key rows of k_w == 80 only"]
    fused = c.bias in (Bias.FUSED, Bias.FUSED_WINDOW, Bias.FUSED_H72)
    need = smem_bytes(hd, c.nc, c.bn, c.stages, fused, c.bias == Bias.FUSED_WINDOW, c.bias == Bias.FUSED_H72)
    if need > MAX_SMEM:
        return [f"{need} bytes of shared memory (at most {MAX_SMEM})"]
    return []


def _rel_h_one_pass(p, hd, c: Config) -> bool:
    """FUSED_H72: where the fused terms take two passes over 64 table rows
    (shared memory too short for one of 128: SAM-H's head_dim 80), rel_h in
    one pass of 72 rows instead, when every 64-row warpgroup's rel_h rows lie
    within 72 rows from the kernel's base (the index of its first row's last
    key row, rounded down to 8) inside the 128 rows held."""
    import numpy as np

    from relattn.relpos import _relative_index

    (qh, qw), (kh, _) = p.q_size, p.k_size
    if (table_passes(hd, c.nc, c.bn, c.stages) != 2
            or smem_bytes(hd, c.nc, c.bn, c.stages, True, False, True) > MAX_SMEM):
        return False
    idx = _relative_index(qh, kh)
    bm = 64 * c.nc   # every warpgroup of every row tile, rows past the end read as the last (as the kernel does)
    for r0 in range(0, -(-p.Sq // bm) * bm, 64):
        qys = np.minimum(np.arange(r0, r0 + 64), p.Sq - 1) // qw
        rows = idx[qys[0]:qys[-1] + 1]
        base = int(idx[qys[0], kh - 1]) & ~7
        if int(rows.min()) < base or int(rows.max()) - base >= 72 or base + 72 > 128:
            return False
    return True


# ------------------------------------------------------------------ launching
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
        _TMAP_ENCODE.append((fn, ctypes))
    return _TMAP_ENCODE[0]


def tensor_map(ptr: int, shape, strides, box_rows: int, box_cols: int = 64, swizzle: bool = True):
    """A CUtensorMap (a one-element numpy array of 128 bytes, passed to the
    kernel by value) for 16-bit data of ``shape`` (B, H, S, D) with element
    ``strides`` (batch, head, row; columns contiguous): dims (D, S, H, B),
    box ``box_cols`` columns x ``box_rows`` rows, 128-byte swizzle (or none),
    out-of-range elements read as zeros. Raises ValueError when the driver
    refuses it."""
    import numpy as np

    fn, ctypes = _tmap_encoder()
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


def _grid(p, dev, c: Config):
    ntot = p.B * p.H * ((p.Sq + 64 * c.nc - 1) // (64 * c.nc))
    cap = ntot if c.persist == 0 else c.persist if c.persist >= 2 else dev.sms * c.mb
    return max(1, min(ntot, cap)), ntot


def build(p, dev, c: Config, q, k, v, rel_pos_h=None, rel_pos_w=None):
    """``run(q, k, v, x, y, lse=None) -> out`` (x, y: rel_h / rel_w, or with
    the fused modes the two tables; ``lse``: a C-contiguous float32 (B, H, Sq)
    array that receives each row's log-sum-exp in the log2 domain, as the
    fused backward's row pass computes it, see :data:`WRITES_LSE`), or None
    with the reason when TMA cannot serve these arrays. Raises BuildError."""
    import cupy
    import numpy as np

    B, H, Sq, D, Sk = p.B, p.H, p.Sq, p.D, p.Sk
    kh, kw = p.k_size
    d8 = (D + 7) // 8 * 8
    hd = pad16(d8)
    dt = p.dt
    (pq, qs), (pk, ks), (pv, vs) = (operand_prep(x, d8, 8) for x in (q, k, v))
    fn = _build.sm90_kernel(kernel_name(dt, hd, c))
    grid, ntot = _grid(p, dev, c)
    fused = c.bias in (Bias.FUSED, Bias.FUSED_WINDOW, Bias.FUSED_H72)
    smem = smem_bytes(hd, c.nc, c.bn, c.stages, fused, c.bias == Bias.FUSED_WINDOW, c.bias == Bias.FUSED_H72)
    block = (128 * c.nc + (128 if c.rg else 32),)
    try:
        tensor_map(int(q.data.ptr) // 16 * 16, (B, H, Sq, d8), qs, 64 * c.nc)  # the driver takes these shapes
    except (ValueError, OSError, AttributeError) as exc:
        return None, f"TMA: {exc}"
    sc = np.float32(p.scale * LOG2E)
    spec = ["map"] * 6 + ["ptr"] * 6 + list(ints(*p.table_rows, p.q_size[1]) if fused else ints(0, 0, 0)) \
        + ["ptr"] + list(ints(H, Sq, Sk, d8, kh, kw)) + [sc, ints(ntot)[0]] \
        + ["ptr"] * 3 + [np.int64(x) for x in (*qs, *ks, *vs)] \
        + ["ptr"]   # plain operands (the exact slow path), then lse2 (or null)
    launch = _build.RawLaunch(fn, (grid,), block, smem, spec)
    launches = [launch, None]   # plain, and the instantiation that keeps the log-sum-exp (built on first use)

    def lse_launch():
        if launches[1] is None:
            launches[1] = _build.RawLaunch(_build.sm90_kernel(kernel_name(dt, hd, c, lse=True)), (grid,), block,
                                           smem, spec)
        return launches[1]
    rel_ptrs = _fused_ptrs(p, rel_pos_h, rel_pos_w) if fused else _terms_ptrs(p)
    shape, dtype, u16t = (B, H, Sq, D), q.dtype, cupy.uint16
    padded = (B, H, Sq, d8) if d8 != D else None
    # an operand read in place needs no uint16 view: only its address travels
    operands = [same if prep is u16 else prep for prep in (pq, pk, pv)]
    # A tensor map depends on the operand's address only (shape, strides and
    # box are the plan's): the last few per operand are kept, since repeated
    # calls often get the same memory-pool blocks back.
    # head_dim 80: a second map per operand for columns 64-79 (8-column boxes)
    maps = ({}, {}, {})
    kv_rows = kw if c.bias in (Bias.WINDOW, Bias.FUSED_WINDOW) else c.bn   # 16-slot key rows: one box per key row
    specs = (((B, H, Sq, d8), qs, 64 * c.nc), ((B, H, Sk, d8), ks, kv_rows), ((B, H, Sk, d8), vs, kv_rows))

    def tensor_maps(i, ptr):
        m = maps[i].get(ptr)
        if m is None:
            if len(maps[i]) >= 8:
                maps[i].clear()
            pair = (tensor_map(ptr, *specs[i]), tensor_map(ptr, *specs[i], box_cols=8, swizzle=False)) \
                if hd == 80 else (tensor_map(ptr, *specs[i]),) * 2
            m = maps[i][ptr] = (pair[0].ctypes.data, pair[1].ctypes.data, pair)
        return m

    get_stream = cupy.cuda.get_current_stream

    def run(q, k, v, x, y, lse=None):
        a, b, c_ = operands[0](q), operands[1](k), operands[2](v)
        out = cupy.empty(shape, dtype=dtype)
        ou = out if padded is None else cupy.empty(padded, dtype=u16t)
        qm, km, vm = tensor_maps(0, a.data.ptr), tensor_maps(1, b.data.ptr), tensor_maps(2, c_.data.ptr)
        keep, ptrs = rel_ptrs(x, y)
        go = launch if lse is None else lse_launch()
        go((*ptrs, ou.data.ptr, a.data.ptr, b.data.ptr, c_.data.ptr, 0 if lse is None else lse.data.ptr),
           (qm[0], km[0], vm[0], qm[1], km[1], vm[1]), get_stream().ptr)
        del keep
        if padded is not None:
            out.view(u16t)[...] = ou[..., :D]
        return out

    return run, None


def _terms_ptrs(p):
    """``ptrs(rel_h, rel_w) -> (arrays to keep, six pointers)``: the kernel's
    pointer arguments after the tensor maps when the terms are given (or
    absent): rel_h, rel_w as float32, no tables."""
    terms = terms_prep(p.terms, "float32")

    def ptrs(rel_h, rel_w):
        rh, rw = terms(rel_h, rel_w)
        h, w = rh.data.ptr, rw.data.ptr
        return (rh, rw), (h, w, h, w, h, w)

    return ptrs


def _fused_ptrs(p, rel_pos_h, rel_pos_w):
    """``ptrs(th, tw) -> (arrays to keep, six pointers)`` for the fused modes:
    no terms, the tables as the kernel reads them, the index tables."""
    args = fused_table_args(p, rel_pos_h, rel_pos_w)
    dummy, _, _, _, idx_h, idx_w = args(rel_pos_h, rel_pos_w)[:6]
    d, ih, iw = dummy.data.ptr, idx_h.data.ptr, idx_w.data.ptr
    keep = (dummy, idx_h, idx_w)

    def ptrs(th, tw):
        t = args(th, tw)
        return (keep, t[2], t[3]), (d, d, t[2].data.ptr, t[3].data.ptr, ih, iw)

    return ptrs


def fused_table_args(p, rel_pos_h, rel_pos_w):
    """``args(th, tw)``: the stored tables as the fused kernels read them
    (resized to SAM's row counts, 16-bit, contiguous, 16-byte aligned) and
    the index tables, then the table lengths and q_w."""
    import cupy

    from relattn.relpos import _device_index32, resize_rel_pos

    (qh, qw), (kh, kw) = p.q_size, p.k_size
    Lh, Lw = p.table_rows
    resize = (Lh if p.tables[2] != Lh else None, Lw if p.tables[3] != Lw else None)
    ex_h = rel_pos_h if resize[0] is None else cupy.empty((Lh, p.D), dtype=rel_pos_h.dtype)
    ex_w = rel_pos_w if resize[1] is None else cupy.empty((Lw, p.D), dtype=rel_pos_w.dtype)
    ph, pw = table_prep(ex_h), table_prep(ex_w)
    idx_h, idx_w = _device_index32(cupy, qh, kh), _device_index32(cupy, qw, kw)
    dummy = cupy.zeros((1,), dtype=cupy.float32)
    lens = ints(Lh, Lw, qw)

    def args(th, tw):
        if resize[0] is not None:
            th = resize_rel_pos(th, Lh)
        if resize[1] is not None:
            tw = resize_rel_pos(tw, Lw)
        return (dummy, dummy, ph(th), pw(tw), idx_h, idx_w) + lens

    return args

