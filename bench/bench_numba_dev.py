"""Scratch bench: numba kernel vs torch seed form / no-bias SDPA (float32, 2 threads)."""
import sys, time, numpy as np, os
from relattn.backends import _numba_kernels as K

def med(f, n=5):
    f(); ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return float(np.median(ts))

def case(B, H, S, d, kh, kw, rng):
    q = rng.standard_normal((B, H, S, d), dtype=np.float32)
    k = rng.standard_normal((B, H, S, d), dtype=np.float32)
    v = rng.standard_normal((B, H, S, d), dtype=np.float32)
    rh = rng.standard_normal((B, H, S, kh), dtype=np.float32)
    rw = rng.standard_normal((B, H, S, kw), dtype=np.float32)
    return q, k, v, rh, rw

def run_numba(q, k, v, rh, rw, kw, tq, tk):
    B, H, S, d = q.shape
    out = np.empty((B * H, S, d), np.float32)
    K.attention_fwd(q.reshape(B*H, S, d), k.reshape(B*H, -1, d), v.reshape(B*H, -1, d),
                    rh.reshape(B*H, S, -1), rw.reshape(B*H, S, -1), True, kw,
                    np.float32(d ** -0.5), tq, tk, out)
    return out

if __name__ == "__main__":
    torch_on = "--torch" in sys.argv
    tiles = [tuple(map(int, a.split("x"))) for a in sys.argv[1:] if "x" in a and a[0].isdigit()]
    tiles = tiles or [(64, 64)]
    rng = np.random.default_rng(0)
    if torch_on:
        import torch; torch.set_num_threads(2)
        import torch.nn.functional as F
    for name, (B, H, S, d, kh, kw) in {"global": (1, 12, 4096, 64, 64, 64),
                                      "windowed": (25, 12, 196, 64, 14, 14)}.items():
        q, k, v, rh, rw = case(B, H, S, d, kh, kw, rng)
        n = 3 if name == "global" else 15
        for tq, tk in tiles:
            print(name, f"numba tq={tq} tk={tk}", round(med(lambda: run_numba(q, k, v, rh, rw, kw, tq, tk), n), 4), flush=True)
        if torch_on:
            tq_, tk_, tv_, trh, trw = map(torch.from_numpy, (q, k, v, rh, rw))
            def seed():
                m = (trh[..., :, :, None] + trw[..., :, None, :]).reshape(B, H, S, S)
                return F.scaled_dot_product_attention(tq_, tk_, tv_, attn_mask=m)
            print(name, "torch seed", round(med(seed, n), 4), flush=True)
            print(name, "torch nobias", round(med(lambda: F.scaled_dot_product_attention(tq_, tk_, tv_), n), 4), flush=True)
