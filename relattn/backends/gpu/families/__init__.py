"""The GPU kernel families, one module each, and the order they are tried in.

A family module declares ``NAME``, ``KERNEL`` (the CUDA template), its bias
modes (an ``enum``) and ``Config`` (a frozen dataclass), and answers:

``not_supported_reasons(problem, device, fused) -> list[str]``
    what it cannot do (empty: it can), ``fused`` meaning the kernel would
    compute the relative-position terms itself from the tables;
``tuned_reasons(problem) -> list[str]`` (optional)
    where it can run but the tuning leaves the problem to a later family;
    skipped when the family is forced;
``config(problem, device, fused, overrides) -> Config``
    its configuration (``tuning``), with a forced call's overrides applied;
``config_reasons(problem, config) -> list[str]``
    what is wrong with a (forced) configuration;
``build(problem, device, config, q, k, v, rel_pos_h, rel_pos_w) -> (run, why)``
    the launch: ``run(q, k, v, x, y)`` with x, y the terms (or the tables when
    fused), or ``(None, why)`` when these arrays cannot be served;
``WRITES_LSE`` (optional, default False)
    its ``run`` also takes ``lse=``, a float32 (B, H, Sq) array that receives
    each row's log-sum-exp (log2 domain) for the fused backward.

Adding a family is one module and one entry in ``PRIORITY``.
"""

from __future__ import annotations

from . import mma, simt, tf32, wg, wgt, win, ws

FAMILIES = {m.NAME: m for m in (ws, win, wg, mma, wgt, tf32, simt)}

# First that serves the problem wins; for 16-bit inputs every family is asked
# to compute the terms itself first, then to take them computed.
PRIORITY = {
    "float16": (ws, win, wg, mma),     # Hopper warp-specialised, small grids, Hopper wgmma, mma.sync
    "bfloat16": (ws, win, wg, mma),
    "float32": (wgt, tf32, simt),      # 3xTF32 on wgmma, on mma.sync, plain FMA
    "float64": (simt,),
}
