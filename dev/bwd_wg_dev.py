"""The fused 16-bit backward's dq and dk / dv kernels on Hopper's warpgroup
products (cuda/bwd_wg.cu: relattn_bwd_wg_dq / _dkv, one and two warpgroups
per block) against their mma.sync forms (cuda/bwd.cu).

    python3 dev/bwd_wg_dev.py --nvcc            # offline: nvcc sm_90a, registers and spills per instantiation,
                                                # bwd.cu's and bwd_wg.cu's (with cuobjdump: each tile loop's
                                                # instructions and, for wgmma, its order of products, waits,
                                                # exponentials and packs, as dev/sass_dev.py prints them)
    python3 dev/bwd_wg_dev.py                   # GPU: every case checked, then the SAM cases timed
    python3 dev/bwd_wg_dev.py --check           # GPU: the checks only
    python3 dev/bwd_wg_dev.py --time            # GPU: the timings only

The check runs bwd.cu's row pass (each row's lse2 and the exact delta), then
both kernel pairs on the same lse2 / delta, and compares every gradient
(within 2e-3 in norm; the two compute the same products in the same order,
and on an H100 gave the same bits on every case). Shapes: SAM-B global and windowed (head_dim 64,
key rows of 64 and the generic mode), SAM-H global (head_dim 80), and small
grids with q grid != k grid, partial tiles, head_dim 72 (padded to 80), no
terms. Timings are graph replays of each kernel alone (median of batches),
CUDA events, one process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

ARGS = {
    "dq": "const u16*, const u16*, const u16*, const u16*, const float*, const float*, const float*, const float*,"
          " float*, float*, float*, int, int, int, int, int, float, float, float",
    "dkv": "const u16*, const u16*, const u16*, const u16*, const float*, const float*, const float*, const float*,"
           " u16*, u16*, int, int, int, int, int, float, float, float, int",
}
# (name, B, H, q grid, k grid, head_dim, terms)
CASES = [
    ("sam-b-global", 1, 12, (64, 64), (64, 64), 64, True),
    ("sam-b-window", 25, 12, (14, 14), (14, 14), 64, True),
    ("sam-h-global", 1, 16, (64, 64), (64, 64), 80, True),
    ("q9x11-k13x7", 2, 3, (9, 11), (13, 7), 64, True),
    ("q10x10-d80", 1, 2, (10, 10), (10, 10), 80, True),
    ("q3x50-k2x64", 1, 2, (3, 50), (2, 64), 64, True),    # key rows of 64 (KEY_ROWS), 150 query rows
    ("q8x8-d72", 2, 2, (8, 8), (8, 8), 72, True),
    ("q12x12-none", 1, 3, (12, 12), (9, 9), 64, False),
]
TIMED = ("sam-b-global", "sam-b-window", "sam-h-global")


def source(family="bwd_wg") -> str:
    from relattn.backends.gpu import _build

    return _build.family_source(family)


def nvcc_report(configs):
    """Each instantiation built with nvcc for sm_90a: ptxas's registers, spills
    and wgmma notes. configs: (kind, dt, hd, rel, nwg), nwg 0 for bwd.cu's
    mma.sync form."""
    from relattn.backends.gpu import _build
    from relattn.backends.gpu.backward import _names, wg_kernel_name

    sys.path.insert(0, HERE)
    import sass_dev

    def name(kind, dt, hd, rel, nwg):
        return wg_kernel_name(kind, dt, hd, rel, nwg) if nwg else _names(dt, hd)[(kind, rel)]

    srcs = {"bwd_wg": source(), "bwd": source("bwd")}
    opts = [o for o in _build.SM90_OPTIONS if not o.startswith("-arch")]
    cuobjdump = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    with tempfile.TemporaryDirectory() as work:
        for kind, dt, hd, rel, nwg in configs:
            cu = os.path.join(work, "k.cu")
            with open(cu, "w") as f:
                f.write(srcs["bwd_wg" if nwg else "bwd"]
                        + f"\ntemplate __global__ void {name(kind, dt, hd, rel, nwg)}({ARGS[kind]});\n")
            r = subprocess.run(["nvcc", "-gencode=arch=compute_90a,code=sm_90a", *opts, "-c", "-Xptxas", "-v", cu,
                                "-o", os.path.join(work, "k.o")], capture_output=True, text=True)
            if r.returncode:
                sys.exit(r.stderr[-6000:])
            regs = re.findall(r"Used (\d+) registers", r.stderr)
            spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
            notes = sorted(set(re.findall(r"\(C75\d\d\)", r.stderr)))
            print(f"{name(kind, dt, hd, rel, nwg)}: {regs[-1] if regs else '?'} registers, "
                  f"spills {spill[-1] if spill else '?'} {' '.join(notes)}")
            if cuobjdump:
                sass = subprocess.run([cuobjdump, "-sass", os.path.join(work, "k.o")], capture_output=True,
                                      text=True).stdout
                sass_dev.loops(sass)


# ------------------------------------------------------------------ GPU
class Problem:
    """One case's operands, bwd.cu's row pass and its gradients (the reference), and launchers."""

    def __init__(self, case, seed=0):
        import cupy
        import numpy as np

        from relattn.backends.gpu import backward as bw

        from bench_gpu_dev import make

        _, B, H, qg, kg, d, terms = case
        q, k, v, rh, rw = make(B, H, qg, kg, d, "bfloat16", seed)
        dout = make(B, H, qg, qg, d, "bfloat16", seed + 1)[0]
        if not terms:
            rh = rw = None
        self.Sq, self.Sk, self.d = qg[0] * qg[1], kg[0] * kg[1], d
        self.pairs = B * H
        self.f = bw._Fused.of(q, rh, kg, self.Sk)
        self.bias, self.kh, self.kw = self.f.bias, self.f.kh, self.f.kw
        rh3, rw3 = bw._terms32(rh, rw)
        self.ops = [self.f.operand(x) for x in (q, k, v, dout)] + [rh3, rw3]
        f32 = np.float32
        scale = d ** -0.5
        self.tail = tuple(np.int32(n) for n in (self.Sq, self.Sk, d, self.kh, self.kw)) + (
            f32(scale * bw._LOG2E), f32(1.0 / self.kw), f32(scale))
        self.lse = cupy.empty((self.pairs, self.Sq), dtype=f32)
        self.delta = cupy.empty((self.pairs, self.Sq), dtype=f32)
        self.f.launch("rows", self.pairs * -(-self.Sq // 64), (*self.ops, self.lse, self.delta) + self.tail[:-1])
        self.ref = self.run_ref()

    def _outs(self):
        import cupy
        import numpy as np

        p, Sq, Sk, d = self.pairs, self.Sq, self.Sk, self.d
        o = {"dq": cupy.full((p, Sq, d), np.nan, np.float32),
             "dk": cupy.zeros((p, Sk, d), np.uint16), "dv": cupy.zeros((p, Sk, d), np.uint16)}
        if self.bias:
            o["d_rel_h"] = cupy.full((p, Sq, self.kh), np.nan, np.float32)
            o["d_rel_w"] = cupy.full((p, Sq, self.kw), np.nan, np.float32)
        else:
            o["d_rel_h"] = o["d_rel_w"] = cupy.zeros((1,), np.float32)
        return o

    def dq_args(self, o):
        return (*self.ops, self.lse, self.delta, o["dq"], o["d_rel_h"], o["d_rel_w"]) + self.tail

    def dkv_args(self, o, nh=None):
        """relattn_bwd_dkv's arguments (with its nh); launch_wg appends the wgmma kernel's."""
        import numpy as np

        args = (*self.ops, self.lse, self.delta, o["dk"], o["dv"]) + self.tail
        return args if nh is None else args + (np.int32(nh),)

    def run_ref(self):
        o = self._outs()
        self.ref_dq = lambda: self.f.launch("dq", self.pairs * -(-self.Sq // 64), self.dq_args(o))
        self.ref_dkv = lambda: self.f.launch("dkv", self.pairs * -(-self.Sk // 64), self.dkv_args(o, self.f.nh))
        self.ref_dq()
        self.ref_dkv()
        return o

    def wg_launchers(self, nwg):
        o = self._outs()
        qargs, kargs = self.dq_args(o), self.dkv_args(o)
        run_dq = lambda: self.f.launch_wg("dq", self.pairs, self.Sq, qargs, nwg)
        run_dkv = lambda: self.f.launch_wg("dkv", self.pairs, self.Sk, kargs, nwg)
        return o, run_dq, run_dkv


def bf16_to_f32(x):
    import cupy

    return (x.astype(cupy.uint32) << 16).view(cupy.float32)


def compare(got, ref):
    """(max |got - ref| / max |ref|, ||got - ref|| / ||ref||, all finite) of two gradients."""
    import cupy

    if got.dtype == cupy.uint16:
        got, ref = bf16_to_f32(got), bf16_to_f32(ref)
    g, r = got.astype(cupy.float64), ref.astype(cupy.float64)
    finite = bool(cupy.isfinite(g).all())
    scale = float(cupy.abs(r).max()) or 1.0
    return (float(cupy.abs(g - r).max()) / scale, float(cupy.linalg.norm(g - r) / (cupy.linalg.norm(r) or 1.0)),
            finite)


def check(nwgs, cases):
    bad = 0
    for case in cases:
        pr = Problem(case)
        for nwg in nwgs:
            o, run_dq, run_dkv = pr.wg_launchers(nwg)
            run_dq()
            run_dkv()
            import cupy

            cupy.cuda.Device().synchronize()
            for key in ("dq", "dk", "dv") + (("d_rel_h", "d_rel_w") if pr.bias else ()):
                mx, nrm, fin = compare(o[key], pr.ref[key])
                ok = fin and nrm < 2e-3 and mx < 2e-2
                bad += not ok
                print(f"{case[0]:>14} nwg {nwg} {key:>8}: max {mx:.2e} norm {nrm:.2e}"
                      f"{'' if fin else ' NON-FINITE'} {'ok' if ok else 'FAIL'}", flush=True)
    print(f"check: {'all ok' if not bad else f'{bad} FAILED'}")
    return bad


def timings(nwgs, cases):
    from bench_gpu_dev import graph_time_cupy

    for case in cases:
        pr = Problem(case)
        row = [f"{case[0]}: bwd.cu dq {graph_time_cupy(pr.ref_dq):.4f} dkv {graph_time_cupy(pr.ref_dkv):.4f}"]
        for nwg in nwgs:
            _, run_dq, run_dkv = pr.wg_launchers(nwg)
            row.append(f"wg{nwg} dq {graph_time_cupy(run_dq):.4f} dkv {graph_time_cupy(run_dkv):.4f}")
        print(" | ".join(row) + " (ms, graph)", flush=True)


def main(argv):
    if "--nvcc" in argv:
        cfgs = [(kind, 1, hd, rel, nwg) for hd in (64, 80) for rel in (1, 2) for nwg in (0, 1, 2)
                for kind in ("dq", "dkv")]
        nvcc_report(cfgs)
        return 0
    sys.path.insert(0, HERE)
    nwgs = (1, 2)   # warpgroups per block
    do_check, do_time = "--time" not in argv, "--check" not in argv
    bad = check(nwgs, CASES) if do_check else 0
    if do_time:
        timings(nwgs, [c for c in CASES if c[0] in TIMED])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
