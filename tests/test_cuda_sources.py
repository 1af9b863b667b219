"""The CUDA sources and the GPU kernel families' host-side logic, without a GPU.

The kernels themselves are exercised on the GPU machine (tests/test_gpu*.py); here:
the generated wgmma wrappers cover every shape the kernels instantiate, each
family's support, configuration choice and shared-memory sizing (asked with a
fake Hopper or Ampere device and a ``Problem``) are what its launcher expects,
and, where ``nvcc`` is installed, both .cu files compile for sm_90 / sm_90a
with the instantiations the families ask NVRTC for (skipped cleanly without
``nvcc``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import types

import numpy as np
import pytest

from relattn.backends.gpu import _build, _device, _operands, backward, tuning
from relattn.backends.gpu.families import mma, simt, tf32, wg, win, ws
from relattn.backends.gpu.options import Options
from relattn.backends.gpu.problem import Problem

H100 = _device.Device(0, 90, 132, 227 * 1024, None)
A100 = _device.Device(0, 80, 108, 163 * 1024, "compute capability 8.0 is not 9.0 (wgmma needs sm_90a)")


def _problem(D, Sq, Sk, kh, kw, terms=True, q_size=None, tables=None, dtype="bfloat16", B=1, H=1):
    """A problem of head_dim ``D``: Sq queries, Sk keys on a (kh, kw) key grid
    (``terms``: the relative-position bias is present)."""
    return Problem(dtype, B, H, Sq, Sk, D, q_size, (kh, kw), terms, tables, D ** -0.5)


def _fused_problem(q_size, k_size, D=64, dtype="bfloat16"):
    """A problem whose tables of q's 16-bit dtype are given (the terms may be fused)."""
    (qh, qw), (kh, kw) = q_size, k_size
    tables = (dtype, dtype, 2 * max(qh, kh) - 1, 2 * max(qw, kw) - 1)
    return Problem(dtype, 1, 1, qh * qw, kh * kw, D, q_size, k_size, True, tables, D ** -0.5)


def _wg(hd, Sq, Sk, kh, kw, terms, **forced):
    """relattn_wg's configuration as the planner takes it, or None where the
    tuning leaves the problem to relattn_mma or the configuration cannot run;
    ``forced``: the kernel_options of a call with kernel="wg"."""
    p = _problem(hd, Sq, Sk, kh, kw, terms)
    if wg.not_supported_reasons(p, H100, False) or (not forced and wg.tuned_reasons(p)):
        return None
    c = wg.config(p, H100, False, forced)
    return None if wg.config_reasons(p, c) else c


def _ws(hd, Sq, Sk, kh, kw, terms, device=H100, **forced):
    """relattn_ws's configuration with the terms given (or absent), or None
    where it does not serve the problem; ``forced``: kernel_options."""
    p = _problem(hd, Sq, Sk, kh, kw, terms)
    if ws.not_supported_reasons(p, device, False):
        return None
    c = ws.config(p, device, False, forced)
    return None if ws.config_reasons(p, c) else c


def test_wrappers_cover_every_tile_and_head_dim():
    src = _build.wgmma_wrappers()
    for dt in (0, 1):
        for n in _build.WG_NS:
            assert f"template <> struct RaWg<{dt}, {n}>" in src
    for n in _build.WT_NS:
        assert f"template <> struct RaWt<{n}>" in src
    # every key tile and padded head dim the 16-bit Hopper kernels instantiate has its wrapper
    for hd, kind in tuning.WG:
        bn = tuning.WG[(hd, kind)][1]
        assert hd in _build.WG_NS and (bn is None or bn in _build.WG_NS)
    assert set(wg.WHOLE_ROW_KW) <= set(_build.WG_NS)
    for nc, bn, *_ in tuning.WS.values():
        assert bn in _build.WG_NS
    # one wgmma per wrapper, accumulator count = N / 2 registers
    for n in (64, 80, 128):
        m = re.search(rf"m64n{n}k16\.f32\.bf16\.bf16 \{{([^}}]*)\}}, %{n // 2}, %{n // 2 + 1}", src)
        assert m is not None and len(m.group(1).split(",")) == n // 2


def test_source_puts_wrappers_before_the_kernel():
    src = _build.sm90_source()
    assert src.index("struct RaWg<1, 64>") < src.index("relattn_wg(")
    assert src.index("typedef unsigned long long u64;") < src.index("struct RaWg<0, 16>")


