"""relattn_win: small key grids (k_w <= 32, k_h x slots <= 256: SAM's
windows), float16 / bfloat16 on ``mma.sync``. The whole key grid is resident
in shared memory, each key row padded to 16 or 32 slots; a block takes up to
16 slices of 16 queries. With the tables given it can compute the terms itself
(16-slot rows, tables of at most 32 rows).
"""

from __future__ import annotations

import dataclasses

from .. import _build, tuning
from .._operands import LOG2E, core_tail, ints, operand_prep, pad16
from .wg import launcher
from .ws import fused_table_args

NAME = "win"
KERNEL = "relattn_win"
DTYPES = ("float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Config:
    kwp: int       # slots per key row (16 or 32)
    spb: int       # 16-query slices per block
    fuse: int      # 1: the terms are computed in the kernel from the tables

    def describe(self) -> str:
        return f"kwp={self.kwp} spb={self.spb} fuse={self.fuse}"


def _geometry(p):
    kh, kw = p.k_size
    kwp = 16 if kw <= 16 else 32
    return kwp, kh * kwp


def not_supported_reasons(p, dev, fused: bool) -> list[str]:
    reasons = []
    kh, kw = p.k_size
    if p.dtype not in DTYPES:
        reasons.append(f"dtype {p.dtype} (takes {', '.join(DTYPES)})")
    if not p.terms:
        reasons.append("takes the relative-position bias only")
    if p.D > 128:
        reasons.append(f"head_dim {p.D} > 128")
    if kw > 32:
        reasons.append(f"k_w {kw} > 32")
    elif _geometry(p)[1] > 256:
        reasons.append(f"k grid {p.k_size}: {_geometry(p)[1]} key slots > 256")
    if dev.cc < 80:
        reasons.append(f"compute capability {dev.cc // 10}.{dev.cc % 10} < 8.0")
    if fused:
        if not p.fusable:
            reasons.append("fused terms need tables of q's 16-bit dtype and head_dim a multiple of 8")
        else:
            Lh, Lw = p.table_rows
            if Lh > 32 or Lw > 32 or kw > 16:
                reasons.append(f"fused terms: 16-slot key rows and tables of at most 32 rows (got {Lh} / {Lw}, k_w {kw})")
    return reasons


def _smem(p, c: Config) -> int:
    kh, kw = p.k_size
    hd = pad16((p.D + 7) // 8 * 8)
    smem = (2 * kh * kw + c.kwp - kw + 1) * (hd + 8) * 2   # K (kwp - k_w zero rows after), V (one)
    if c.fuse:   # the two tables (32 rows), a 4 x 16 x 32 float32 scratch, 512 bytes of index tables
        smem += 2 * 32 * (hd + 8) * 2 + 4 * 16 * 32 * 4 + 512
    return smem


def config(p, dev, fused: bool, options: dict) -> Config:
    nsl = (p.Sq + 15) // 16
    c = Config(_geometry(p)[0], min(nsl, tuning.WIN_SLICES_MAX), int(fused))
    return dataclasses.replace(c, **options) if options else c


def config_reasons(p, c: Config) -> list[str]:
    need = _smem(p, c)
    return [] if need <= 227 * 1024 else [f"{need} bytes of shared memory"]


def _names(hd):
    return {(dt, kwp, fuse): f"relattn_win<{dt}, {hd}, {kwp}, {fuse}>"
            for dt in (0, 1) for kwp in (16, 32) for fuse in ((0, 1) if kwp == 16 else (0,))}


def build(p, dev, c: Config, q, k, v, rel_pos_h=None, rel_pos_w=None):
    import cupy
    import numpy as np

    d8 = (p.D + 7) // 8 * 8 if not c.fuse else p.D
    hd = pad16(d8)
    kh, kw = p.k_size
    smem = _smem(p, c)
    spb = max(1, c.spb)
    groups = -(-((p.Sq + 15) // 16) // spb)
    fn = _build.portable_kernel(("win", hd), _names(hd), (p.dt, c.kwp, c.fuse), smem, _build.family_source(NAME))
    preps = [operand_prep(x, d8, 8) for x in (q, k, v)]
    strides = [s for _, st in preps for s in st]
    sc = np.float32(p.scale * LOG2E)
    grid = (p.B * p.H * groups,)
    head = core_tail(p.H, p.Sq, p.Sk, d8, kh, kw, strides) + (sc,)
    pq, pk, pv = (pr for pr, _ in preps)
    if not c.fuse:
        mid = (cupy.zeros((8,), dtype=cupy.uint16),) * 2 + (cupy.zeros((1,), dtype=cupy.int32),) * 2  # no tables
        return launcher(p, fn, grid, (128,), smem, (pq, pk, pv), head + ints(groups, spb, 0, 0, 1), mid), None
    tables = fused_table_args(p, rel_pos_h, rel_pos_w)
    tail = head + ints(groups, spb)
    shape, u16 = (p.B, p.H, p.Sq, p.D), cupy.uint16

    def run(q, k, v, th, tw):
        out = cupy.empty(shape, dtype=q.dtype)
        t = tables(th, tw)
        fn(grid, (128,), (pq(q), pk(k), pv(v), *t[:6], out.view(u16)) + tail + t[6:], shared_mem=smem)
        return out

    return run, None
