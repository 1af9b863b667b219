"""Offline look at relattn_ws instantiations, no GPU needed: compiles them with
nvcc (sm_90a, the package's NVRTC options) and prints, per configuration,
ptxas's registers / spills and its wgmma notes (C7513 / C7515: serialised
products, C7519: an injected arrive), then for each loop that issues products
the order of its wgmmas (G), waits ([wait N]), exponentials (E), P packs (p)
and instruction count, and flags special-register reads (S2R: a thread index
re-read instead of kept in a register) and local-memory spills inside a loop.
It shows, for instance, that ptxas puts the wait for P V (n - 1) before the
softmax's exponentials (it packs P into the registers that product reads, so
it must wait first), and it showed ptxas re-deriving the ping-pong barrier id
from %tid inside the head_dim 80 key loop (an S2R per key tile) until the id
was held in a register.

    python3 dev/sass_dev.py "(1,64,3,64,4,4,1,160,1,False)" ...   # relattn_ws's template arguments
    python3 dev/sass_dev.py --tree <other checkout> "(...)"  # another tree's kernels
    python3 dev/sass_dev.py --dump out.sass "(...)"          # keep the SASS

Needs nvcc and cuobjdump (CUDA 12.3+ for sm_90a): cuobjdump comes with the
toolkit or from PyPI, e.g. `pip download --no-deps nvidia-cuda-cuobjdump` and
unzip the wheel; set CUOBJDUMP to its path if it is not on PATH.
"""

from __future__ import annotations

import ast
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile


def _tree_build(tree: str):
    """(source text, NVRTC options) of the Hopper kernels of a checkout: the
    gpu package's _build, or the older backends/_sm90 module."""
    sys.path.insert(0, tree)
    try:
        from relattn.backends.gpu import _build

        return _build.sm90_source(), _build.SM90_OPTIONS
    except ImportError:
        from relattn.backends import _sm90

        return _sm90.source(), _sm90._OPTIONS


def build(source, options, cfg, workdir: str):
    """One instantiation compiled to an object: (its path, ptxas's output lines)."""
    params = re.search(r"relattn_ws\((.*?)\)\s*\{", source, re.S).group(1)
    cu, obj = os.path.join(workdir, "ws.cu"), os.path.join(workdir, "ws.o")
    name = "relattn_ws<" + ", ".join(str(x).lower() if isinstance(x, bool) else str(x) for x in cfg) + ">"
    with open(cu, "w") as f:
        f.write(source + f"\ntemplate __global__ void {name}({params});\n")
    opts = [o for o in options if not o.startswith("-arch")]
    r = subprocess.run(["nvcc", "-gencode=arch=compute_90a,code=sm_90a", *opts, "-c", "-Xptxas", "-v", cu, "-o", obj],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-4000:])
    return obj, r.stderr.splitlines()


def ptxas_notes(lines):
    for i, line in enumerate(lines):
        if re.search(r"\(C75\d\d\)", line):
            print("  " + line.strip()[:240])
        if "Compiling entry function" in line:
            name = line.split("'")[1]
            info = " ".join(x.strip() for x in lines[i + 1:i + 4] if "registers" in x or "spill" in x)
            print(f"{name[:70]}\n  {info[:200]}")


def loops(sass: str):
    text = sass.splitlines()
    ins = []
    for line in text:
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    back = []
    for a, t in ins:
        m = re.search(r"BRA\s+0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) <= a:
            back.append((int(m.group(1), 16), a))
    for s, e in back:
        body = [t for a, t in ins if s <= a <= e]
        if sum("HGMMA" in t or "HMMA" in t for t in body) < 4:   # a loop of warpgroup or mma.sync products
            continue
        seq = []
        for t in body:
            if "WARPGROUP.DEPBAR" in t:
                seq.append(f" [wait {t.split()[-1]}] ")
            elif "MUFU.EX2" in t:
                seq.append("E")
            elif "HGMMA" in t:
                seq.append("G")
            elif "F2FP" in t:
                seq.append("p")
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(10))
        # what register pressure puts inside a loop: special-register reads (a thread
        # index re-read instead of kept) and local-memory spills
        extra = [f"{ops[k]} {k}" for k in ("S2R", "LDL", "STL") if ops[k]]
        note = f" [{', '.join(extra)}]" if extra else ""
        order = f"\n    {''.join(seq)}" if "G" in seq else ""   # the order of warpgroup products and waits
        print(f"  loop {s:#x}-{e:#x}: {len(body)} instructions ({top}){note}{order}")


def main(argv):
    tree, dump = os.path.dirname(os.path.dirname(os.path.abspath(__file__))), None
    while argv and argv[0].startswith("--"):
        flag, val, argv = argv[0], argv[1], argv[2:]
        if flag == "--tree":
            tree = val
        elif flag == "--dump":
            dump = val
    cfgs = [tuple(ast.literal_eval(a)) for a in argv]
    if not cfgs:
        sys.exit(__doc__)
    source, options = _tree_build(tree)

    cuobjdump = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if not cuobjdump:
        print("(no cuobjdump: set CUOBJDUMP for the loop summaries)")
    with tempfile.TemporaryDirectory() as work:
        for c in cfgs:   # one instantiation per object, so that each summary is its own
            obj, lines = build(source, options, c, work)
            print(f"{c}:")
            ptxas_notes(lines)
            if not cuobjdump:
                continue
            sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True).stdout
            if dump:
                with open(dump, "a") as f:
                    f.write(sass)
            loops(sass)


if __name__ == "__main__":
    main(sys.argv[1:])
