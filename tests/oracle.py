"""An independent, deliberately slow oracle for relattn.

Written from ``spec/REFERENCE.md`` alone; it shares no code with ``relattn``.
Everything is explicit Python loops in float64 over query/key positions
(y, x, ky, kx); only the head_dim dot products are vectorised. Use it on small
sizes only.

Bit-exactness against PyTorch is NOT this module's job (the golden vectors in
``tests/golden`` check that); the oracle is exact maths in float64, so
comparisons against it use dtype-dependent tolerances.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "linear_resize",
    "rel_pos_index",
    "get_rel_pos",
    "decomposed_rel_pos",
    "attention",
    "window_partition",
    "window_unpartition",
    "attention_module",
]


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def linear_resize(table, length):
    """Linear resize along axis 0 (align_corners=False), as REFERENCE.md specifies it.

    ``table`` is (L, C) of any float dtype; the arithmetic is float32, as in
    PyTorch/DeepSeek-OCR (a float64 table is cast to float32 first), including
    the two fused multiply-adds of PyTorch's x86-64 build, each emulated by an
    exact float64 product and sum rounded once to float32:

        src = fma(s, i + 0.5, -0.5)              s = L / M in float32
        out = fma(x[i0], 1 - l1, x[i1] * l1)

    Returns float32 (length, C).
    """
    f32 = np.float32
    table = np.asarray(table).astype(np.float32)
    rows, channels = table.shape
    out = np.empty((length, channels), dtype=np.float32)
    step = f32(rows) / f32(length)
    for i in range(length):
        src = f32(float(step) * (i + 0.5) - 0.5)  # one rounding: an fma
        src = max(f32(0.0), src)
        i0 = min(int(math.floor(src)), rows - 1)
        i1 = i0 + 1 if i0 < rows - 1 else i0
        l1 = f32(src - f32(i0))
        l0 = f32(f32(1.0) - l1)
        for c in range(channels):
            upper = f32(table[i1, c] * l1)  # rounded to float32 before the fma
            out[i, c] = f32(float(table[i0, c]) * float(l0) + float(upper))
    return out


def rel_pos_index(q_size, k_size):
    """Row index into the (resized) table for every (query, key) pair.

    Returns an int array (q_size, k_size). The coordinates are float32, as in
    PyTorch (default dtype), and the cast truncates toward zero.
    """
    f32 = np.float32
    q_stretch = f32(max(k_size / q_size, 1.0))
    k_stretch = f32(max(q_size / k_size, 1.0))
    offset = f32((k_size - 1) * max(q_size / k_size, 1.0))
    index = np.empty((q_size, k_size), dtype=np.int64)
    for y in range(q_size):
        for ky in range(k_size):
            q_coord = f32(y) * q_stretch
            k_coord = f32(ky) * k_stretch
            value = f32(f32(q_coord - k_coord) + offset)
            index[y, ky] = int(value)  # int() truncates toward zero
    return index


def get_rel_pos(q_size, k_size, table, round_to=None):
    """(q_size, k_size, C) float64 relative-position embeddings.

    A table of the wrong length is resized in float32 (``linear_resize``) and,
    as DeepSeek-OCR does, cast back to its own dtype before the gather.
    ``round_to`` overrides that dtype.
    """
    table = np.asarray(table)
    wanted = 2 * max(q_size, k_size) - 1
    if table.shape[0] != wanted:
        table = linear_resize(table, wanted).astype(
            table.dtype if round_to is None else round_to)
    table = np.asarray(table, dtype=np.float64)
    index = rel_pos_index(q_size, k_size)
    out = np.empty((q_size, k_size, table.shape[1]), dtype=np.float64)
    for y in range(q_size):
        for ky in range(k_size):
            out[y, ky] = table[index[y, ky]]
    return out


def decomposed_rel_pos(q, rel_pos_h, rel_pos_w, q_size, k_size, round_to=None):
    """rel_h (..., Sq, k_h) and rel_w (..., Sq, k_w) from the UNSCALED q, float64."""
    q = np.asarray(q, dtype=np.float64)
    q_h, q_w = q_size
    k_h, k_w = k_size
    Rh = get_rel_pos(q_h, k_h, rel_pos_h, round_to)
    Rw = get_rel_pos(q_w, k_w, rel_pos_w, round_to)
    lead = q.shape[:-2]
    flat = q.reshape((-1, q_h * q_w, q.shape[-1]))
    rel_h = np.zeros((flat.shape[0], q_h * q_w, k_h))
    rel_w = np.zeros((flat.shape[0], q_h * q_w, k_w))
    for b in range(flat.shape[0]):
        for y in range(q_h):
            for x in range(q_w):
                i = y * q_w + x
                for ky in range(k_h):
                    rel_h[b, i, ky] = np.dot(flat[b, i], Rh[y, ky])
                for kx in range(k_w):
                    rel_w[b, i, kx] = np.dot(flat[b, i], Rw[x, kx])
    return (rel_h.reshape(lead + (q_h * q_w, k_h)),
            rel_w.reshape(lead + (q_h * q_w, k_w)))


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------


def attention(q, k, v, rel_pos_h=None, rel_pos_w=None, q_size=None, k_size=None,
              scale=None, round_to=None):
    """softmax_j(scale*q_i.k_j + q_i.Rh[y,ky] + q_i.Rw[x,kx]) @ v in float64.

    q: (B, heads, Sq, d); k, v: (B, heads, Sk, d). Returns float64 (B, heads, Sq, d).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    B, heads, Sq, d = q.shape
    Sk = k.shape[2]
    if scale is None:
        scale = d ** -0.5
    use_rel = rel_pos_h is not None
    if use_rel:
        q_h, q_w = q_size
        k_h, k_w = k_size
        Rh = get_rel_pos(q_h, k_h, rel_pos_h, round_to)
        Rw = get_rel_pos(q_w, k_w, rel_pos_w, round_to)
    else:
        q_h, q_w = 1, Sq
        k_h, k_w = 1, Sk
    out = np.zeros((B, heads, Sq, d))
    logits = np.empty(Sk)
    for b in range(B):
        for h in range(heads):
            for y in range(q_h):
                for x in range(q_w):
                    i = y * q_w + x
                    qi = q[b, h, i]
                    for ky in range(k_h):
                        for kx in range(k_w):
                            j = ky * k_w + kx
                            logit = scale * np.dot(qi, k[b, h, j])
                            if use_rel:
                                logit += np.dot(qi, Rh[y, ky]) + np.dot(qi, Rw[x, kx])
                            logits[j] = logit
                    weights = np.exp(logits - logits.max())
                    weights /= weights.sum()
                    acc = np.zeros(d)
                    for j in range(Sk):
                        acc += weights[j] * v[b, h, j]
                    out[b, h, i] = acc
    return out


