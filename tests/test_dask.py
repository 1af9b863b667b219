"""Dask arrays chunked over batch/heads run through the same kernels (local schedulers)."""

import numpy as np
import pytest

import relattn

da = pytest.importorskip("dask.array")
import dask  # noqa: E402

import relattn.dask as rdask  # noqa: E402


@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_core_over_batch_and_head_chunks(scheduler):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((5, 4, 20, 8), dtype=np.float32) for _ in range(3))
    th, tw = (rng.standard_normal((r, 8), dtype=np.float32) for r in (7, 9))
    expected = relattn.rel_pos_attention(q, k, v, th, tw, (4, 5))
    dq = da.from_array(q, chunks=(2, 3, 20, 8))
    dk, dv = (da.from_array(a, chunks=(5, 4, 10, 8)) for a in (k, v))  # different chunking: rechunked
    out = rdask.rel_pos_attention(dq, dk, dv, th, tw, (4, 5))
    assert out.chunks[:2] == dq.chunks[:2]
    with dask.config.set(scheduler=scheduler):
        got = out.compute()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_attention_layer_over_images():
    rng = np.random.default_rng(1)
    layer = relattn.Attention(32, 4, use_rel_pos=True, rel_pos_zero_init=False, input_size=(6, 6), rng=rng)
    x = rng.standard_normal((4, 9, 7, 32), dtype=np.float32)
    dx = da.from_array(x, chunks=(1, 9, 7, 32))
    for window in (None, 4):
        got = rdask.attention(layer, dx, window_size=window).compute(scheduler="threads")
        np.testing.assert_allclose(got, layer(x, window_size=window), rtol=0, atol=1e-6)


def test_dask_helpers_reject_other_arrays():
    with pytest.raises(TypeError, match="q"):
        rdask.rel_pos_attention(np.ones((1, 1, 2, 2)), None, None)
    with pytest.raises(ValueError, match="x"):
        rdask.attention(relattn.Attention(8, 2), da.ones((2, 3, 8), chunks=1))


def _qkv_dask(shape=(4, 2, 6, 8), chunks=(1, 2, 6, 8), dtype=np.float32):
    return da.from_array(np.ones(shape, dtype), chunks=chunks)


@pytest.mark.parametrize("case", [
    "k batch", "k heads", "k head_dim", "k dtype", "v batch", "v heads", "v length", "v head_dim", "v dtype",
    "k unknown batch chunks", "v unknown batch chunks", "q unknown tokens",
])
def test_core_mismatch_names_the_argument(case):
    """A disagreeing k or v (or q with unknown token sizes) is refused when the
    graph is built, naming it: a ValueError, a TypeError for a dtype mismatch."""
    q = _qkv_dask()
    k = v = _qkv_dask(chunks=(2, 1, 3, 8))   # other chunks are fine: rechunked
    name, what = case.split(" ", 1)
    bad = {
        "batch": lambda: _qkv_dask((3, 2, 6, 8)),
        "heads": lambda: _qkv_dask((4, 1, 6, 8)),
        "head_dim": lambda: _qkv_dask((4, 2, 6, 4)),
        "length": lambda: _qkv_dask((4, 2, 5, 8)),
        "dtype": lambda: _qkv_dask(dtype=np.float64),
        "unknown batch chunks": lambda: (lambda a: a[a[:, 0, 0, 0] > 0])(_qkv_dask()),
        "unknown tokens": lambda: (lambda a: a[:, :, a[0, 0, :, 0] > 0])(_qkv_dask()),
    }[what]()
    args = {"q": q, "k": k, "v": v, name: bad}
    with pytest.raises(TypeError if what == "dtype" else ValueError) as info:
        rdask.rel_pos_attention(args["q"], args["k"], args["v"])
    assert str(info.value).startswith(f"{name}: expected"), str(info.value)
    assert "got" in str(info.value)


def test_core_unknown_batch_chunks_alike_still_run():
    x = _qkv_dask()
    q = x[x[:, 0, 0, 0] > 0]                 # unknown batch sizes, the same for q, k and v
    got = rdask.rel_pos_attention(q, q, q).compute(scheduler="synchronous")
    ones = np.ones((4, 2, 6, 8), np.float32)
    np.testing.assert_allclose(got, relattn.rel_pos_attention(ones, ones, ones), rtol=0, atol=1e-6)


def test_attention_wrapper_names_layer_and_x():
    layer = relattn.Attention(8, 2)
    with pytest.raises(TypeError, match="^layer: expected"):
        rdask.attention(lambda b: b, da.ones((2, 3, 3, 8), chunks=1))
    with pytest.raises(ValueError, match=r"^x: expected shape \(B, H, W, 8\)"):
        rdask.attention(layer, da.ones((2, 3, 3, 4), chunks=1))
    x = da.ones((2, 3, 3, 8), chunks=1)
    with pytest.raises(ValueError, match="^x: expected known chunk sizes"):
        rdask.attention(layer, x[:, x[0, :, 0, 0] > 0])


def test_layer_pickles_for_distributed_workers():
    """dask.distributed ships the layer to workers pickled: the copy computes the same."""
    import pickle

    rng = np.random.default_rng(2)
    layer = relattn.Attention(16, 2, use_rel_pos=True, rel_pos_zero_init=False, input_size=(4, 4), rng=rng)
    x = rng.standard_normal((2, 4, 4, 16), dtype=np.float32)
    want = layer(x)                                  # fills the parameter cache: not pickled
    copy = pickle.loads(pickle.dumps(layer))
    np.testing.assert_array_equal(copy(x), want)
    got = rdask.attention(copy, da.from_array(x, chunks=(1, 4, 4, 16))).compute(scheduler="threads")
    # per image, as the chunks run (BLAS may round a product of 16 token rows
    # differently from one of 32: the chunks' bits are the original's per chunk)
    np.testing.assert_array_equal(got, np.concatenate([layer(x[:1]), layer(x[1:])]))
    copy.proj_bias = copy.proj_bias + 1                 # the copy is independent
    np.testing.assert_array_equal(layer(x), want)
