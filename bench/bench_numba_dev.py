"""Scratch bench: numba backend vs torch seed form / no-bias SDPA, float32,
2 threads, interleaved runs (this machine is shared and noisy), medians."""
import sys, time, numpy as np
from relattn.backends import numba_cpu
import torch
import torch.nn.functional as F
torch.set_num_threads(2)

CASES = {"global": (1, 12, 4096, 64, 64, 64), "windowed": (25, 12, 196, 64, 14, 14),
         "samh_global": (1, 16, 4096, 80, 64, 64)}

def main(names, reps):
    rng = np.random.default_rng(0)
    for name in names:
        B, H, S, d, kh, kw = CASES[name]
        q, k, v = (rng.standard_normal((B, H, S, d), dtype=np.float32) for _ in range(3))
        rh = rng.standard_normal((B, H, S, kh), dtype=np.float32)
        rw = rng.standard_normal((B, H, S, kw), dtype=np.float32)
        tq, tk, tv, trh, trw = map(torch.from_numpy, (q, k, v, rh, rw))
        fns = {
            "numba": lambda: numba_cpu.attention(q, k, v, rh, rw, (kh, kw), d ** -0.5),
            "torch_seed": lambda: F.scaled_dot_product_attention(
                tq, tk, tv, attn_mask=(trh[..., :, :, None] + trw[..., :, None, :]).reshape(B, H, S, S)),
            "torch_nobias": lambda: F.scaled_dot_product_attention(tq, tk, tv),
        }
        ts = {n: [] for n in fns}
        for f in fns.values():
            f()
        for _ in range(reps):
            for n, f in fns.items():
                t = time.perf_counter(); f(); ts[n].append(time.perf_counter() - t)
        med = {n: float(np.median(x)) for n, x in ts.items()}
        print(name, {n: round(x, 4) for n, x in med.items()},
              "numba/seed %.2f numba/nobias %.2f" % (med["numba"] / med["torch_seed"], med["numba"] / med["torch_nobias"]),
              flush=True)

if __name__ == "__main__":
    names = [a for a in sys.argv[1:] if a in CASES] or ["global", "windowed"]
    main(names, 7)
