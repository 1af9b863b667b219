"""Attention.capture: the layer's forward pass as a CUDA graph (GPU only)."""

from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
ml_dtypes = pytest.importorskip("ml_dtypes")

import relattn  # noqa: E402

if relattn.backends.get("cupy").unavailable_reason() is not None:  # pragma: no cover
    pytest.skip(relattn.backends.get("cupy").unavailable_reason(), allow_module_level=True)

BF16 = np.dtype(ml_dtypes.bfloat16)


def _layer(window, dtype):
    return relattn.Attention(64, 4, use_rel_pos=True, input_size=(14, 14) if window else (20, 20),
                             rng=0, window_size=window, dtype=dtype)


@pytest.mark.parametrize("window", [0, 14])
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=lambda d: d.name)
def test_captured_layer_gives_the_calls_bits(window, dtype):
    layer = _layer(window, dtype)
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((2, 20, 20, 64), dtype=np.float32).astype(dtype))
    g = layer.capture(x)
    want = layer(x)
    got = g(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert cupy.array_equal(got.view(cupy.uint16) if dtype.itemsize == 2 else got,
                            want.view(cupy.uint16) if dtype.itemsize == 2 else want)
    x2 = cupy.asarray(rng.standard_normal((2, 20, 20, 64), dtype=np.float32).astype(dtype))
    a, b = g(x2), layer(x2)   # new values through the same graph
    assert cupy.array_equal(a.astype(cupy.float32), b.astype(cupy.float32))
    assert not cupy.array_equal(a.astype(cupy.float32), got.astype(cupy.float32))


def test_graph_follows_new_parameters_and_checks_its_input():
    layer = _layer(0, BF16)
    x = cupy.asarray(np.random.default_rng(1).standard_normal((1, 20, 20, 64), dtype=np.float32).astype(BF16))
    g = layer.capture(x)
    before = g(x)
    layer.load_state_dict(_layer(0, BF16).state_dict() | {
        "proj.bias": np.full((64,), 0.5, np.float32)})
    after = g(x)
    assert cupy.array_equal(after.astype(cupy.float32), layer(x).astype(cupy.float32))
    assert not cupy.array_equal(after.astype(cupy.float32), before.astype(cupy.float32))
    with pytest.raises(ValueError, match="^x: expected a cupy.ndarray of shape"):
        g(x[:, :10])
    with pytest.raises(ValueError, match="^x: "):
        g(x.astype(cupy.float32))
    with pytest.raises(ValueError, match="^x: capture takes a float16 or bfloat16 CuPy array"):
        _layer(0, np.float32).capture(x.astype(cupy.float32))


def test_plan_call_on_the_gpu_is_graph_capturable():
    rng = np.random.default_rng(2)
    q, k, v = (cupy.asarray(rng.standard_normal((2, 4, 196, 64), dtype=np.float32).astype(BF16)) for _ in range(3))
    th, tw = (cupy.asarray(rng.standard_normal((27, 64), dtype=np.float32).astype(BF16)) for _ in range(2))
    p = relattn.plan(q, k, v, th, tw, (14, 14), (14, 14))
    want = p(q, k, v, th, tw)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        p(q, k, v, th, tw)
        stream.synchronize()
        stream.begin_capture()
        out = p(q, k, v, th, tw)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
    assert cupy.array_equal(out.view(cupy.uint16), want.view(cupy.uint16))


def _bits(a):
    return a.view(cupy.uint16) if a.dtype.itemsize == 2 else a


@pytest.mark.parametrize("window", [0, 14])
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=lambda d: d.name)
def test_captured_step_gives_the_vjps_bits(window, dtype):
    layer = _layer(window, dtype)
    rng = np.random.default_rng(3)

    def rand():
        return cupy.asarray(rng.standard_normal((2, 20, 20, 64), dtype=np.float32).astype(dtype))

    x, dy = rand(), rand()
    step = layer.capture_vjp(x)
    seen = []
    for x, dy in ((x, dy), (rand(), rand())):   # new values through the same graphs
        y, pullback = step(x)
        dx, grads = pullback(dy)
        y_want, pullback_want = layer.vjp(x)
        dx_want, grads_want = pullback_want(dy)
        assert cupy.array_equal(_bits(y), _bits(y_want))
        assert dx.dtype == dx_want.dtype and cupy.array_equal(_bits(dx), _bits(dx_want))
        assert sorted(grads) == sorted(grads_want) == sorted(layer.state_dict())
        for key in grads:
            assert grads[key].dtype == grads_want[key].dtype, key
            assert cupy.array_equal(_bits(grads[key]), _bits(grads_want[key])), key
        again = pullback(dy)[0]   # a pullback may run more than once before the next step
        assert cupy.array_equal(_bits(again), _bits(dx))
        seen.append(dx.astype(cupy.float32))
    assert not cupy.array_equal(seen[0], seen[1])


def test_captured_step_checks_its_pullback_and_follows_new_parameters():
    layer = _layer(0, BF16)
    rng = np.random.default_rng(4)
    x, dy = (cupy.asarray(rng.standard_normal((1, 20, 20, 64), dtype=np.float32).astype(BF16)) for _ in range(2))
    step = layer.capture_vjp(x)
    y0, pullback0 = step(x)
    grads0 = pullback0(dy)[1]
    with pytest.raises(ValueError, match="^dy: expected a cupy.ndarray of shape"):
        pullback0(dy[:, :10])
    with pytest.raises(ValueError, match="^dy: "):
        pullback0(dy.astype(cupy.float32))
    _, pullback1 = step(x)
    with pytest.raises(RuntimeError, match="^pullback: a later call of the captured step"):
        pullback0(dy)
    pullback1(dy)
    layer.load_state_dict(_layer(0, BF16).state_dict() | {"proj.weight": np.full((64, 64), 0.01, np.float32)})
    with pytest.raises(ValueError, match="^x: expected a cupy.ndarray of shape"):
        step(x[:, :10])   # not recorded again for another signature
    y2, pullback2 = step(x)
    dx2, grads2 = pullback2(dy)
    y_want, pullback_want = layer.vjp(x)
    dx_want, grads_want = pullback_want(dy)
    assert cupy.array_equal(_bits(y2), _bits(y_want)) and not cupy.array_equal(_bits(y2), _bits(y0))
    assert cupy.array_equal(_bits(dx2), _bits(dx_want))
    assert cupy.array_equal(_bits(grads2["qkv.weight"]), _bits(grads_want["qkv.weight"]))
    assert not cupy.array_equal(_bits(grads2["qkv.weight"]), _bits(grads0["qkv.weight"]))
    with pytest.raises(RuntimeError):
        pullback1(dy)
    with pytest.raises(ValueError, match="^x: capture takes a float16 or bfloat16 CuPy array"):
        _layer(0, np.float32).capture_vjp(x.astype(cupy.float32))
