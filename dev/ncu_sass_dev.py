"""Where a relattn_ws kernel stalls, per SASS instruction (on a Hopper
GPU). Profiles one fused SAM call with Nsight Compute's warp-state
sampling and prints the instructions with the most stall samples:

    PYTHONPATH=$PWD python3 dev/ncu_sass_dev.py [B-window|B-global|H-global] [top]

(It re-runs itself under `ncu`; the report goes to $OUT or /tmp.)
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys

CASES = {"B-window": (25, 12, 14, 64), "B-global": (1, 12, 64, 64), "H-global": (1, 16, 64, 80)}


def workload(case):
    import cupy

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_gpu_dev import make, tables

    import relattn

    B, H, g, d = CASES[case]
    q, k, v, _, _ = make(B, H, (g, g), (g, g), d, "bfloat16")
    th, tw = tables(cupy.random.RandomState(0), (g, g), (g, g), d, "bfloat16")
    for _ in range(3):
        relattn.rel_pos_attention(q, k, v, th, tw, (g, g))
    cupy.cuda.Device().synchronize()


def _num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def main(case, top):
    rep = os.path.join(os.environ.get("OUT", "/tmp"), f"ncu_{case}")
    if not os.environ.get("NCU_REUSE"):
        subprocess.run(["ncu", "-f", "-o", rep, "-k", "regex:relattn_ws", "-s", "2", "-c", "1",
                        "--section", "WarpStateStats", "--section", "SourceCounters", "--section", "LaunchStats",
                        "--section", "Occupancy", sys.executable, os.path.abspath(__file__), "--work", case],
                       check=True, capture_output=True)
    out = subprocess.run(["ncu", "-i", rep + ".ncu-rep", "--page", "source", "--csv", "--print-source", "sass"],
                         check=True, capture_output=True, text=True).stdout
    with open(rep + "_source.csv", "w") as f:
        f.write(out)
    rows = list(csv.reader(io.StringIO(out[out.index('"'):])))
    # the table's header: the first row naming the SASS source column
    h = next(i for i, r in enumerate(rows) if "Source" in r or "Address" in r)
    head, body = rows[h], rows[h + 1:]
    col = {name: i for i, name in enumerate(head)}
    print(f"[ncu] columns: {head}")
    samp = next((i for n, i in col.items() if "Sampling (All" in n), None)
    if samp is None:
        samp = next(i for n, i in col.items() if "Sampl" in n or "Stall" in n)
    nosel = next((i for n, i in col.items() if "Sampling (Not" in n), None)
    src = col.get("Source", 1)
    total = sum(_num(r[samp]) for r in body if len(r) > samp)
    print(f"[ncu] {case}: {len(body)} SASS lines, {total:.0f} stall samples ({head[samp]})")
    ranked = sorted(range(len(body)), key=lambda i: -_num(body[i][samp]) if len(body[i]) > samp else 0)
    for i in ranked[:top]:
        r = body[i]
        ns = f" not-issued {_num(r[nosel]):.0f}" if nosel is not None else ""
        print(f"{i:5d} {_num(r[samp]) / total:6.1%}{ns}  {r[src][:90]}")
    # the same by opcode
    by_op = {}
    for r in body:
        if len(r) > samp:
            op = r[src].split()[0] if r[src].split() else "?"
            if op.startswith("@"):
                op = r[src].split()[1]
            by_op[op.split(".")[0]] = by_op.get(op.split(".")[0], 0) + _num(r[samp])
    print("[ncu] by opcode: " + ", ".join(f"{k} {v / total:.1%}" for k, v in
                                          sorted(by_op.items(), key=lambda kv: -kv[1])[:16]))
    raw = subprocess.run(["ncu", "-i", rep + ".ncu-rep", "--page", "details", "--csv"],
                         capture_output=True, text=True).stdout
    for line in raw.splitlines():
        if any(k in line for k in ("Stall", "Warp Cycles Per Issued", "Achieved Active Warps", "Duration")):
            print("[ncu]", ",".join(line.split(",")[-4:])[:160])


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--work":
        workload(sys.argv[2])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "B-window", int(sys.argv[2]) if len(sys.argv) > 2 else 40)
