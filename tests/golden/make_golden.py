"""Generate the golden vectors in tests/golden/*.npz with PyTorch.

Run:  python tests/golden/make_golden.py        (needs torch; CPU is enough)

The torch functions below are written from spec/REFERENCE.md and the seed card
(spec/seed-attention-card.md): SAM's ``get_rel_pos`` with ``F.interpolate``
(DeepSeek-OCR's variant: half tables resized in float32 and cast back),
``add_decomposed_rel_pos`` in both the SAM form (added to the logits) and the
DeepSeek form (returns rel_h, rel_w for an SDPA mask), SAM's window helpers and
the seed ``Attention`` module (SDPA with the rel_h + rel_w mask).

Importing this module does not generate anything; ``tests/test_golden.py``
imports it for live cross-checks. Everything that touches torch takes and
returns numpy arrays at the boundary (``*_np`` helpers).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------
# SAM / DeepSeek-OCR reference functions (torch)
# ---------------------------------------------------------------------------


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """(q_size, k_size, C) embeddings; DeepSeek-OCR form (resize in float32, cast back)."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        dtype = rel_pos.dtype
        rel_pos_f32 = rel_pos.to(torch.float32)
        rel_pos_resized = F.interpolate(
            rel_pos_f32.reshape(1, rel_pos_f32.shape[0], -1).permute(0, 2, 1),
            size=max_rel_dist,
            mode="linear",
        ).to(dtype)
        rel_pos_resized = rel_pos_resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        rel_pos_resized = rel_pos
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos_resized[relative_coords.long()]