def test_choose():
    """relattn_wg's configuration (nwg, bn, bias, stages), and where its tuning
    leaves a problem to relattn_mma."""
    K = wg.Bias
    assert _wg(64, 4096, 4096, 64, 64, True) == wg.Config(1, 64, K.KEY_ROWS, 2)        # SAM-B/L global
    assert _wg(64, 4096, 4096, 1, 4096, False) == wg.Config(1, 64, K.NONE, 2)          # plain attention
    assert _wg(80, 4096, 4096, 64, 64, True) == wg.Config(2, 64, K.KEY_ROWS, 2)        # SAM-H: split tiles
    assert _wg(80, 4096, 4096, 1, 4096, False) == wg.Config(2, 64, K.NONE, 2)
    assert _wg(96, 4096, 4096, 64, 64, True) is None                                   # mma.sync
    assert _wg(64, 196, 196, 14, 14, True) is None                                     # windows: mma.sync
    assert _wg(64, 6400, 6400, 80, 80, True) == wg.Config(1, 80, K.WHOLE_ROW, 2)       # 1280 px: whole key rows
    assert _wg(64, 2304, 1024, 48, 32, True) is None                                   # k_w 32: mma.sync
    assert _wg(80, 6400, 6400, 80, 80, True) is None
    # a forced configuration (kernel="wg", kernel_options nwg, bn, stages)
    assert _wg(64, 196, 196, 14, 14, True, nwg=2, bn=128, stages=3) == wg.Config(2, 128, K.GENERIC, 3)
    assert _wg(64, 6400, 6400, 80, 80, True, nwg=2, bn=128, stages=3) == wg.Config(2, 128, K.GENERIC, 3)  # bn != k_w
    assert _wg(64, 6400, 6400, 80, 80, True, nwg=1, bn=80) == wg.Config(1, 80, K.WHOLE_ROW, 2)
    assert _wg(128, 4096, 4096, 2000, 2000, True, nwg=1, bn=80) is None                # terms cache too large
    # not on a GPU without sm_90a
    assert wg.not_supported_reasons(_problem(64, 4096, 4096, 64, 64), A100, False)


def test_choose_ws():
    """The warp-specialised kernel: head_dim 64 or 80 with k_w == 64, small key
    grids, 80-key rows or no terms; forced configurations."""
    K = ws.Bias
    assert tuning.WS[("rows", 64)] == (3, 64, 4, 1, 160, 1)
    assert tuning.WS[("rows", 80)] == (2, 128, 3, 1, 240, 1)
    assert _ws(64, 4096, 4096, 64, 64, True) == ws.Config(3, 64, K.KEY_ROWS, 4, 1, 160, 1)     # SAM-B global
    assert _ws(80, 4096, 4096, 64, 64, True) == ws.Config(2, 128, K.KEY_ROWS, 3, 1, 240, 1)    # SAM-H global
    assert _ws(64, 1000, 300, 1, 300, False) == ws.Config(3, 64, K.NONE, 4, 1, 160, 1)         # plain attention
    # small key grids in 16-slot key rows (WINDOW): one consumer, three blocks per SM
    assert _ws(64, 196, 196, 14, 14, True) == ws.Config(1, 64, K.WINDOW, 3, 0, 0, 3)          # SAM's windows
    assert _ws(80, 196, 196, 14, 14, True) == ws.Config(1, 32, K.WINDOW, 3, 0, 0, 3)          # 32-key tiles
    assert _ws(64, 300, 100, 10, 10, True) == ws.Config(1, 64, K.WINDOW, 3, 0, 0, 3)
    assert _ws(64, 196, 196, 14, 14, False) == ws.Config(3, 64, K.NONE, 4, 1, 160, 1)          # no terms
    assert _ws(64, 1024, 1024, 32, 32, True) is None                                          # k_w 17..63
    assert _ws(64, 400, 400, 20, 20, True) is None
    assert _ws(64, 196, 195, 14, 14, True) is None                                            # not a k_h x k_w grid
    # kernel="win" on a window: relattn_win serves it
    p = _problem(64, 196, 196, 14, 14)
    assert win.not_supported_reasons(p, H100, False) == []
    assert win.config(p, H100, False, {}) == win.Config(16, 13, 0)
    assert _ws(48, 4096, 4096, 64, 64, True) is None
    assert _ws(96, 4096, 4096, 64, 64, True) is None
    assert _ws(64, 4096, 4096, 64, 64, True, device=A100) is None                             # no sm_90a
    # forced configurations (kernel="ws", kernel_options)
    assert _ws(64, 4096, 4096, 64, 64, True, nc=2, bn=64, stages=4, pp=1, rg=240) == \
        ws.Config(2, 64, K.KEY_ROWS, 4, 1, 240, 1)
    assert _ws(64, 196, 196, 14, 14, True, nc=1, bn=64, stages=3, pp=0, rg=0, mb=3) == \
        ws.Config(1, 64, K.WINDOW, 3, 0, 0, 3)                                                 # blocks per SM
    assert _ws(64, 4096, 4096, 64, 64, True, nc=2, bn=128, stages=8, pp=1, rg=240) is None    # too much shared memory
    assert _ws(64, 4096, 4096, 64, 64, True, persist=0) == ws.Config(3, 64, K.KEY_ROWS, 4, 1, 160, 1, persist=0)
    # kernel="wg" on SAM-B global: relattn_wg's configuration, default or forced
    assert _wg(64, 4096, 4096, 64, 64, True) == wg.Config(1, 64, wg.Bias.KEY_ROWS, 2)
    assert _wg(64, 4096, 4096, 64, 64, True, nwg=1, bn=64) == wg.Config(1, 64, wg.Bias.KEY_ROWS, 2)


