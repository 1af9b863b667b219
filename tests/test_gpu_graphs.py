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


def _step_matches_vjp(step, twin, x, dy):
    """One captured step against ``twin.vjp`` with the step's parameters
    loaded (bits of y, dx and every gradient); returns (y, grads)."""
    y, pullback = step(x)
    dx, grads = pullback(dy)
    twin.load_state_dict(step.parameters)
    y_want, pullback_want = twin.vjp(x)
    dx_want, grads_want = pullback_want(dy)
    assert cupy.array_equal(_bits(y), _bits(y_want))
    assert cupy.array_equal(_bits(dx), _bits(dx_want))
    assert sorted(grads) == sorted(grads_want) == sorted(step.parameters)
    for key in grads:
        assert grads[key].dtype == grads_want[key].dtype == step.parameters[key].dtype, key
        assert cupy.array_equal(_bits(grads[key]), _bits(grads_want[key])), key
    return y, grads


@pytest.mark.parametrize("window", [0, 14])
@pytest.mark.parametrize("layer_dtype", [BF16, np.dtype(np.float32)], ids=lambda d: d.name)
def test_captured_step_follows_parameters_updated_in_place(window, layer_dtype):
    """An optimizer writing into step.parameters between steps: the next
    replay uses the new values (no new recording), with vjp's bits; the
    layer keeps its own parameters until they are loaded back."""
    from relattn.backends.gpu.cublas import cast_into

    def make():
        return relattn.Attention(64, 4, use_rel_pos=True, input_size=(14, 14) if window else (20, 20),
                                 rng=0, window_size=window, dtype=layer_dtype, rel_pos_zero_init=False)

    layer, twin = make(), make()
    before = layer.state_dict()
    rng = np.random.default_rng(5)
    x, dy = (cupy.asarray(rng.standard_normal((2, 20, 20, 64), dtype=np.float32).astype(BF16)) for _ in range(2))
    step = layer.capture_vjp(x)
    graphs = step._graphs
    assert {k: p.dtype for k, p in step.parameters.items()} == {k: p.dtype for k, p in before.items()}
    outputs = []
    for _ in range(3):
        y, grads = _step_matches_vjp(step, twin, x, dy)
        outputs.append(y.astype(cupy.float32))
        for key, p in step.parameters.items():   # SGD, in place
            cast_into(p.astype(cupy.float32) - 0.05 * grads[key].astype(cupy.float32), p)
    assert step._graphs is graphs
    assert not cupy.array_equal(outputs[0], outputs[1]) and not cupy.array_equal(outputs[1], outputs[2])
    for key, p in layer.state_dict().items():
        assert np.array_equal(p.astype(np.float32), before[key].astype(np.float32)), key
    layer.load_state_dict(step.parameters)
    assert np.array_equal(layer.state_dict()["qkv.weight"].astype(np.float32),
                          step.parameters["qkv.weight"].get().astype(np.float32))


def test_captured_step_takes_parameters_set_on_the_layer():
    layer, twin = _layer(14, BF16), _layer(14, BF16)
    rng = np.random.default_rng(6)
    x, dy = (cupy.asarray(rng.standard_normal((1, 20, 20, 64), dtype=np.float32).astype(BF16)) for _ in range(2))
    step = layer.capture_vjp(x)
    graphs = step._graphs
    y0, _ = _step_matches_vjp(step, twin, x, dy)
    new = relattn.Attention(64, 4, use_rel_pos=True, input_size=(14, 14), rng=7, window_size=14, dtype=BF16,
                            rel_pos_zero_init=False).state_dict()
    layer.load_state_dict(new)   # copied into step.parameters on the next call, no new recording
    y1, _ = _step_matches_vjp(step, twin, x, dy)
    assert step._graphs is graphs and not cupy.array_equal(_bits(y0), _bits(y1))
    for key, p in step.parameters.items():
        assert np.array_equal(p.get().astype(np.float32), new[key].astype(np.float32)), key
    layer.qkv_bias = None   # another structure: recorded again
    twin.qkv_bias = None
    _step_matches_vjp(step, twin, x, dy)
    assert step._graphs is not graphs and "qkv.bias" not in step.parameters


def _round_once(src, dt):
    """src rounded once to dt (nearest even). float64 -> bfloat16 goes through
    float32 rounded to odd, which keeps the one rounding exact: some ml_dtypes
    releases round that cast twice (through float32 to nearest), e.g. 1 +
    2**-8 + 2**-40 to 1.0 instead of 1 + 2**-7."""
    if not (src.dtype == np.float64 and dt == BF16):
        return src.astype(dt)
    f32 = src.astype(np.float32)
    inexact = np.isfinite(src) & (f32.astype(np.float64) != src)
    over = inexact & (np.abs(f32.astype(np.float64)) > np.abs(src))   # rounded away from zero: step back
    f32 = np.where(over, np.nextafter(f32, np.float32(0)), f32)
    bits = f32.view(np.uint32) | inexact.astype(np.uint32)
    return bits.view(np.float32).astype(dt)


def test_round_once_helper_is_single_rounding():
    """The test's float64 -> bfloat16 reference: halfway cases decided by
    the bits below float32, overflow and subnormals kept."""
    x = np.array([1 + 2.0**-8 + 2.0**-40, 1 + 2.0**-8, 1 + 2.0**-8 - 2.0**-40, -(1 + 2.0**-8 + 2.0**-40),
                  3.4e38, 1e39, 1e-40, 0.0])
    got = _round_once(x, BF16).view(np.uint16)
    assert [hex(int(b)) for b in got[:4]] == ["0x3f81", "0x3f80", "0x3f80", "0xbf81"]
    assert got[5] == 0x7f80 and got[7] == 0   # 1e39: inf, as float32 rounding would give
    assert _round_once(x[6:7], BF16).astype(np.float64)[0] > 0


def test_cast_into_rounds_once_as_the_host_does():
    from relattn.backends.gpu.cublas import cast_into

    one = 1.0
    f64 = np.array([0.0, -0.0, one, one + 2.0**-8 + 2.0**-40, one + 2.0**-8, one + 3 * 2.0**-8,
                    one + 2.0**-11 + 2.0**-40, 65504.0, 65520.0, 70000.0, 3.3e38, 3.4e38, 1e39, -1e39,
                    1e-8, 6e-8, 1e-40, np.inf, -np.inf, np.nan, 0.1, -2.5e-5, 1.0 / 3.0])
    rng = np.random.default_rng(8)
    f64 = np.concatenate([f64, rng.standard_normal(4000) * np.exp(rng.uniform(-20, 20, 4000))])
    with np.errstate(over="ignore"):
        sources = [f64, f64.astype(np.float32), f64.astype(np.float16), f64.astype(BF16)]
    for src in sources:
        for dt in (np.dtype(np.float32), np.dtype(np.float16), BF16):
            with np.errstate(over="ignore", invalid="ignore"):
                want = _round_once(src, dt)
            got = cupy.empty(src.shape, dtype=dt)
            cast_into(cupy.asarray(src), got)
            got = got.get()
            nan = np.isnan(want.astype(np.float64))
            assert np.array_equal(np.isnan(got.astype(np.float64)), nan), (src.dtype, dt)
            bits = np.uint16 if dt.itemsize == 2 else np.uint32
            wrong = np.nonzero((got.view(bits) != want.view(bits)) & ~nan)[0]
            assert wrong.size == 0, (src.dtype, dt, [(float(src[i]), hex(int(got.view(bits)[i])),
                                                       hex(int(want.view(bits)[i]))) for i in wrong[:8]])