def decomposed_terms(q, rel_pos_h, rel_pos_w, q_size, k_size):
    """DeepSeek form: rel_h (B, q_h*q_w, k_h, 1), rel_w (B, q_h*q_w, 1, k_w); q (B, S, C)."""
    q_h, q_w = q_size
    k_h, k_w = k_size
    Rh = get_rel_pos(q_h, k_h, rel_pos_h)
    Rw = get_rel_pos(q_w, k_w, rel_pos_w)
    B, _, dim = q.shape
    r_q = q.reshape(B, q_h, q_w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
    rel_h = rel_h.unsqueeze(-1).reshape(B, q_h * q_w, k_h, 1)
    rel_w = rel_w.unsqueeze(-2).reshape(B, q_h * q_w, 1, k_w)
    return rel_h, rel_w


def sam_add_decomposed_rel_pos(attn, q, rel_pos_h, rel_pos_w, q_size, k_size):
    """SAM form: adds the terms to the logits attn (B, Sq, Sk)."""
    q_h, q_w = q_size
    k_h, k_w = k_size
    Rh = get_rel_pos(q_h, k_h, rel_pos_h)
    Rw = get_rel_pos(q_w, k_w, rel_pos_w)
    B, _, dim = q.shape
    r_q = q.reshape(B, q_h, q_w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
    attn = (
        attn.view(B, q_h, q_w, k_h, k_w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    ).view(B, q_h * q_w, k_h * k_w)
    return attn


def attention_core_sdpa(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale=None):
    """Seed (DeepSeek) form: q (B, heads, Sq, d); SDPA with the S x S mask rel_h + rel_w."""
    B, heads, Sq, d = q.shape
    if rel_pos_h is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    rel_h, rel_w = decomposed_terms(q.reshape(B * heads, Sq, d), rel_pos_h, rel_pos_w,
                                    q_size, k_size)
    rel_h = rel_h.view(B, heads, Sq, k_size[0], 1)
    rel_w = rel_w.view(B, heads, Sq, 1, k_size[1])
    bias = (rel_h + rel_w).view(B, heads, Sq, k_size[0] * k_size[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def attention_core_sam(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size):
    """SAM eager form: explicit softmax, (scale*qk + rel_h) + rel_w."""
    B, heads, Sq, d = q.shape
    Sk = k.shape[2]
    q3 = q.reshape(B * heads, Sq, d)
    attn = (q3 * d ** -0.5) @ k.reshape(B * heads, Sk, d).transpose(-2, -1)
    if rel_pos_h is not None:
        attn = sam_add_decomposed_rel_pos(attn, q3, rel_pos_h, rel_pos_w, q_size, k_size)
    attn = attn.softmax(dim=-1)
    return (attn @ v.reshape(B * heads, Sk, d)).view(B, heads, Sq, d)


def window_partition(x: torch.Tensor, window_size: int):
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(windows, window_size, pad_hw, hw):
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // window_size // window_size)
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


class SeedAttention(nn.Module):
    """The seed module (DeepSeek-OCR deepencoder.py Attention), SDPA with a mask."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True,
                 use_rel_pos: bool = False, rel_pos_zero_init: bool = True,
                 input_size: Optional[Tuple[int, int]] = None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if self.use_rel_pos:
            assert input_size is not None, "Input size must be provided for rel pos"
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        rel_h, rel_w = None, None
        if self.use_rel_pos:
            rel_h, rel_w = decomposed_terms(q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
        q = q.view(B, self.num_heads, H * W, -1)
        k = k.view(B, self.num_heads, H * W, -1)
        v = v.view(B, self.num_heads, H * W, -1)
        if self.use_rel_pos:
            rel_h = rel_h.view(B, self.num_heads, rel_h.size(1), rel_h.size(2), rel_h.size(3))
            rel_w = rel_w.view(B, self.num_heads, rel_w.size(1), rel_w.size(2), rel_w.size(3))
            attn_bias = (rel_h + rel_w).view(B, self.num_heads, rel_h.size(2),
                                             rel_h.size(3) * rel_w.size(4))
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        x = x.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)


def windowed_forward(module: nn.Module, x: torch.Tensor, window_size: int) -> torch.Tensor:
    """SAM Block's handling of the attention: pad, partition, attend, unpartition, crop."""
    if window_size <= 0:
        return module(x)
    H, W = x.shape[1], x.shape[2]
    windows, pad_hw = window_partition(x, window_size)
    return window_unpartition(module(windows), window_size, pad_hw, (H, W))


# ---------------------------------------------------------------------------
# numpy boundary
# ---------------------------------------------------------------------------


def _t(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


def resize_np(table: np.ndarray, length: int) -> np.ndarray:
    """F.interpolate(mode='linear') of a float32 (L, C) table to (length, C)."""
    t = _t(table)
    out = F.interpolate(t.T[None], size=length, mode="linear")[0].T
    return out.contiguous().numpy()


def get_rel_pos_np(q_size, k_size, table):
    return get_rel_pos(q_size, k_size, _t(table)).numpy()


def decomposed_terms_np(q, rel_pos_h, rel_pos_w, q_size, k_size):
    """q (N, S, C) -> rel_h (N, S, k_h), rel_w (N, S, k_w)."""
    rel_h, rel_w = decomposed_terms(_t(q), _t(rel_pos_h), _t(rel_pos_w), q_size, k_size)
    return rel_h[..., 0].numpy(), rel_w[..., 0, :].numpy()


def attention_core_np(q, k, v, rel_pos_h=None, rel_pos_w=None, q_size=None, k_size=None,
                      form="sdpa"):
    fn = attention_core_sdpa if form == "sdpa" else attention_core_sam
    with torch.no_grad():
        return fn(_t(q), _t(k), _t(v), _t(rel_pos_h), _t(rel_pos_w), q_size, k_size).numpy()


def make_seed_module(dim, num_heads, input_size, seed, qkv_bias=True, use_rel_pos=True):
    """A SeedAttention with every parameter drawn from a seeded generator."""
    torch.manual_seed(seed)
    module = SeedAttention(dim, num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos,
                           rel_pos_zero_init=False, input_size=input_size)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 0.5 if name.startswith("rel_pos") else dim ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module.eval()


def state_dict_np(module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def seed_forward_np(module, x, window_size=0):
    with torch.no_grad():
        return windowed_forward(module, _t(x), window_size).numpy()


def load_seed_module(state: dict, num_heads: int) -> SeedAttention:
    """A SeedAttention holding a numpy state dict (inverse of ``state_dict_np``)."""
    dim = state["proj.weight"].shape[0]
    use_rel_pos = "rel_pos_h" in state
    input_size = None
    if use_rel_pos:
        input_size = ((state["rel_pos_h"].shape[0] + 1) // 2, (state["rel_pos_w"].shape[0] + 1) // 2)
    module = SeedAttention(dim, num_heads, qkv_bias="qkv.bias" in state,
                           use_rel_pos=use_rel_pos, input_size=input_size)
    module.load_state_dict({k: _t(v) for k, v in state.items()})
    return module.eval()


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------

NAMED_RESIZES = [(127, 63), (127, 79), (127, 95), (127, 159), (27, 27), (5, 13), (27, 13)]
GET_REL_POS_CASES = [  # (q_size, k_size, stored rows, channels)
    (56, 7, 111, 4), (7, 56, 111, 4), (5, 3, 9, 8), (3, 5, 9, 8), (64, 64, 27, 4),
    (14, 14, 27, 8), (32, 32, 127, 8), (6, 6, 5, 8),
]
TERM_CASES = [  # (N, q_size, k_size, rows_h, rows_w, d)
    (3, (8, 8), (8, 8), 27, 27, 16),
    (2, (6, 4), (3, 2), 11, 7, 8),
    (2, (4, 5), (4, 5), 7, 9, 17),
]
ATTENTION_CASES = [  # (B, heads, q_size, k_size, rows_h, rows_w, d)
    (2, 3, (4, 5), (4, 5), 7, 9, 16),
    (1, 1, (5, 5), (5, 5), 27, 5, 80),
    (2, 2, (6, 6), (3, 3), 11, 11, 8),
    (1, 2, (3, 5), (3, 5), 5, 13, 64),
]
MODULE_DIM, MODULE_HEADS = 48, 4


def generate(out_dir=HERE):
    rng = np.random.default_rng(20240601)
    files = {}

    # resize: named cases (float32, 32 channels) plus random (L, M, magnitude)
    data = {}
    for i, (L, M) in enumerate(NAMED_RESIZES):
        table = (rng.standard_normal((L, 32)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
        data[f"named{i}_in"], data[f"named{i}_out"] = table, resize_np(table, M)
    for i in range(40):
        L, M = int(rng.integers(1, 130)), int(rng.integers(1, 200))
        table = (rng.standard_normal((L, 4)) * 10.0 ** rng.uniform(-6, 6)).astype(np.float32)
        data[f"random{i}_in"], data[f"random{i}_out"] = table, resize_np(table, M)
    files["resize.npz"] = data

    # get_rel_pos: gathers incl. q_size != k_size, with and without resizing
    data = {}
    for i, (qs, ks, rows, ch) in enumerate(GET_REL_POS_CASES):
        table = rng.standard_normal((rows, ch)).astype(np.float32)
        data[f"case{i}_sizes"] = np.array([qs, ks])
        data[f"case{i}_table"] = table
        data[f"case{i}_out"] = get_rel_pos_np(qs, ks, table)
    table16 = rng.standard_normal((27, 8)).astype(np.float16)  # half: float32 resize, cast back
    data["half_sizes"] = np.array([20, 20])
    data["half_table"] = table16
    data["half_out"] = get_rel_pos_np(20, 20, table16)
    files["get_rel_pos.npz"] = data

    # decomposed terms (DeepSeek form), float32
    data = {}
    for i, (N, qs, ks, rh_rows, rw_rows, d) in enumerate(TERM_CASES):
        q = rng.standard_normal((N, qs[0] * qs[1], d)).astype(np.float32)
        rh = (rng.standard_normal((rh_rows, d)) * 0.5).astype(np.float32)
        rw = (rng.standard_normal((rw_rows, d)) * 0.5).astype(np.float32)
        rel_h, rel_w = decomposed_terms_np(q, rh, rw, qs, ks)
        data.update({f"case{i}_q": q, f"case{i}_rel_pos_h": rh, f"case{i}_rel_pos_w": rw,
                     f"case{i}_sizes": np.array([qs, ks]), f"case{i}_rel_h": rel_h,
                     f"case{i}_rel_w": rel_w})
    files["terms.npz"] = data

    # attention core (SDPA with the mask), float32 and float64; SAM eager for reference
    for dtype in (np.float32, np.float64):
        data = {}
        for i, (B, heads, qs, ks, rh_rows, rw_rows, d) in enumerate(ATTENTION_CASES):
            key = f"{np.dtype(dtype).name}_case{i}"
            q = rng.standard_normal((B, heads, qs[0] * qs[1], d)).astype(dtype)
            k = rng.standard_normal((B, heads, ks[0] * ks[1], d)).astype(dtype)
            v = rng.standard_normal((B, heads, ks[0] * ks[1], d)).astype(dtype)
            rh = (rng.standard_normal((rh_rows, d)) / np.sqrt(d)).astype(dtype)
            rw = (rng.standard_normal((rw_rows, d)) / np.sqrt(d)).astype(dtype)
            data.update({f"{key}_q": q, f"{key}_k": k, f"{key}_v": v, f"{key}_rel_pos_h": rh,
                         f"{key}_rel_pos_w": rw, f"{key}_sizes": np.array([qs, ks]),
                         f"{key}_out": attention_core_np(q, k, v, rh, rw, qs, ks, "sdpa"),
                         f"{key}_out_sam": attention_core_np(q, k, v, rh, rw, qs, ks, "sam")})
        files[f"attention_{np.dtype(dtype).name}.npz"] = data

    # full seed module: global (input_size 6x6; x 6x6 and 5x7 -> interpolation)
    # and windowed (input_size 4x4, window 4; 6x6 and 5x7 grids -> padding)
    data = {"num_heads": np.array(MODULE_HEADS)}
    for prefix, input_size, window, seed in [("global", (6, 6), 0, 1), ("windowed", (4, 4), 4, 2)]:
        module = make_seed_module(MODULE_DIM, MODULE_HEADS, input_size, seed)
        for key, value in state_dict_np(module).items():
            data[f"{prefix}_state_{key}"] = value
        data[f"{prefix}_window_size"] = np.array(window)
        for name, shape in [("x66", (2, 6, 6, MODULE_DIM)), ("x57", (1, 5, 7, MODULE_DIM))]:
            x = rng.standard_normal(shape).astype(np.float32)
            data[f"{prefix}_{name}"] = x
            data[f"{prefix}_{name}_out"] = seed_forward_np(module, x, window)
    files["module.npz"] = data

    for name, arrays in files.items():
        path = os.path.join(out_dir, name)
        np.savez_compressed(path, **arrays)
        print(f"{name}: {os.path.getsize(path) / 1024:.1f} KiB, {len(arrays)} arrays")
    print(f"torch {torch.__version__}")


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else HERE)