def test_ws_80_key_rows_choice():
    """k_w == 80 at head_dim 64 (SAM at 1280 px): one 80-key row per tile; not
    at head_dim 80, not for other grids, and 80-key tiles nowhere else."""
    assert _ws(64, 6400, 6400, 80, 80, True) == ws.Config(2, 80, ws.Bias.KEY_ROWS, *tuning.WS[("row80", 64)][2:])
    assert _ws(80, 6400, 6400, 80, 80, True) is None
    assert _ws(64, 6400, 6399, 80, 80, True) is None                                          # keys not whole rows
    assert _ws(64, 1280, 1280, 20, 64, True, nc=2, bn=80, stages=4, pp=1, rg=240) is None     # 80-key tiles, k_w 64


def test_ws_shared_memory():
    # Q (3 x 64 rows), 4 stages of K and V, alignment; fused: two tables + 3 scratches
    assert ws.smem_bytes(64, 3, 64, 4) == 3 * 64 * 128 + 4 * 2 * 64 * 128 + 1024
    # the whole 128-row scratch where it fits (SAM-B), else two passes over 64 rows (SAM-H)
    assert ws.smem_bytes(64, 3, 64, 4, True) == (ws.smem_bytes(64, 3, 64, 4) + 2 * 128 * 128 + 3 * 64 * 136 * 4)
    assert ws.smem_bytes(80, 2, 128, 3, True) == (ws.smem_bytes(80, 2, 128, 3) + 2 * 128 * 160 + 2 * 64 * 72 * 4)
    assert ws.table_passes(64, 3, 64, 4) == 1 and ws.table_passes(80, 2, 128, 3) == 2
    assert ws.smem_bytes(80, 2, 128, 3) == 2 * 64 * 160 + 3 * 2 * 128 * 160 + 1024
    # 16-slot key rows, fused (FUSED_WINDOW): tables of 32 rows, a 64 x 36 scratch per consumer
    assert ws.smem_bytes(64, 1, 64, 3, True, True) == (ws.smem_bytes(64, 1, 64, 3) + 2 * 32 * 128 + 64 * 36 * 4)
    # FUSED_H72: a 64 x 80 scratch per consumer
    assert ws.smem_bytes(80, 2, 128, 3, True, False, True) == (ws.smem_bytes(80, 2, 128, 3)
                                                               + 2 * 128 * 160 + 2 * 64 * 80 * 4)
    assert ws.MAX_SMEM == _build.MAX_SMEM_SM90 - 1024
    for hd in (64, 80):   # the defaults fit with the fused terms
        nc, bn, st = tuning.WS[("rows", hd)][:3]
        assert ws.smem_bytes(hd, nc, bn, st, True) <= ws.MAX_SMEM
    for hd in (64, 80):   # three blocks of the window defaults fit an SM (228 KB;
        nc, bn, st, _, _, mb = tuning.WS[("window", hd)]   # 1 KB reserved and 8-byte barriers per block)
        per_block = ws.smem_bytes(hd, nc, bn, st, True, True) + 1024 + 8 * (2 * st + 2)
        assert mb * per_block <= 228 * 1024


class _FakeOperand:
    """What operand_prep reads of a CuPy array: shape, dtype, byte strides, base address."""

    def __init__(self, shape, elem_strides, ptr, dtype=np.float16):
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.strides = tuple(s * self.dtype.itemsize for s in elem_strides)
        self.data = types.SimpleNamespace(ptr=ptr)


