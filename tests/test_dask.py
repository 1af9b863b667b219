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
