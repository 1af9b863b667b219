"""relattn_tf32: float32 on the TF32 tensor cores (``mma.sync`` m16n8k8,
compute capability 8.0 and newer). ``split`` 3 is 3xTF32 (big = x rounded to
TF32, small = x - big, three products: float32-level error), 1 plain TF32
(:func:`relattn.set_gpu_float32_mode`). Its ``SH`` variant (8 warps, K / V
split once per block into shared memory) runs where it pays (``tuning``).

3xTF32 is followed by an IEEE-safe second pass (``SAFE``) over the 64-row
blocks the fast pass flagged (a non-finite row sum or output): the fast split
turns inf into inf - inf = NaN, the safe one keeps IEEE semantics.

Bias modes (the kernel's ``REL``):
"""

from __future__ import annotations

import dataclasses
import enum

from .. import _build, tuning
from .._operands import LOG2E, core_tail, operand_prep, pad16, terms_prep

NAME = "tf32"
KERNEL = "relattn_tf32"
DTYPES = ("float32",)


class Bias(enum.IntEnum):
    NONE = 0        # plain attention
    KEY_ROWS = 1    # k_w == 64: rel_w of the tile's key row in registers
    GENERIC = 2     # any grid


__doc__ += "".join(f"\n``{b.name}`` ({b.value})" for b in Bias)


@dataclasses.dataclass(frozen=True)
class Config:
    split: int     # 3: 3xTF32, 1: TF32
    bias: Bias
    sh: int        # the shared-split variant

    def describe(self) -> str:
        return f"split={self.split} bias={self.bias.name} sh={self.sh}"