def test_ws_operands():
    """TMA (relattn_ws) needs 16-byte aligned bases and strides that are
    multiples of 16 bytes: such operands are passed as they are (a uint16
    view), others copied once; head dims that are not a multiple of 8 are
    zero-padded to one; head dims above 80 go to another family."""
    sam_qkv = _FakeOperand((1, 12, 4096, 64), (4096 * 64 * 3 * 12, 64, 3 * 768, 1), 16)
    prep, strides = _operands.operand_prep(sam_qkv, 64, 8)
    assert prep is _operands.u16 and strides == [4096 * 64 * 3 * 12, 64, 3 * 768]
    prep, strides = _operands.operand_prep(_FakeOperand((1, 1, 1, 80), (80, 80, 80, 1), 0), 80, 8)
    assert prep is _operands.u16 and strides == [80, 80, 80]
    dense = [2 * 64 * 64, 64 * 64, 64]
    prep, strides = _operands.operand_prep(_FakeOperand((1, 2, 64, 64), (2 * 64 * 64, 64 * 64, 64, 1), 8), 64, 8)
    assert prep is _operands.u16_copy and strides == dense                # base not 16-byte aligned
    prep, strides = _operands.operand_prep(_FakeOperand((1, 2, 64, 64), (2 * 64 * 68, 64 * 68, 68, 1), 0), 64, 8)
    assert prep is _operands.u16_copy and strides == dense                # row stride not 16 bytes
    prep, strides = _operands.operand_prep(_FakeOperand((1, 2, 64, 60), (2 * 64 * 60, 64 * 60, 60, 1), 0), 64, 8)
    assert prep not in (_operands.u16, _operands.u16_copy) and strides == dense   # head dim 60: padded to 64
    assert ws.not_supported_reasons(_problem(60, 4096, 4096, 64, 64), H100, False) == []
    assert ws.not_supported_reasons(_problem(88, 4096, 4096, 64, 64), H100, False)   # head dim > 80


def test_small_grid_kernel_choice():
    """relattn_win: key rows of k_w <= 32 in 16 / 32 slots, at most 256 slots."""
    p = _problem(64, 196, 196, 14, 14)
    c = win.config(p, H100, False, {})
    assert win.not_supported_reasons(p, H100, False) == [] and c == win.Config(16, 13, 0)
    assert win._smem(p, c) == (2 * 196 + 3) * 72 * 2               # SAM windows: K, V, 3 zero rows
    assert win.config(_problem(64, 4096, 196, 14, 14), H100, False, {}).spb == 16
    assert win.config(_problem(80, 400, 160, 8, 20), H100, False, {}).kwp == 32
    assert win.not_supported_reasons(_problem(64, 4096, 4096, 64, 64), H100, False)   # k_w > 32
    assert win.not_supported_reasons(_problem(64, 289, 272, 17, 16), H100, False)     # 272 slots > 256
    assert win.not_supported_reasons(_problem(64, 196, 196, 14, 14, terms=False), H100, False)   # bias only
    assert win.not_supported_reasons(p, A100, False) == []                             # any GPU from sm_80
    assert win.config(p, H100, False, {"spb": 4}).spb == 4                             # kernel_options spb
    # kernel="mma": the portable kernel serves it too
    assert mma.not_supported_reasons(p, H100, False) == []
    assert mma.config(p, H100, False, {}) == mma.Config(2, mma.Bias.GENERIC)


def test_fused_small_grid_choice():
    """relattn_win with the terms computed inside (fuse 1): 16-slot key rows,
    tables of at most 32 rows after SAM's resize."""
    smem = (2 * 196 + 3) * 72 * 2 + 2 * 32 * 72 * 2 + 4 * 16 * 32 * 4 + 512
    p = _fused_problem((14, 14), (14, 14))
    c = win.config(p, H100, True, {})
    assert win.not_supported_reasons(p, H100, True) == [] and c == win.Config(16, 13, 1)
    assert win._smem(p, c) == smem
    assert smem + 1024 <= 228 * 1024 // 3   # SAM windows: 3 blocks per SM (H100)
    assert win.not_supported_reasons(_fused_problem((16, 16), (5, 11)), H100, True) == []   # q grid 16 x 16
    assert win.not_supported_reasons(_fused_problem((17, 14), (14, 14)), H100, True)       # q_h 17: table of 33 rows
    assert win.not_supported_reasons(_fused_problem((14, 17), (14, 14)), H100, True)
    assert win.not_supported_reasons(_fused_problem((20, 8), (8, 20)), H100, True)         # k_w > 16: 32-slot rows
    assert win.not_supported_reasons(_fused_problem((14, 14), (14, 14), dtype="float32"), H100, True)
    # kernel="win", kernel_options fused=False: the terms computed first
    assert win.not_supported_reasons(p, H100, False) == [] and win.config(p, H100, False, {}).fuse == 0


