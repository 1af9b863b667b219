"""relattn_wgt: float32 as 3xTF32 on Hopper's ``wgmma`` (m64nNk8 .tf32), one
warpgroup per block, two blocks per SM; K / V split once per block into four
shared-memory operands. Head dims up to 80 with k_w == 64, k_w <= 16 (16-slot
key rows) or no bias. relattn_tf32's IEEE-safe pass follows it.

Bias modes (the kernel's ``REL``):
"""

from __future__ import annotations

import dataclasses
import enum

from .. import _build, tuning
from .._operands import pad16
from . import tf32

NAME = "wgt"
KERNEL = "relattn_wgt"
DTYPES = ("float32",)


class Bias(enum.IntEnum):
    NONE = 0        # plain attention
    KEY_ROWS = 1    # k_w == 64
    WINDOW = 5      # 16-slot key rows (k_w <= 16)


__doc__ += "".join(f"\n``{b.name}`` ({b.value})" for b in Bias)


@dataclasses.dataclass(frozen=True)
class Config:
    hd: int        # head_dim padded to 16
    bn: int        # keys per tile
    bias: Bias

    def describe(self) -> str:
        return f"bn={self.bn} bias={self.bias.name}"


def smem_bytes(hd: int, bn: int) -> int:
    """Raw K tile, raw V rows (padded to 16 banks mod 32), four split operands, alignment."""
    vrow = hd + ((16 - hd % 32) + 32) % 32
    return 5 * bn * hd * 4 + bn * vrow * 4 + 128


def not_supported_reasons(p, dev, fused: bool) -> list[str]:
    reasons = []
    hd = pad16((p.D + 3) // 4 * 4)
    kh, kw = p.k_size
    if not dev.hopper:
        reasons.append(f"Hopper kernels unavailable: {dev.hopper_reason}")
    if p.dtype != "float32":
        reasons.append(f"dtype {p.dtype} (takes float32)")
    if fused:
        reasons.append("computes no terms: they are given")
    if tf32.split_of_mode() != 3:
        reasons.append("the GPU float32 mode is not '3xtf32'")
    if hd > 80:
        reasons.append(f"head_dim {p.D} > 80")
    if p.terms and (kh * kw != p.Sk or not (kw == 64 or kw <= 16)):
        reasons.append(f"k grid {p.k_size}: takes k_w == 64 or k_w <= 16")
    return reasons


def config(p, dev, fused: bool, options: dict) -> Config:
    hd = pad16((p.D + 3) // 4 * 4)
    kw = p.k_size[1]
    bias = (Bias.KEY_ROWS if kw == 64 else Bias.WINDOW) if p.terms else Bias.NONE
    c = Config(hd, tuning.wgt_tile(hd, bias == Bias.WINDOW), bias)
    return dataclasses.replace(c, **options) if options else c


def config_reasons(p, c: Config) -> list[str]:
    if c.bn not in (32, 64) or (c.hd > 64 and c.bn != 32):
        return [f"bn {c.bn}: 32 or 64 (32 above head_dim 64)"]
    return []


def build(p, dev, c: Config, q, k, v, rel_pos_h=None, rel_pos_w=None):
    fn = _build.sm90_kernel(f"relattn_wgt<{c.hd}, {c.bn}, {int(c.bias)}>")
    nblocks = p.B * p.H * ((p.Sq + 63) // 64)
    # the safe pass reads the bias as relattn_tf32 numbers it
    safe_bias = {Bias.NONE: 0, Bias.KEY_ROWS: 1, Bias.WINDOW: 2}[c.bias]
    return tf32.launcher(p, (fn, nblocks, 128, smem_bytes(c.hd, c.bn)), 3, safe_bias, q, k, v), None