def smem_bytes(hd: int, sh: int) -> int:
    """Q and two raw K/V stages (rows padded as in the kernel), or with
    ``sh`` 128 Q rows, one raw stage and the split stage (uint4 rows of
    hd / 2 + 4 per key, hd + 2 per key pair)."""
    raw = 64 * (hd + 8) + 64 * (hd + 4)
    if not sh:
        return (64 * (hd + 8) + 2 * raw) * 4
    return (128 * (hd + 8) + raw) * 4 + (64 * (hd // 2 + 4) + 32 * (hd + 2)) * 16


def _hd(p):
    return pad16((p.D + 3) // 4 * 4)


def split_of_mode():
    from relattn.precision import get_gpu_float32_mode

    return {"fma": 0, "tf32": 1, "3xtf32": 3}[get_gpu_float32_mode()]


def not_supported_reasons(p, dev, fused: bool) -> list[str]:
    reasons = []
    if p.dtype != "float32":
        reasons.append(f"dtype {p.dtype} (takes float32)")
    if fused:
        reasons.append("computes no terms: they are given")
    if dev.cc < 80:
        reasons.append(f"compute capability {dev.cc // 10}.{dev.cc % 10} < 8.0 (TF32 mma.sync)")
    if split_of_mode() == 0:
        reasons.append("the GPU float32 mode is 'fma' (relattn.set_gpu_float32_mode)")
    if smem_bytes(_hd(p), 0) > dev.smem_optin:
        reasons.append(f"head_dim {p.D}: {smem_bytes(_hd(p), 0)} bytes of shared memory > {dev.smem_optin}")
    return reasons


def _shared_split(p, dev, hd) -> bool:
    """The SH variant: head_dim 48..96 when its grid (blocks of 128 rows, one
    per SM) fills the device or the 64-row layout would take more than one wave."""
    if hd > tuning.TF32_SH_MAX_HD or smem_bytes(hd, 1) > dev.smem_optin or hd < tuning.TF32_SH_MIN_HD:
        return False
    nb0 = p.B * p.H * ((p.Sq + 63) // 64)
    nb_sh = p.B * p.H * ((p.Sq + 127) // 128)
    per_sm0 = max(1, min(2, dev.smem_optin // smem_bytes(hd, 0)))   # 2 at most: registers
    return nb_sh >= dev.sms or nb0 > dev.sms * per_sm0


def config(p, dev, fused: bool, options: dict) -> Config:
    bias = (Bias.KEY_ROWS if p.k_size[1] == 64 else Bias.GENERIC) if p.terms else Bias.NONE
    split = split_of_mode() or 3
    c = Config(split, bias, int(split == 3 and _shared_split(p, dev, _hd(p))))
    return dataclasses.replace(c, **options) if options else c


def config_reasons(p, c: Config) -> list[str]:
    if c.sh and (c.split != 3 or _hd(p) > tuning.TF32_SH_MAX_HD):
        return ["the SH variant is 3xTF32 up to head_dim 96"]
    return []


def names(hd):
    return {(split, rel, safe, sh): f"relattn_tf32<{hd}, {split}, {rel}, {safe}, {sh}>"
            for split in (1, 3) for rel in (0, 1, 2) for safe in ((0, 1) if split == 3 else (0,))
            for sh in ((0, 1) if split == 3 and not safe and hd <= tuning.TF32_SH_MAX_HD else (0,))}


def safe_pass(p, bias: int):
    """The IEEE-safe second pass of 3xTF32: (function, blocks, threads, shared bytes)."""
    hd = _hd(p)
    smem = smem_bytes(hd, 0)
    fn = _build.portable_kernel(("tf32", hd), names(hd), (3, bias, 1, 0), smem, _build.family_source(NAME))
    return fn, p.B * p.H * ((p.Sq + 63) // 64), 128, smem


def launcher(p, first, split, bias, q, k, v):
    """``run(q, k, v, rel_h, rel_w)``: ``first`` (function, blocks, threads,
    shared bytes), then for 3xTF32 the safe pass; float32 out."""
    import cupy
    import numpy as np

    B, H, Sq, D = p.B, p.H, p.Sq, p.D
    kh, kw = p.k_size
    d4 = (D + 3) // 4 * 4
    preps = [operand_prep(x, d4, 4) for x in (q, k, v)]
    pq, pk, pv = (pr for pr, _ in preps)
    launches = [first] + ([safe_pass(p, bias)] if split == 3 else [])
    nblocks = B * H * ((Sq + 63) // 64)
    tail = core_tail(H, Sq, p.Sk, d4, kh, kw, [s for _, st in preps for s in st]) + (
        np.float32(p.scale * LOG2E), np.float32(1.0 / kw))
    terms = terms_prep(p.terms, "float32")
    shape = (B, H, Sq, D)
    padded = (B, H, Sq, d4) if d4 != D else None
    f32, i32 = cupy.float32, cupy.int32

    def run(q, k, v, rel_h, rel_w):
        out = cupy.empty(shape, dtype=f32)
        of = out if padded is None else cupy.empty(padded, dtype=f32)
        # the safe pass reads the fast pass's flags (one per 64 rows); they need no clearing
        flags = cupy.empty((nblocks,), dtype=i32) if split == 3 else of
        rh, rw = terms(rel_h, rel_w)
        args = (pq(q), pk(k), pv(v), rh, rw, of, flags) + tail
        for fn, grid, nt, sm in launches:
            fn((grid,), (nt,), args, shared_mem=sm)
        if padded is not None:
            out[...] = of[..., :D]
        return out

    return run


def build(p, dev, c: Config, q, k, v, rel_pos_h=None, rel_pos_w=None):
    hd = _hd(p)
    sm = smem_bytes(hd, c.sh)
    if sm > dev.smem_optin:
        return None, f"sh={c.sh}: {sm} bytes of shared memory > {dev.smem_optin} on this device"
    fn = _build.portable_kernel(("tf32", hd), names(hd), (c.split, int(c.bias), 0, c.sh), sm, _build.family_source(NAME))
    nblocks = p.B * p.H * ((p.Sq + (127 if c.sh else 63)) // (128 if c.sh else 64))
    return launcher(p, (fn, nblocks, 256 if c.sh else 128, sm), c.split, int(c.bias), q, k, v), None
