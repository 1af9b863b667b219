"""relattn_wg: Hopper ``wgmma`` kernel, one or two warpgroups per block
(float16 / bfloat16), K / V tiles by ``cp.async``. Head dims 16..128; the
128-byte swizzled layout (the fast one) for head_dim 64 and 80.

Bias modes (the kernel's ``REL``):
"""

from __future__ import annotations

import dataclasses
import enum

from .. import _build, tuning
from .._operands import LOG2E, core_tail, operand_prep, pad16, terms_prep

NAME = "wg"
KERNEL = "relattn_wg"
DTYPES = ("float16", "bfloat16")
WHOLE_ROW_KW = (48, 80, 96, 112, 128)   # k_w whose key row is one tile (multiples of 16 up to 128)


class Bias(enum.IntEnum):
    NONE = 0        # plain attention
    KEY_ROWS = 1    # 64-key rows: a tile is one key row, rel_w in registers
    GENERIC = 2     # any grid: both terms of every key staged in shared memory
    WHOLE_ROW = 3   # one whole key row of k_w in WHOLE_ROW_KW per tile, rel_w in registers


__doc__ += "".join(f"\n``{b.name}`` ({b.value})" for b in Bias)


@dataclasses.dataclass(frozen=True)
class Config:
    nwg: int       # warpgroups (64 query rows each)
    bn: int        # keys per tile
    bias: Bias
    stages: int = tuning.WG_STAGES

    def describe(self) -> str:
        return f"nwg={self.nwg} bn={self.bn} bias={self.bias.name} stages={self.stages}"


def smem_bytes(hd: int, c: Config, kh: int, kw: int) -> int:
    n = 64 * c.nwg * hd * 2 + 2 * c.stages * c.bn * hd * 2 + 1024  # + 1024: alignment of the swizzled tiles
    if c.bias == Bias.GENERIC:
        n += 64 * c.nwg * ((kh + kw) | 1) * 4
    return n


def _bias(p) -> Bias:
    kw = p.k_size[1]
    if not p.terms:
        return Bias.NONE
    return Bias.KEY_ROWS if kw == 64 else Bias.WHOLE_ROW if kw in WHOLE_ROW_KW else Bias.GENERIC


def not_supported_reasons(p, dev, fused: bool) -> list[str]:
    reasons = []
    if not dev.hopper:
        reasons.append(f"Hopper kernels unavailable: {dev.hopper_reason}")
    if p.dtype not in DTYPES:
        reasons.append(f"dtype {p.dtype} (takes {', '.join(DTYPES)})")
    if fused:
        reasons.append("computes no terms: they are given")
    return reasons


