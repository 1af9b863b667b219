"""relattn_mma: the portable tensor-core kernel (``mma.sync`` m16n8k16,
compute capability 8.0 and newer), float16 / bfloat16 with float32
accumulation; any head_dim up to 128, any grid. The fallback of the 16-bit
families.

Bias modes (the kernel's ``REL``):
"""

from __future__ import annotations

import dataclasses
import enum

from .. import _build, tuning
from .._operands import LOG2E, core_tail, operand_prep, pad16
from .wg import launcher

NAME = "mma"
KERNEL = "relattn_mma"
DTYPES = ("float16", "bfloat16")
MAX_HEAD_DIM = 128


class Bias(enum.IntEnum):
    NONE = 0        # plain attention
    KEY_ROWS = 1    # k_w == 64 (whole 64-key tiles of one key row): rel_w in registers
    GENERIC = 2     # any grid: the terms of each key tile looked up per key


__doc__ += "".join(f"\n``{b.name}`` ({b.value})" for b in Bias)


@dataclasses.dataclass(frozen=True)
class Config:
    mw: int        # 16-row mma tiles per warp (query rows per block = 64 * mw)
    bias: Bias

    def describe(self) -> str:
        return f"mw={self.mw} bias={self.bias.name}"


def not_supported_reasons(p, dev, fused: bool) -> list[str]:
    reasons = []
    if p.dtype not in DTYPES:
        reasons.append(f"dtype {p.dtype} (takes {', '.join(DTYPES)})")
    if p.D > MAX_HEAD_DIM:
        reasons.append(f"head_dim {p.D} > {MAX_HEAD_DIM}")
    if fused:
        reasons.append("computes no terms: they are given")
    if dev.cc < 80:
        reasons.append(f"compute capability {dev.cc // 10}.{dev.cc % 10} < 8.0 (mma.sync bf16)")
    return reasons


def config(p, dev, fused: bool, options: dict) -> Config:
    kw = p.k_size[1]
    bias = (Bias.KEY_ROWS if (kw == 64 and p.Sk % 64 == 0) else Bias.GENERIC) if p.terms else Bias.NONE
    hd = pad16((p.D + 7) // 8 * 8)
    c = Config(tuning.mma_rows(hd, bias == Bias.KEY_ROWS), bias)
    return dataclasses.replace(c, **options) if options else c


def config_reasons(p, c: Config) -> list[str]:
    return []


def _names(dt, hd):
    return {(rel, mw): f"relattn_mma<{dt}, {hd}, {mw}, {rel}>" for rel in (0, 1, 2) for mw in (1, 2)}


def build(p, dev, c: Config, q, k, v, rel_pos_h=None, rel_pos_w=None):
    import numpy as np

    d8 = (p.D + 7) // 8 * 8
    hd = pad16(d8)
    kh, kw = p.k_size
    preps = [operand_prep(x, d8, 8) for x in (q, k, v)]
    smem = 2 * 2 * 64 * (hd + 8) * 2
    if c.bias == Bias.KEY_ROWS and c.mw == 2:
        smem += 64 * c.mw * 72 * 4
    bm = 64 * c.mw
    fn = _build.portable_kernel(("mma", p.dt, hd), _names(p.dt, hd), (int(c.bias), c.mw), smem, _build.family_source(NAME))
    strides = [s for _, st in preps for s in st]
    tail = core_tail(p.H, p.Sq, p.Sk, d8, kh, kw, strides) + (np.float32(p.scale * LOG2E), np.float32(1.0 / kw))
    grid = (p.B * p.H * ((p.Sq + bm - 1) // bm),)
    return launcher(p, fn, grid, (128,), smem, [pr for pr, _ in preps], tail, ()), None