# ---------------------------------------------------------------------------
# Windows (SAM Block)
# ---------------------------------------------------------------------------


def window_partition(x, window_size):
    """(B, H, W, C) -> ((B*nWh*nWw, ws, ws, C), (Hp, Wp)), zero padding bottom/right."""
    x = np.asarray(x)
    B, H, W, C = x.shape
    ws = window_size
    Hp = -(-H // ws) * ws
    Wp = -(-W // ws) * ws
    windows = np.zeros((B * (Hp // ws) * (Wp // ws), ws, ws, C), dtype=x.dtype)
    n = 0
    for b in range(B):
        for wy in range(Hp // ws):
            for wx in range(Wp // ws):
                for y in range(ws):
                    for xx in range(ws):
                        gy, gx = wy * ws + y, wx * ws + xx
                        if gy < H and gx < W:
                            windows[n, y, xx] = x[b, gy, gx]
                n += 1
    return windows, (Hp, Wp)


def window_unpartition(windows, window_size, pad_hw, hw):
    """Inverse of window_partition, cropping to hw."""
    windows = np.asarray(windows)
    ws = window_size
    Hp, Wp = pad_hw
    H, W = hw
    per_image = (Hp // ws) * (Wp // ws)
    B = windows.shape[0] // per_image
    out = np.zeros((B, H, W, windows.shape[-1]), dtype=windows.dtype)
    n = 0
    for b in range(B):
        for wy in range(Hp // ws):
            for wx in range(Wp // ws):
                for y in range(ws):
                    for xx in range(ws):
                        gy, gx = wy * ws + y, wx * ws + xx
                        if gy < H and gx < W:
                            out[b, gy, gx] = windows[n, y, xx]
                n += 1
    return out


# ---------------------------------------------------------------------------
# The whole module (SAM Attention, optionally windowed like SAM's Block)
# ---------------------------------------------------------------------------


def attention_module(x, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
                     rel_pos_h=None, rel_pos_w=None, window_size=0):
    """SAM ``Attention.forward`` (and Block's window handling), float64.

    x: (B, H, W, C). Weights in PyTorch nn.Linear layout (y = x W^T + b).
    """
    x = np.asarray(x, dtype=np.float64)
    B, H, W, C = x.shape
    if window_size > 0:
        windows, pad_hw = window_partition(x, window_size)
        out = attention_module(windows, num_heads, qkv_weight, qkv_bias,
                               proj_weight, proj_bias, rel_pos_h, rel_pos_w, 0)
        return window_unpartition(out, window_size, pad_hw, (H, W))
    head_dim = C // num_heads
    qkv_weight = np.asarray(qkv_weight, dtype=np.float64)
    proj_weight = np.asarray(proj_weight, dtype=np.float64)
    S = H * W
    tokens = x.reshape(B, S, C)
    qkv = tokens @ qkv_weight.T
    if qkv_bias is not None:
        qkv = qkv + np.asarray(qkv_bias, dtype=np.float64)
    # channels are [q | k | v], each split into heads of head_dim contiguous channels
    qkv = qkv.reshape(B, S, 3, num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if rel_pos_h is not None:
        out = attention(q, k, v, rel_pos_h, rel_pos_w, (H, W), (H, W))
    else:
        out = attention(q, k, v)
    out = out.transpose(0, 2, 1, 3).reshape(B, H, W, C)
    out = out @ proj_weight.T + np.asarray(proj_bias, dtype=np.float64)
    return out
