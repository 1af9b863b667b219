"""Every tile and configuration choice of the GPU kernels, one line of reason each.

The measurements behind these choices (H100 / H200, CUDA-graph GPU time) are
tabulated in docs/kernels.md. A family's planner reads its entry here; a test
or benchmark that wants another configuration passes it as
``kernel_options``, never by editing this table.
"""

from __future__ import annotations

# relattn_ws (warp-specialised, TMA + wgmma): (nc consumer warpgroups, bn key
# tile, stages, pp (ping-pong of the consumers), rg (register split: registers
# of a consumer thread, 0 = none), mb blocks per SM)
WS = {
    ("rows", 64): (3, 64, 4, 1, 160, 1),     # 64-key rows / no bias, head_dim 64: fastest of the five measured (SAM-B global)
    ("rows", 80): (2, 128, 3, 1, 240, 1),    # head_dim 80: two consumers on 128-key tiles (SAM-H global)
    ("window", 64): (1, 64, 3, 0, 0, 3),     # 16-slot key rows: one consumer, three blocks per SM hide prologues (SAM-B windows)
    ("window", 80): (1, 32, 3, 0, 0, 3),     # head_dim 80 windows: 32-key tiles keep three blocks per SM without spills
    ("row80", 64): (2, 80, 4, 1, 240, 1),    # k_w == 80 (SAM at 1280 px): one 80-key row per tile, rel_w in registers
}

# relattn_wg (wgmma, one or two warpgroups): (nwg, bn), per (head_dim, bias mode)
WG = {
    (64, "rows"): (1, 64),     # head_dim 64: one warpgroup, 64-key tiles beat (2, 128) and mma.sync
    (64, "whole_row"): (1, None),   # k_w in 48/80/96/112/128: a tile is one whole key row (bn = k_w)
    (80, "rows"): (2, 64),     # head_dim 80: two warpgroups share each K/V tile (64 swizzled + 16 plain columns)
}
WG_STAGES = 2                  # double-buffered K/V tiles

# relattn_mma (mma.sync): query rows per warp = 16 * mw
def mma_rows(hd: int, rel_w_in_registers: bool) -> int:
    """mw = 2 halves shared-memory traffic per mma but needs ~255 registers:
    1 above head_dim 80 (spills) and for head_dim <= 64 with rel_w in
    registers (SAM-B global), 2 otherwise (windows, head_dim 80)."""
    return 1 if hd > 80 or (rel_w_in_registers and hd <= 64) else 2


# relattn_win (small grids, whole key grid in shared memory): 16-query slices per block
WIN_SLICES_MAX = 16            # all of a window's slices in one block, at most 16 (registers)

# relattn_wgt (3xTF32 on wgmma): key tile
def wgt_tile(hd: int, window: bool) -> int:
    """32 for 16-slot key rows (224 slots for 196 keys beat 256) and above
    head_dim 64 (registers), 64 otherwise (SAM-B global)."""
    return 32 if (window or hd > 64) else 64


# relattn_tf32's SH variant (8 warps, K / V split once per block): up to this
# padded head_dim (its shared memory: 208 KB at 96), from head_dim 48 (slower
# at 32), when its grid fills the device or the 64-row layout takes more than
# one wave (slower with few blocks)
TF32_SH_MAX_HD = 96
TF32_SH_MIN_HD = 48


# The 16-bit backward on Hopper (relattn_bwd_wg_dq / _dkv, cuda/bwd_wg.cu):
# warpgroups per block, and where dq takes it over bwd.cu's relattn_bwd_dq
# (dk / dv always does: 0.392 against 0.721 ms at SAM-B global, 0.616 against
# 1.074 at SAM-H global, 0.059 against 0.091 in SAM-B's windows; H100 graph time)
def bwd_wg_warpgroups(kind: str, hd: int) -> int:
    """dkv: 2 (two 64-key halves share each query tile: 0.392 vs 0.430 ms
    at SAM-B global, 0.616 vs 0.726 at SAM-H; 0.060 vs 0.059 in the
    windows). dq: 1 at head_dim 64 (0.253 vs 0.269, SAM-B global), 2 at 80
    (0.419 vs 0.504, SAM-H global)."""
    return 2 if kind == "dkv" or hd > 64 else 1


BWD_WG_DQ_MIN_KEYS = 1024   # fewer keys (SAM's windows: 196): bwd.cu's dq, 0.105 vs 0.107 ms (three blocks per SM, not two)