def test_fused_ws_choice():
    """relattn_ws with the terms computed inside: SAM's global grids (k_w == 64,
    k_h <= 64, tables <= 128 rows) and small grids in 16-slot key rows."""
    p = _fused_problem((64, 64), (64, 64))
    assert ws.not_supported_reasons(p, H100, True) == []
    assert ws.config(p, H100, True, {}) == ws.Config(3, 64, ws.Bias.FUSED, 4, 1, 160, 1)
    p = _fused_problem((64, 64), (64, 64), D=80)
    assert ws.config(p, H100, True, {}) == ws.Config(2, 128, ws.Bias.FUSED_H72, 3, 1, 240, 1)
    assert ws.config(p, H100, True, {"bias": ws.Bias.FUSED}).bias == ws.Bias.FUSED     # forced two passes
    p = _fused_problem((14, 14), (14, 14))
    assert ws.config(p, H100, True, {}) == ws.Config(1, 64, ws.Bias.FUSED_WINDOW, 3, 0, 0, 3)
    assert ws.not_supported_reasons(_fused_problem((65, 64), (65, 64)), H100, True)      # k_h 65
    assert ws.not_supported_reasons(_fused_problem((8, 32), (8, 32)), H100, True)        # k_w 32
    assert ws.not_supported_reasons(_fused_problem((14, 17), (14, 14)), H100, True)      # table of 33 rows
    assert ws.not_supported_reasons(_fused_problem((64, 64), (64, 64), D=60), H100, True)   # head dim % 8


def test_smem_bytes_fit_the_device_limit():
    c = wg.Config(1, 64, wg.Bias.KEY_ROWS)
    assert wg.smem_bytes(64, c, 64, 64) == 64 * 64 * 2 + 4 * 64 * 64 * 2 + 1024
    assert wg.smem_bytes(64, wg.Config(2, 128, wg.Bias.GENERIC, 3), 14, 14) == (
        128 * 64 * 2 + 6 * 128 * 64 * 2 + 1024 + 128 * (28 | 1) * 4)
    assert wg.smem_bytes(64, c, 64, 64) <= _build.MAX_SMEM_SM90


def test_disabled_by_environment(monkeypatch):
    """RELATTN_SM90=0 (read once, at import, into OPTIONS) turns the Hopper kernels off."""
    monkeypatch.setattr(_device, "OPTIONS", Options(cache_dir=_device.OPTIONS.cache_dir, hopper=False))
    assert _device._hopper_reason(90) == "disabled by RELATTN_SM90=0"
    off = _device.Device(0, 90, 132, 227 * 1024, _device._hopper_reason(90))
    p = _problem(64, 4096, 4096, 64, 64)
    for fam in (ws, wg):
        assert any("RELATTN_SM90=0" in r for r in fam.not_supported_reasons(p, off, False))


def _nvcc_compile(tmp_path, source, extra, arch_flags):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    path = tmp_path / "check.cu"
    path.write_text(source + "\n" + extra)
    cmd = [nvcc, *arch_flags, "-std=c++17", "--use_fast_math", "-c", str(path), "-o", str(tmp_path / "check.o")]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:  # pragma: no cover - broken toolchain
        pytest.skip(f"nvcc did not run: {exc}")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "error" not in res.stderr.lower(), res.stderr[-4000:]


def _instantiate(names):
    """Force template instantiation by taking each kernel's address."""
    return "static void* const relattn_check_ptrs[] = {\n" + ",\n".join(
        f"    (void*)&{n}" for n in names) + "\n};\n"


