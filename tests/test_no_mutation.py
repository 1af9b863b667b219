"""No public function modifies its inputs.

Every array argument is fingerprinted (SHA-256 of its bytes, plus shape, dtype
and strides) before and after the call, on every available backend and for
float16, bfloat16, float32 and float64. Inputs are given both as contiguous
arrays and as strided views of a larger buffer (whose whole buffer is
fingerprinted, so a write through the view's base is caught too), and the
outputs are checked not to share memory with the inputs.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import relattn

try:
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BFLOAT16 = None

DTYPES = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)]
if BFLOAT16 is not None:
    DTYPES.append(BFLOAT16)
DTYPE_IDS = ["float16", "float32", "float64", "bfloat16"][: len(DTYPES)]


def fingerprint(a):
    a = np.asarray(a)
    base = a
    while isinstance(base.base, np.ndarray):
        base = base.base
    data = np.ascontiguousarray(base).view(np.uint8).tobytes()
    return hashlib.sha256(data).hexdigest(), a.shape, a.dtype.str, a.strides, a.flags.writeable


class Watch:
    """Fingerprints arrays now and checks them unchanged later."""

    def __init__(self, **arrays):
        self.arrays = arrays
        self.before = {k: fingerprint(v) for k, v in arrays.items()}

    def check(self, *outputs):
        for k, v in self.arrays.items():
            assert fingerprint(v) == self.before[k], f"{k} was modified"
        for out in outputs:
            for k, v in self.arrays.items():
                if isinstance(out, np.ndarray) and out.size and v.size:
                    assert not np.shares_memory(out, v), f"an output shares memory with {k}"


def _make(shape, dtype, seed, strided):
    rng = np.random.default_rng(seed)
    if strided:  # a view into a bigger buffer, last axis reversed
        big = rng.standard_normal(tuple(n * 2 for n in shape)).astype(dtype)
        return big[(slice(None, None, 2),) * (len(shape) - 1) + (slice(None, None, -2),)]
    return rng.standard_normal(shape).astype(dtype)


@pytest.fixture(params=[False, True], ids=["contiguous", "strided"])
def strided(request):
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_core_does_not_mutate(backend, dtype, strided):
    q = _make((2, 2, 12, 8), dtype, 0, strided)
    k = _make((2, 2, 6, 8), dtype, 1, strided)
    v = _make((2, 2, 6, 8), dtype, 2, strided)
    th = _make((5, 8), dtype, 3, strided)  # resized: 2*max(3, 2)-1 = 5 rows, kept
    tw = _make((9, 8), dtype, 4, strided)  # resized: 9 -> 7 rows
    watch = Watch(q=q, k=k, v=v, th=th, tw=tw)
    out1 = relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), (2, 3), backend=backend)
    out2 = relattn.rel_pos_attention(q, k, v, backend=backend, scale=0.3)
    text = relattn.explain(q, k, v, th, tw, (3, 4), (2, 3), backend=backend)
    assert isinstance(text, str)
    watch.check(out1, out2)
    assert np.isfinite(out1.astype(np.float32)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_relpos_functions_do_not_mutate(dtype, strided):
    q = _make((2, 6, 4), dtype, 0, strided)
    th = _make((3, 4), dtype, 1, strided)
    tw = _make((7, 4), dtype, 2, strided)
    watch = Watch(q=q, th=th, tw=tw)
    outs = [
        relattn.resize_rel_pos(th, 3),  # same length: a copy
        relattn.resize_rel_pos(th, 11),
        relattn.get_rel_pos(2, 2, th),
        relattn.get_rel_pos(3, 5, tw),
        *relattn.decomposed_rel_pos(q, th, tw, (2, 3), (2, 3)),
    ]
    watch.check(*outs)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_window_functions_do_not_mutate(dtype, strided):
    x = _make((2, 5, 6, 3), dtype, 0, strided)
    watch = Watch(x=x)
    windows, pad_hw = relattn.window_partition(x, 4)
    watch.check(windows)
    w_watch = Watch(windows=windows)
    back = relattn.window_unpartition(windows, 4, pad_hw, (5, 6))
    w_watch.check(back)
    same, _ = relattn.window_partition(x, 1)  # no padding: must still be a new array
    watch.check(same)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_layer_does_not_mutate(backend, dtype, strided):
    name = "bfloat16" if dtype == BFLOAT16 else dtype.name
    src = relattn.Attention(16, 2, use_rel_pos=True, input_size=(4, 4), rel_pos_zero_init=False, rng=0)
    sd = {k: _make(v.shape, dtype, i, strided) for i, (k, v) in enumerate(src.state_dict().items())}
    sd_watch = Watch(**sd)
    attn = relattn.Attention(16, 2, use_rel_pos=True, input_size=(4, 4), dtype=name, backend=backend)
    attn.load_state_dict(sd)
    attn2 = relattn.Attention.from_state_dict(sd, backend=backend, dtype=name)
    sd_watch.check(*attn.state_dict().values())
    params = {k: v for k, v in attn._params.items() if v is not None}
    p_watch = Watch(**params)
    x = _make((2, 5, 3, 16), dtype, 9, strided)
    x_watch = Watch(x=x)
    outs = [attn(x), attn(x, window_size=2), attn2.forward(x), attn(x[:0])]
    x_watch.check(*outs)
    p_watch.check(*outs)
    # state_dict() hands out copies: writing to them does not reach the layer.
    exported = attn.state_dict()
    exported["rel_pos_h"][...] = 0
    p_watch.check()


def test_checkpoint_functions_do_not_mutate(tmp_path, strided):
    src = relattn.Attention(16, 2, use_rel_pos=True, input_size=(4, 4), rel_pos_zero_init=False, rng=0)
    sd = {"blocks.0.attn." + k: _make(v.shape, np.float32, i, strided)
          for i, (k, v) in enumerate(src.state_dict().items())}
    sd["blocks.0.attn.rel_pos_w"] = sd["blocks.0.attn.rel_pos_w"].astype(np.float16)
    keys = sorted(sd)
    watch = Watch(**{k.replace(".", "_"): v for k, v in sd.items()})
    infos = relattn.attention_layers(sd)
    resized = relattn.resize_checkpoint_tables(sd, (4, 4), (6, 6))
    relattn.save_checkpoint(sd, tmp_path / "a.npz")
    relattn.save_checkpoint(sd, tmp_path / "a.safetensors")
    watch.check(*(resized[k] for k in keys if "rel_pos" in k))
    assert sorted(sd) == keys and len(infos) == 1
    assert resized["blocks.0.attn.rel_pos_h"].shape == (11, 8)
    assert sd["blocks.0.attn.rel_pos_h"].shape == (7, 8)
