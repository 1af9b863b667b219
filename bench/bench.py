"""Benchmark the attention core on every available backend against PyTorch anchors.

Usage:
    python bench/bench.py                                 # sam-b-global and sam-b-window
    python bench/bench.py --case sam-h-global --case sam-b-global-1280px
    python bench/bench.py --backend numba --json out.json

For each case it prints, per implementation: median time, GFLOP/s (4*B*heads*S^2*d
useful flops), peak memory above inputs and output, max error against a float64
reference, and the ratio to the PyTorch seed form (SDPA with the materialized
S x S mask) measured in the same run. PyTorch is only used here, as the anchor.
Also ``relattn bench`` (same options).
"""

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from relattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