def test_portable_kernels_compile(tmp_path):
    src = _build.portable_source()
    names = [
        # the families' own instantiation names (what they ask NVRTC for)
        mma._names(1, 64)[(1, 1)], mma._names(0, 80)[(2, 2)], mma._names(1, 128)[(0, 1)],
        simt._names("float", 64)[2], simt._names("double", 80)[0],
        tf32.names(64)[(3, 1, 0, 0)], tf32.names(64)[(3, 1, 1, 0)], tf32.names(80)[(1, 2, 0, 0)],
        tf32.names(32)[(3, 0, 1, 0)], tf32.names(128)[(3, 2, 0, 0)],
        tf32.names(64)[(3, 1, 0, 1)], tf32.names(80)[(3, 2, 0, 1)], tf32.names(96)[(3, 0, 0, 1)],
        win._names(64)[(1, 16, 0)], win._names(80)[(0, 32, 0)], win._names(128)[(1, 16, 0)],
        win._names(64)[(1, 16, 1)], win._names(80)[(0, 16, 1)], win._names(128)[(1, 16, 1)],
        # the terms kernels (relattn.backends.gpu.terms)
        "relattn_relterms<1, 64>", "relattn_relterms<2, 16>", "relattn_relterms<0, 32>",
        "relattn_relterms_mma<1, 64, 2>", "relattn_relterms_mma<0, 80, 0>", "relattn_relterms_mma<1, 112, 1>",
        # the fused backward (relattn.backends.gpu.backward)
        *backward._names(1, 64).values(), *backward._names(0, 80).values(), backward._names(1, 32)[("dkv", 2)],
        *backward._names(2, 64).values(), backward._names(2, 80)[("dq", 2)], backward._names(2, 128)[("dkv", 1)],
        backward._names(2, 16)[("stats", 2)],
        # the pullback through the terms (relattn.backends.gpu.backward.terms_dq, tables_pullback)
        "relattn_bwd_terms_side<1, u16, true, 1>", "relattn_bwd_terms_side<2, float, false, 2>",
        "relattn_bwd_terms_grid<0, u16, 8, 1>", "relattn_bwd_terms_grid<2, float, 2, 2>", "relattn_bwd_terms_scatter",
        "relattn_bwd_terms_gather<1, u16>", "relattn_bwd_terms_gather<2, float>",
    ]
    assert names[:3] == ["relattn_mma<1, 64, 1, 1>", "relattn_mma<0, 80, 2, 2>", "relattn_mma<1, 128, 1, 0>"]
    assert "relattn_tf32<96, 3, 0, 0, 1>" in names and "relattn_win<1, 64, 16, 1>" in names
    for n in names:
        kind = n.split("<")[0]
        assert kind in src
    _nvcc_compile(tmp_path, src, _instantiate(names), ["-arch=sm_90"])


def test_hopper_kernel_compiles(tmp_path):
    W, S = wg.Bias, ws.Bias
    names = [wg.kernel_name(1, 64, wg.Config(1, 64, W.KEY_ROWS, 2)), wg.kernel_name(0, 64, wg.Config(1, 64, W.NONE, 2)),
             wg.kernel_name(1, 80, wg.Config(2, 128, W.GENERIC, 3)),
             wg.kernel_name(1, 16, wg.Config(3, 64, W.GENERIC, 2)),
             wg.kernel_name(1, 64, wg.Config(1, 80, W.WHOLE_ROW, 2)),
             wg.kernel_name(0, 64, wg.Config(1, 128, W.WHOLE_ROW, 2)),
             wg.kernel_name(1, 64, wg.Config(1, 48, W.WHOLE_ROW, 2)),
             # the warp-specialised kernel: defaults, fused terms, no terms, other configurations
             ws.kernel_name(1, 64, ws.Config(3, 64, S.KEY_ROWS, 4, 1, 160, 1)),
             ws.kernel_name(1, 64, ws.Config(3, 64, S.FUSED, 4, 1, 160, 1)),
             ws.kernel_name(0, 64, ws.Config(3, 64, S.NONE, 4, 1, 160, 1)),
             ws.kernel_name(1, 80, ws.Config(2, 128, S.FUSED, 3, 1, 240, 1)),
             ws.kernel_name(1, 80, ws.Config(2, 128, S.KEY_ROWS, 3, 1, 240, 1)),
             ws.kernel_name(1, 64, ws.Config(2, 64, S.KEY_ROWS, 2, 0, 0, 1)),
             # 16-slot key rows (small key grids): given and fused terms
             ws.kernel_name(1, 64, ws.Config(2, 64, S.WINDOW, 4, 1, 240, 1)),
             ws.kernel_name(0, 80, ws.Config(2, 64, S.FUSED_WINDOW, 4, 1, 240, 1)),
             ws.kernel_name(1, 64, ws.Config(1, 64, S.FUSED_WINDOW, 3, 0, 0, 3)),
             ws.kernel_name(1, 80, ws.Config(1, 32, S.FUSED_WINDOW, 3, 0, 0, 3)),
             ws.kernel_name(1, 80, ws.Config(2, 128, S.FUSED_H72, 3, 1, 240, 1)),
             # the vjp's forward, which keeps each row's log-sum-exp
             ws.kernel_name(1, 64, ws.Config(3, 64, S.FUSED, 4, 1, 160, 1), lse=True),
             ws.kernel_name(0, 80, ws.Config(2, 64, S.FUSED_WINDOW, 4, 1, 240, 1), lse=True)]
    assert names[0] == "relattn_wg<1, 64, 1, 64, 1, 2>"
    assert names[-3] == "relattn_ws<1, 80, 2, 128, 7, 3, 1, 240, 1, false>"
    assert names[-1] == "relattn_ws<0, 80, 2, 64, 6, 4, 1, 240, 1, true>"
    # the 16-bit backward on wgmma: every bias mode, both head dims, one and two warpgroups
    B = backward.Bias
    bwd = [backward.wg_kernel_name(kind, dt, hd, bias, nwg) for kind in ("dq", "dkv") for dt, hd, bias, nwg in
           ((1, 64, B.KEY_ROWS, 1), (1, 64, B.KEY_ROWS, 2), (0, 80, B.GENERIC, 2), (1, 80, B.NONE, 1))]
    assert bwd[0] == "relattn_bwd_wg_dq<1, 64, 1, 1>" and all(_build.family_of(n) == "bwd_wg" for n in bwd)
    names += bwd
    _nvcc_compile(tmp_path, _build.sm90_source(), _instantiate(names),
                  ["-gencode=arch=compute_90a,code=sm_90a"])


