"""Full ``Attention`` forward: relattn against the PyTorch seed module, same weights.

    python bench/bench_module.py                      # CPU, float32 (numba backend)
    python bench/bench_module.py --device cuda --dtype bfloat16

The PyTorch module is the seed card's (qkv Linear, einsum rel terms, the S x S
mask, SDPA, proj), written here from the card; torch is only the anchor. Times are
wall-clock medians per call (Python included on both sides); on the GPU the
CUDA-graph replay time is printed too where capture works.
"""

import argparse
import json
import statistics
import os
import sys

import time

import numpy as np
import torch  # before numba's thread pool starts: see relattn._bench.import_torch_first

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import relattn
from relattn import _bench


def seed_module(torch, dim, heads, input_size):
    F = torch.nn.functional

    class SeedAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = heads
            self.qkv = torch.nn.Linear(dim, 3 * dim)
            self.proj = torch.nn.Linear(dim, dim)
            self.rel_pos_h = torch.nn.Parameter(torch.zeros(2 * input_size[0] - 1, dim // heads))
            self.rel_pos_w = torch.nn.Parameter(torch.zeros(2 * input_size[1] - 1, dim // heads))

        def forward(self, x):
            b, h, w, _ = x.shape
            qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
            rh = _bench._torch_get_rel_pos(h, h, self.rel_pos_h)
            rw = _bench._torch_get_rel_pos(w, w, self.rel_pos_w)
            r_q = q.reshape(b * self.num_heads, h, w, -1)
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
            mask = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.num_heads, h * w, h * w)
            q, k, v = (t.view(b, self.num_heads, h * w, -1) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
            return self.proj(out)

    return SeedAttention()


def median(fn, sync, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    configs = [("sam-b-global", 1, 64, 0, (64, 64)), ("sam-b-window", 1, 64, 14, (14, 14))]
    dim, heads = 768, 12
    rows = []
    for name, batch, grid, window, input_size in configs:
        layer = relattn.Attention(dim, heads, use_rel_pos=True, rel_pos_zero_init=False, input_size=input_size,
                                  window_size=window, dtype=args.dtype, rng=0)
        torch_layer = seed_module(torch, dim, heads, input_size)
        torch_layer.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in layer.state_dict().items()})
        tdtype = getattr(torch, args.dtype)
        torch_layer = torch_layer.to(device=args.device, dtype=tdtype).eval()
        x_host = np.random.default_rng(1).standard_normal((batch, grid, grid, dim), dtype=np.float32)
        x_torch = torch.from_numpy(x_host).to(device=args.device, dtype=tdtype)

        def torch_call():
            if window:  # SAM's Block: pad, partition, attend, unpartition, crop (in torch)
                pad = (-grid) % window
                xp = torch.nn.functional.pad(x_torch, (0, 0, 0, pad, 0, pad))
                n = (grid + pad) // window
                w = xp.view(batch, n, window, n, window, dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, dim)
                y = torch_layer(w).view(batch, n, n, window, window, dim).permute(0, 1, 3, 2, 4, 5)
                return y.reshape(batch, n * window, n * window, dim)[:, :grid, :grid]
            return torch_layer(x_torch)

        if args.device == "cuda":
            import cupy

            x_ours = cupy.asarray(x_host.astype(layer.dtype))
            sync = cupy.cuda.get_current_stream().synchronize
            tsync = torch.cuda.synchronize
        else:
            x_ours = x_host.astype(layer.dtype)
            sync = tsync = lambda: None
        with torch.no_grad():
            torch_call()
            t_torch = median(torch_call, tsync, args.runs)
            ref = torch_call().float().cpu().numpy()
        layer(x_ours)
        t_ours = median(lambda: layer(x_ours), sync, args.runs)
        out = layer(x_ours)
        if args.device == "cuda":
            from relattn.backends.gpu import cublas as _cublas

            out = _cublas.to_float32(out).get()
            graph = _bench.graph_time(lambda: layer(x_ours))
        else:
            out = out.astype(np.float32)
            graph = None
        err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        rows.append(dict(case=name, device=args.device, dtype=args.dtype, torch_s=t_torch, relattn_s=t_ours,
                         speedup=t_torch / t_ours, relattn_graph_s=graph, rel_l2_vs_torch=err))
        g = "-" if graph is None else f"{graph * 1e3:.3f} ms"
        print(f"{name:<14} {args.device} {args.dtype:<9} torch seed module {t_torch * 1e3:9.3f} ms   "
              f"relattn {t_ours * 1e3:9.3f} ms   speedup {t_torch / t_ours:5.2f}x   graph {g}   "
              f"rel L2 vs torch {err:.1e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
