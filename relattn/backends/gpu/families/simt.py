"""relattn_simt: float32 (plain FMA, the ``fma`` float32 mode) and float64,
on the SIMT cores; strided loads, any grid, head_dim up to 128 (float64: 112,
shared memory).

Bias modes (the kernel's ``REL``): ``NONE`` (0), ``GENERIC`` (2).
"""

from __future__ import annotations

import dataclasses
import enum

from .. import _build
from .._operands import LOG2E, core_tail, elem_strides, pad16, terms_prep

NAME = "simt"
KERNEL = "relattn_simt"
DTYPES = ("float32", "float64")


class Bias(enum.IntEnum):
    NONE = 0
    GENERIC = 2


@dataclasses.dataclass(frozen=True)
class Config:
    bias: Bias

    def describe(self) -> str:
        return f"bias={self.bias.name}"


def not_supported_reasons(p, dev, fused: bool) -> list[str]:
    reasons = []
    if p.dtype not in DTYPES:
        reasons.append(f"dtype {p.dtype} (takes float32, float64)")
    if fused:
        reasons.append("computes no terms: they are given")
    if p.dtype == "float64" and pad16(p.D) > 112:
        reasons.append(f"float64 with head_dim {p.D} > 112 does not fit the kernel's shared memory")
    if p.D > 128:
        reasons.append(f"head_dim {p.D} > 128")
    return reasons


def config(p, dev, fused: bool, options: dict) -> Config:
    c = Config(Bias.GENERIC if p.terms else Bias.NONE)
    return dataclasses.replace(c, **options) if options else c


def config_reasons(p, c: Config) -> list[str]:
    return []


def _names(t, hd):
    return {rel: f"relattn_simt<{t}, {hd}, {rel}>" for rel in (0, 2)}


def build(p, dev, c: Config, q, k, v, rel_pos_h=None, rel_pos_w=None):
    import cupy
    import numpy as np

    hd = pad16(p.D)
    kh, kw = p.k_size
    t = "float" if p.dtype == "float32" else "double"
    isz = 4 if t == "float" else 8
    ldt = 64 + 4
    smem = (2 * hd * ldt + 64 * hd + 64 * ldt) * isz
    fn = _build.portable_kernel(("simt", t, hd), _names(t, hd), int(c.bias), smem, _build.family_source(NAME))
    st = [s for x in (q, k, v) for s in elem_strides(x)]
    sc = p.scale * LOG2E
    tail = core_tail(p.H, p.Sq, p.Sk, p.D, kh, kw, st) + (
        np.float32(sc) if t == "float" else np.float64(sc), np.float32(1.0 / kw))
    grid = (p.B * p.H * ((p.Sq + 63) // 64),)
    shape, dtype = (p.B, p.H, p.Sq, p.D), q.dtype
    terms = terms_prep(p.terms, p.dtype)

    def run(q, k, v, rel_h, rel_w):
        out = cupy.empty(shape, dtype=dtype)
        rh, rw = terms(rel_h, rel_w)
        fn(grid, (256,), (q, k, v, rh, rw, out) + tail, shared_mem=smem)
        return out

    return run, None