def test_backward_kernel_forms(monkeypatch):
    """Which form runs the fused 16-bit dq and dk / dv kernels, asked on host
    arrays with a fake device: on Hopper the wgmma dk / dv wherever it runs
    and its dq from BWD_WG_DQ_MIN_KEYS keys; bwd.cu's elsewhere (Ampere,
    head_dim outside 56-80); the SIMT kernels for float32; "wg" where it
    cannot run and an unknown value are ValueErrors naming why."""
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    device = [H100]
    monkeypatch.setattr(_device, "current", lambda: device[0])
    forms = backward.kernel_forms

    def arrays(S, d, dtype=bf16, Sk=None):
        return (np.zeros((1, 2, S, d), dtype), np.zeros((1, 2, Sk or S, d), dtype),
                np.zeros((1, 2, Sk or S, d), dtype))

    terms = np.zeros(1)   # rel_h stands for "the terms are given"; only its presence counts
    assert forms(*arrays(4096, 64), terms, (64, 64)) == {"dq": "wg", "dkv": "wg"}        # SAM-B global
    assert forms(*arrays(196, 64), terms, (14, 14)) == {"dq": "mma", "dkv": "wg"}        # SAM-B windows
    assert forms(*arrays(4096, 80), terms, (64, 64)) == {"dq": "wg", "dkv": "wg"}        # SAM-H global
    assert forms(*arrays(196, 64), terms, (14, 14), "wg") == {"dq": "wg", "dkv": "wg"}
    assert forms(*arrays(4096, 64), terms, (64, 64), "mma") == {"dq": "mma", "dkv": "mma"}
    assert forms(*arrays(99, 72, Sk=91), terms, (13, 7)) == {"dq": "mma", "dkv": "wg"}   # 72: padded to 80
    assert forms(*arrays(4096, 32), None, None) == {"dq": "mma", "dkv": "mma"}           # head_dim 32
    assert forms(*arrays(196, 64, np.float32), terms, (14, 14)) == {"dq": "simt", "dkv": "simt"}
    with pytest.raises(ValueError, match="kernels='wg' cannot take this problem: head_dim 32"):
        forms(*arrays(4096, 32), None, None, "wg")
    with pytest.raises(ValueError, match="kernels: expected 'auto', 'mma' or 'wg', got 'fast'"):
        forms(*arrays(4096, 64), terms, (64, 64), "fast")
    device[0] = A100
    assert forms(*arrays(4096, 64), terms, (64, 64)) == {"dq": "mma", "dkv": "mma"}
    with pytest.raises(ValueError, match="Hopper kernels unavailable: compute capability 8.0"):
        forms(*arrays(4096, 64), terms, (64, 64), "wg")


def test_backward_wg_shared_memory():
    """The wgmma backward's shared bytes, from bwd_wg.cu's layouts: SAM's
    shapes fit the H100 (SAM-B global: dq 83 KB, two blocks per SM; dk / dv
    101 KB); a generic grid of 256 terms at head_dim 80 does not, and is
    turned away naming the kernel."""
    B = backward.Bias
    tile = 64 * 64 * 2   # a 64-row tile at head_dim 64, bytes
    assert backward._wg_smem("dq", 64, B.KEY_ROWS, 64, 64, 1) == 1024 + 2 * tile + 4 * tile + 64 * (64 + 72) * 4
    assert backward._wg_smem("dkv", 64, B.KEY_ROWS, 64, 64, 2) == 1024 + 4 * tile + 4 * tile + 2 * (128 + 64 * 70) * 4
    assert backward._wg_key_columns(B.GENERIC, 14, 14, 2) == 11 and backward._wg_key_columns(B.KEY_ROWS, 64, 64, 2) == 2
    for hd, (kh, kw) in ((64, (64, 64)), (64, (14, 14)), (80, (64, 64)), (80, (14, 14))):
        bias = B.KEY_ROWS if kw == 64 else B.GENERIC
        for kind in ("dq", "dkv"):
            assert backward._wg_smem(kind, hd, bias, kh, kw, tuning.bwd_wg_warpgroups(kind, hd)) <= H100.smem_optin
    assert backward._wg_reasons("bfloat16", "bfloat16", "bfloat16", (1, 1, 4096, 64), (1, 1, 4096, 64),
                                (1, 1, 4096, 64), (64, 64), H100) == ()
    why = backward._wg_reasons("bfloat16", "bfloat16", "bfloat16", (1, 1, 400, 80), (1, 1, 128 * 128, 80),
                               (1, 1, 128 * 128, 80), (128, 128), H100)
    assert len(why) == 1 and "bytes of shared memory per dq block" in why[0]