def tuned_reasons(p) -> list[str]:
    """Where the default tuning leaves the problem to relattn_mma: other head
    dims run without the swizzle and the generic bias is no faster than
    mma.sync (measured: docs/kernels.md)."""
    hd = pad16((p.D + 7) // 8 * 8)
    b = _bias(p)
    kind = "whole_row" if b == Bias.WHOLE_ROW else "rows" if b in (Bias.NONE, Bias.KEY_ROWS) else None
    if (hd, kind) not in tuning.WG:
        return [f"head_dim {p.D} with k grid {p.k_size}: mma.sync is as fast (tuned for head_dim 64 / 80, "
                "64-key rows, whole key rows at head_dim 64)"]
    return []


def config(p, dev, fused: bool, options: dict) -> Config:
    hd = pad16((p.D + 7) // 8 * 8)
    b = _bias(p)
    kind = "whole_row" if b == Bias.WHOLE_ROW else "rows"
    nwg, bn = tuning.WG.get((hd, kind), (1, 64))
    if b == Bias.WHOLE_ROW:
        bn = p.k_size[1]   # the kernel's WHOLE_ROW takes k_w == bn
        if _misaligned(hd, bn):
            b, bn = Bias.GENERIC, 64
    c = Config(nwg, bn, b)
    if options:
        c = dataclasses.replace(c, **options)
        if "bias" not in options:   # a forced tile that is not a key row: the generic bias
            if (c.bias == Bias.KEY_ROWS and c.bn % 64) or (c.bias == Bias.WHOLE_ROW and c.bn != p.k_size[1]):
                c = dataclasses.replace(c, bias=Bias.GENERIC)
    return c


def _misaligned(hd: int, bn: int) -> bool:
    """A K / V tile of bn keys that does not keep the next tile on the 1024
    bytes the 128-byte swizzle's atoms need (head_dim 64 and 80 are swizzled;
    at 80 a tile is bn * 160 bytes)."""
    return hd in (64, 80) and (bn * hd * 2) % 1024 != 0


def config_reasons(p, c: Config) -> list[str]:
    hd = pad16((p.D + 7) // 8 * 8)
    kh, kw = p.k_size
    reasons = []
    if c.bn % 16 or not 16 <= c.bn <= 128:
        reasons.append(f"bn {c.bn} (takes multiples of 16 up to 128)")
    elif _misaligned(hd, c.bn):
        reasons.append(f"bn {c.bn} at head_dim {p.D}: tiles of {c.bn * hd * 2} bytes break the swizzled layout's "
                       "1024-byte alignment (head_dim 80 takes bn a multiple of 32)")
    if c.bias == Bias.WHOLE_ROW and c.bn != kw:
        reasons.append(f"bias WHOLE_ROW takes bn == k_w ({kw}), got bn {c.bn}")
    if c.bias == Bias.KEY_ROWS and (kw != 64 or c.bn % 64):
        reasons.append(f"bias KEY_ROWS takes k_w == 64 and bn a multiple of 64, got k_w {kw}, bn {c.bn}")
    need = smem_bytes(hd, c, kh, kw)
    if need > _build.MAX_SMEM_SM90:
        reasons.append(f"{need} bytes of shared memory (at most {_build.MAX_SMEM_SM90})")
    return reasons


def kernel_name(dt: int, hd: int, c: Config) -> str:
    return f"relattn_wg<{dt}, {hd}, {c.nwg}, {c.bn}, {int(c.bias)}, {c.stages}>"


def build(p, dev, c: Config, q, k, v, rel_pos_h=None, rel_pos_w=None):
    import numpy as np

    B, H, Sq, D, Sk = p.B, p.H, p.Sq, p.D, p.Sk
    kh, kw = p.k_size
    d8 = (D + 7) // 8 * 8
    hd = pad16(d8)
    (pq, qs), (pk, ks), (pv, vs) = (operand_prep(x, d8, 8) for x in (q, k, v))
    fn = _build.sm90_kernel(kernel_name(p.dt, hd, c))
    smem = smem_bytes(hd, c, kh, kw)
    bm = 64 * c.nwg
    grid = (B * H * ((Sq + bm - 1) // bm),)
    if hd in (64, 80):  # 128-byte swizzle (head_dim 80: of the first 64 columns): 8-row atoms of 1024 bytes
        kq = (16, 1024)    # leading unused (K-major swizzled), stride: next 8 rows
        vv = (8192, 1024)  # N-major swizzled: leading = next 64 columns, stride = next 8 keys
    else:  # no swizzle: core matrices 128 B apart along K, row groups hd * 16 B apart
        kq = (128, hd * 16)
        vv = (hd * 16, 128)  # N-major: leading = next 8 keys, stride = next 8 columns
    tail = core_tail(H, Sq, Sk, d8, kh, kw, (*qs, *ks, *vs)) + (
        np.float32(p.scale * LOG2E), np.float32(1.0 / kw)) + tuple(np.int32(x) for x in (*kq, *vv))
    return launcher(p, fn, grid, (128 * c.nwg,), smem, (pq, pk, pv), tail, ()), None


def launcher(p, fn, grid, block, smem, preps, tail, mid):
    """``run(q, k, v, rel_h, rel_w)`` of the 16-bit kernels that take the
    terms as float32 arrays (relattn_wg, relattn_mma, relattn_win): output
    16-bit, padded to a multiple of 8 columns where head_dim is not."""
    import cupy

    pq, pk, pv = preps
    d8 = (p.D + 7) // 8 * 8
    shape, padded, u16 = (p.B, p.H, p.Sq, p.D), (p.B, p.H, p.Sq, d8) if d8 != p.D else None, cupy.uint16
    terms = terms_prep(p.terms, "float32")

    def run(q, k, v, rel_h, rel_w):
        out = cupy.empty(shape, dtype=q.dtype)
        ou = out.view(u16) if padded is None else cupy.empty(padded, dtype=u16)
        rh, rw = terms(rel_h, rel_w)
        fn(grid, block, (pq(q), pk(k), pv(v), rh, rw, *mid, ou) + tail, shared_mem=smem)
        if padded is not None:
            out.view(u16)[...] = ou[..., :p.D]
        return out

    return run