def test_tf32_shared_split_choice():
    """When float32 (3xTF32) takes relattn_tf32's SH variant (8 warps, one split
    per block): head_dim 48..96 with a grid that fills the device, or where
    the 64-row layout would need more than one wave; kernel_options sh forces."""
    def choose(hd, BH, Sq, dev=H100):
        return tf32._shared_split(_problem(hd, Sq, Sq, 1, Sq, dtype="float32", H=BH), dev, hd)

    assert choose(64, 12, 4096)          # SAM-B global
    assert choose(80, 16, 4096)          # SAM-H global
    assert choose(64, 300, 196)          # SAM-B windows
    assert not choose(32, 16, 4096)      # head_dim 32: measured slower
    assert not choose(96, 8, 1024)       # half the SMs idle; the 64-row grid fits one wave
    assert choose(96, 4, 3136)           # the 64-row grid needs 2 waves (1 block per SM)
    assert not choose(64, 8, 1024)       # 2 blocks per SM of the 64-row layout: one wave
    assert choose(64, 132, 128)          # 128-row blocks fill the SMs
    assert not choose(112, 100, 12800)   # shared memory too small
    # the configuration: SH as chosen, or forced by kernel_options sh (3xTF32 up to head_dim 96)
    for hd in (16, 96, 112):
        p = _problem(hd, 2, 2, 1, 2, dtype="float32")
        c = tf32.config(p, H100, False, {"sh": 1})
        assert c.sh == 1 and (tf32.config_reasons(p, c) == []) == (hd <= 96)
    p = _problem(64, 4096, 4096, 64, 64, dtype="float32", H=12)
    assert tf32.config(p, H100, False, {}).sh == 1
    assert tf32.config(p, H100, False, {"sh": 0}).sh == 0
    # a device with less shared memory per block (A100: 163 KB): never a layout that does not fit
    assert tf32.smem_bytes(64, 1) <= A100.smem_optin < tf32.smem_bytes(80, 1) <= tf32.smem_bytes(96, 1)
    assert choose(64, 12, 4096, A100) and not choose(80, 16, 4096, A100)
    # shared memory of either layout as the kernel lays it out
    assert tf32.smem_bytes(64, 0) == (64 * 72 + 2 * (64 * 72 + 64 * 68)) * 4
    assert tf32.smem_bytes(80, 1) == (128 * 88 + 64 * 88 + 64 * 84) * 4 + (64 * 44 + 32 * 82) * 16
    assert tf32.smem_bytes(96, 1) <= 227 * 1024 < tf32.smem_bytes(112, 1)


def test_rel_h_one_pass():
    """relattn_ws FUSED_H72 (rel_h of the fused terms in one pass of 72 table
    rows): where the tables take two passes (head_dim 80) and every 64-row
    warpgroup's rel_h rows lie in 72 rows from the kernel's base."""
    sam_h = ws.Config(2, 128, ws.Bias.FUSED, 3, 1, 240, 1)

    def one_pass(hd, c, qh, kh, qw):
        return ws._rel_h_one_pass(_fused_problem((qh, qw), (kh, 64), D=hd), hd, c)

    assert one_pass(80, sam_h, 64, 64, 64)                 # SAM-H: one query row per warpgroup
    assert one_pass(80, sam_h, 64, 64, 32)                 # two query rows: 65 table rows
    assert one_pass(80, sam_h, 9, 5, 64)                   # q / k grids of different sizes
    assert not one_pass(80, sam_h, 64, 64, 4)              # 16 query rows: 78 table rows
    assert not one_pass(64, ws.Config(3, 64, ws.Bias.FUSED, 4, 1, 160, 1), 64, 64, 64)   # one pass already
    # the configuration: FUSED_H72 where it applies, unless kernel_options bias forces FUSED
    p = _fused_problem((64, 64), (64, 64), D=80)
    assert ws.config(p, H100, True, {}).bias == ws.Bias.FUSED_H72
    assert ws.config(p, H100, True, {"bias": ws.Bias.FUSED}).bias == ws.Bias.FUSED
    assert ws.config(_fused_problem((64, 4), (64, 64), D=80), H100, True, {}).bias == ws.Bias.FUSED
