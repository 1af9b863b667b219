"""The whole layer and the interop on the GPU (skipped without CuPy and a CUDA device)."""

import zlib

import numpy as np
import pytest

import relattn

cp = pytest.importorskip("cupy")
try:
    _has_device = cp.cuda.runtime.getDeviceCount() > 0
except Exception:  # noqa: BLE001
    _has_device = False
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_device, reason="no CUDA device")]

from relattn.backends.gpu.cublas import to_float32  # noqa: E402

BF16 = relattn._arrays.BFLOAT16


def _layer(dtype="float32", input_size=(14, 14), window_size=0, seed=0):
    layer = relattn.Attention(64, 4, use_rel_pos=True, rel_pos_zero_init=False, input_size=input_size,
                              window_size=window_size, dtype=dtype, rng=seed)
    layer.rel_pos_h = layer.rel_pos_h * 20  # make the bias matter
    layer.rel_pos_w = layer.rel_pos_w * 20
    return layer


def _reference(layer, x_host, window_size=None):
    ref = relattn.Attention(layer.dim, layer.num_heads, use_rel_pos=True, input_size=layer.input_size,
                            window_size=layer.window_size, dtype="float64", backend="numpy")
    ref.load_state_dict({k: v.astype(np.float64) for k, v in layer.state_dict().items()})
    return ref(x_host.astype(np.float64), window_size=window_size)


def _rel_l2(got, ref):
    got = np.asarray(got, dtype=np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("grid", [(14, 14), (16, 12)])
def test_layer_float32_on_gpu_matches_reference(grid):
    layer = _layer()
    x = np.random.default_rng(1).standard_normal((2, *grid, 64), dtype=np.float32)
    out = layer(cp.asarray(x))
    assert isinstance(out, cp.ndarray) and out.dtype == cp.float32
    ref = _reference(layer, x)
    np.testing.assert_allclose(out.get(), ref, rtol=0, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("window_size", [0, 7])
def test_layer_half_on_gpu(dtype, window_size):
    if dtype == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes missing")
    layer = _layer(dtype, input_size=(7, 7) if window_size else (14, 14), window_size=window_size)
    x = np.random.default_rng(2).standard_normal((1, 14, 14, 64), dtype=np.float32)
    x_half = x.astype(layer.dtype)
    out = layer(cp.asarray(x_half))
    assert out.dtype == layer.dtype and out.shape == x.shape
    ref = _reference(layer, x_half.astype(np.float32))
    err = _rel_l2(to_float32(out).get(), ref)
    assert err <= (4e-3 if dtype == "bfloat16" else 1e-3), err


def test_layer_on_non_default_stream_and_no_host_copy():
    layer = _layer()
    x = cp.asarray(np.random.default_rng(3).standard_normal((1, 14, 14, 64), dtype=np.float32))
    expected = layer(x).get()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        out = layer(x)
    stream.synchronize()
    np.testing.assert_array_equal(out.get(), expected)


def test_torch_cuda_tensors_round_trip():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    layer = _layer()
    x = torch.randn(1, 14, 14, 64, device="cuda")
    out = layer(x)
    assert isinstance(out, torch.Tensor) and out.is_cuda
    expected = layer(x.cpu().numpy())
    np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=0, atol=1e-5)
    q = torch.randn(1, 2, 16, 8, device="cuda", dtype=torch.bfloat16)
    core = relattn.rel_pos_attention(q, q, q)
    assert isinstance(core, torch.Tensor) and core.is_cuda and core.dtype == torch.bfloat16


def test_jax_arrays_round_trip():
    jnp = pytest.importorskip("jax.numpy")
    import jax

    q = np.random.default_rng(4).standard_normal((1, 2, 16, 8), dtype=np.float32)
    jq = jnp.asarray(q)
    out = relattn.rel_pos_attention(jq, jq, jq)
    assert isinstance(out, jax.Array)
    np.testing.assert_allclose(np.asarray(out), relattn.rel_pos_attention(q, q, q, backend="numpy"),
                               rtol=0, atol=2e-5)


def test_cupy_dask_chunks():
    da = pytest.importorskip("dask.array")
    import relattn.dask

    layer = _layer()
    x = np.random.default_rng(5).standard_normal((4, 14, 14, 64), dtype=np.float32)
    dx = da.from_array(cp.asarray(x), chunks=(1, 14, 14, 64), asarray=False)
    out = relattn.dask.attention(layer, dx).compute(scheduler="synchronous")
    assert isinstance(out, cp.ndarray)
    np.testing.assert_allclose(out.get(), layer(x), rtol=0, atol=2e-5)


def test_demo_runs_on_gpu():
    from relattn.cli import main

    assert main(["--grid", "32"]) == 0
    assert main(["--grid", "32", "--dtype", "bfloat16"]) == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_is_deterministic(dtype):
    layer = _layer(dtype)
    x = cp.asarray(np.random.default_rng(6).standard_normal((2, 14, 14, 64), dtype=np.float32).astype(layer.dtype))
    a, b = layer(x), layer(x)
    assert cp.array_equal(a.view(cp.uint8), b.view(cp.uint8))


def test_gpu_nan_behaviour_matches_the_cpu():
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 2, 16, 8), dtype=np.float32) for _ in range(3))
    q[0, 0, 3, 0] = np.nan       # query row 3 of head 0 -> that row NaN
    k[0, 1, 5, 2] = np.nan       # key 5 of head 1 -> every row of head 1 NaN
    th, tw = (rng.standard_normal((7, 8), dtype=np.float32) for _ in range(2))
    cpu = relattn.rel_pos_attention(q, k, v, th, tw, (4, 4), backend="numpy")
    gpu = relattn.rel_pos_attention(*(cp.asarray(a) for a in (q, k, v, th, tw)), (4, 4)).get()
    np.testing.assert_array_equal(np.isnan(gpu), np.isnan(cpu))
    assert np.isnan(gpu[0, 0, 3]).all() and np.isfinite(gpu[0, 0, :3]).all() and np.isnan(gpu[0, 1]).all()


def test_respects_the_current_device_and_a_second_one():
    n = cp.cuda.runtime.getDeviceCount()
    rng = np.random.default_rng(8)
    q = rng.standard_normal((1, 2, 16, 8), dtype=np.float32)
    th = rng.standard_normal((7, 8), dtype=np.float32)
    expected = relattn.rel_pos_attention(q, q, q, th, th, (4, 4), backend="numpy")
    for device in range(min(n, 2)):
        with cp.cuda.Device(device):
            out = relattn.rel_pos_attention(*(cp.asarray(a) for a in (q, q, q, th, th)), (4, 4))
            assert out.device.id == device
            np.testing.assert_allclose(out.get(), expected, rtol=0, atol=2e-5)
    if n < 2:
        pytest.skip("only one CUDA device: the second-device half did not run")


def test_forced_cpu_backend_with_cupy_arrays_comes_back_on_the_gpu():
    q = cp.asarray(np.random.default_rng(9).standard_normal((1, 1, 9, 4), dtype=np.float32))
    out = relattn.rel_pos_attention(q, q, q, backend="numba")
    assert isinstance(out, cp.ndarray)
    np.testing.assert_allclose(out.get(), relattn.rel_pos_attention(q.get(), q.get(), q.get()), atol=1e-6)


# ------------------------------------------------ window partition kernels
_WIN_DTYPES = ["bfloat16", "float16", "float32", "float64", "int8", "complex128"]


def _host_dtype(name):
    return BF16 if name == "bfloat16" else np.dtype(name)


@pytest.mark.parametrize("dtype", _WIN_DTYPES)
@pytest.mark.parametrize("shape, ws", [((2, 5, 6, 3), 4), ((1, 64, 64, 8), 14), ((1, 14, 14, 16), 14),
                                       ((3, 7, 9, 1), 2), ((2, 3, 3, 5), 7), ((0, 4, 4, 2), 2)])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "offset"])
def test_window_kernels_match_numpy_bit_for_bit(dtype, shape, ws, layout):
    """The CuPy partition / unpartition kernels move the same bits as the
    numpy path (padding zeros included), for any dtype, strided and
    misaligned inputs (word sizes 1 to 16 bytes)."""
    if dtype == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes missing")
    dt = _host_dtype(dtype)
    rng = np.random.default_rng(zlib.crc32(repr((dtype, shape, ws, layout)).encode()))
    wide = (shape[0] + 1, shape[1], shape[2], 2 * shape[3])
    bits = rng.integers(0, 256, size=(*wide, dt.itemsize), dtype=np.uint8)
    host_wide = bits.view(dt).reshape(wide)
    dev_wide = cp.asarray(bits).view(dt).reshape(wide)
    if layout == "contiguous":
        host, dev = (np.ascontiguousarray(host_wide[1:, :, :, : shape[3]]),
                     cp.ascontiguousarray(cp.asarray(bits[1:, :, :, : shape[3]]).view(dt).reshape(shape)))
    elif layout == "strided":
        host, dev = host_wide[1:, :, :, ::2], dev_wide[1:, :, :, ::2]
    else:  # contiguous, base one element past an aligned address
        flat = cp.asarray(np.concatenate([bits[:1, 0, 0, 0].ravel(), bits[1:, :, :, : shape[3]].ravel()]))
        dev = flat[dt.itemsize:].view(dt).reshape(shape) if flat.size > dt.itemsize else cp.empty(shape, dt)
        host = np.ascontiguousarray(host_wide[1:, :, :, : shape[3]])
        if dev.size and dt.itemsize < 16:
            assert dev.data.ptr % 16 != 0
    dev_before = dev.view(cp.uint8).get() if dev.flags.c_contiguous else None
    win_h, pad_h = relattn.window_partition(host, ws)
    win_d, pad_d = relattn.window_partition(dev, ws)
    assert pad_d == pad_h and win_d.shape == win_h.shape and win_d.dtype == win_h.dtype
    np.testing.assert_array_equal(win_d.view(cp.uint8).get(), win_h.view(np.uint8))
    back = relattn.window_unpartition(win_d, ws, pad_d, shape[1:3])
    assert isinstance(back, cp.ndarray) and back.shape == shape and back.flags.c_contiguous
    np.testing.assert_array_equal(back.view(cp.uint8).get(), np.ascontiguousarray(host).view(np.uint8))
    if dev_before is not None:  # input untouched
        np.testing.assert_array_equal(dev.view(cp.uint8).get(), dev_before)


def test_windowed_layer_on_gpu_uses_the_kernels():
    """SAM-B-like windowed bf16 layer: same result as the numpy-partitioned path."""
    layer = _layer("bfloat16", input_size=(7, 7), window_size=7)
    x = np.random.default_rng(5).standard_normal((1, 16, 19, 64)).astype(np.float32)
    got = layer(relattn._arrays.astype(cp.asarray(x), BF16))
    ref = _reference(layer, x.astype(BF16).astype(np.float32))
    assert _rel_l2(relattn._arrays.astype(got, np.float32).get(), ref) <= 1e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parameter_assignment_reaches_the_device_copies(dtype):
    """The layer caches its parameters on the device; assigning a new array
    (the only way to change one: the getters return read-only views) is seen
    by the next GPU call."""
    layer = _layer(dtype)
    x = cp.asarray(np.random.default_rng(2).standard_normal((1, 14, 14, 64)).astype(np.float32))
    x = relattn._arrays.astype(x, layer.dtype)
    before = relattn._arrays.astype(layer(x), np.float32).get()
    with pytest.raises(ValueError, match="read-only"):
        layer.proj_bias[...] = 1
    layer.proj_bias = layer.proj_bias + 1
    after = relattn._arrays.astype(layer(x), np.float32).get()
    np.testing.assert_allclose(after, before + 1, rtol=0, atol=0.07 if dtype == "bfloat16" else 1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", ["global", "windowed", "padded", "strided", "override", "batch0"])
def test_layer_plans(dtype, case, monkeypatch):
    """Half-precision CuPy calls of the layer run a cached plan per signature
    of x: built once, then the same bits on every call, float64-reference
    accuracy, and a new plan after a parameter assignment."""
    if dtype == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes missing")
    shape, ws, call_ws = {"global": ((2, 14, 14, 64), 0, None), "windowed": ((1, 14, 14, 64), 7, None),
                          "padded": ((2, 16, 19, 64), 7, None), "strided": ((1, 14, 14, 64), 7, None),
                          "override": ((1, 14, 14, 64), 7, 0), "batch0": ((0, 14, 14, 64), 7, None)}[case]
    layer = _layer(dtype, input_size=(7, 7) if ws else (14, 14), window_size=ws)
    rng = np.random.default_rng(zlib.crc32(repr((dtype, case)).encode()))
    x = rng.standard_normal(shape[:3] + (128 if case == "strided" else 64,)).astype(np.float32).astype(layer.dtype)
    xd = cp.asarray(x)
    if case == "strided":
        x, xd = x[..., ::2], xd[..., ::2]
    builds = []
    build = type(layer)._build_gpu_plan
    monkeypatch.setattr(type(layer), "_build_gpu_plan", lambda self, *a: builds.append(1) or build(self, *a))
    outs = [to_float32(layer(xd, window_size=call_ws)).get() for _ in range(3)]
    assert len(builds) == 1
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    assert outs[0].shape == x.shape
    if x.shape[0]:
        ref = _reference(layer, np.asarray(x, dtype=np.float32), window_size=call_ws)
        assert _rel_l2(outs[0], ref) <= (4e-3 if dtype == "bfloat16" else 1e-3)
        layer.proj_bias = layer.proj_bias + 1   # clears the plans
        again = to_float32(layer(xd, window_size=call_ws)).get()
        assert len(builds) == 2
        np.testing.assert_allclose(again, outs[0] + 1, rtol=0, atol=0.07)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("window_size", [0, 5])
def test_half_layer_vjp_on_gpu(dtype, window_size):
    """A 16-bit layer's vjp on CuPy input: y is the forward's result bit for
    bit (the same planned path), the attention goes through the fused 16-bit
    backward, and dx and every gradient are within 2e-2 (relative to each
    one's largest entry) of the float32 layer's vjp on the same values."""
    if dtype == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes missing")
    from relattn.backends.gpu import backward

    layer = _layer(dtype, input_size=(5, 5) if window_size else (12, 10), window_size=window_size)
    wide = _layer("float32", input_size=layer.input_size, window_size=window_size)
    wide.load_state_dict({k: v.astype(np.float32) for k, v in layer.state_dict().items()})
    rng = np.random.default_rng(30)
    x_host = rng.standard_normal((2, 12, 10, 64)).astype(layer.dtype)
    x = cp.asarray(x_host.view(np.uint16)).view(layer.dtype) if dtype == "bfloat16" else cp.asarray(x_host)
    calls = []
    real = backward.fused_core_backward
    backward.fused_core_backward = lambda *a: calls.append(1) or real(*a)
    try:
        y, pullback = layer.vjp(x)
        assert cp.array_equal(y.view(cp.uint16), layer(x).view(cp.uint16))
        dy_host = rng.standard_normal(y.shape).astype(layer.dtype)
        dy = cp.asarray(dy_host.view(np.uint16)).view(layer.dtype) if dtype == "bfloat16" else cp.asarray(dy_host)
        dx, grads = pullback(dy)
    finally:
        backward.fused_core_backward = real
    assert calls == [1]
    y32, pullback32 = wide.vjp(to_float32(x))
    dx32, grads32 = pullback32(to_float32(dy))
    assert dx.dtype == layer.dtype and dx.shape == x.shape
    pairs = [("dx", dx, dx32)] + [(key, grads[key], grads32[key]) for key in grads32]
    assert sorted(grads) == sorted(grads32)
    for name, got, want in pairs:
        assert got.dtype == layer.dtype, name
        g = to_float32(got).get().astype(np.float64)
        w = want.get().astype(np.float64)
        assert np.all(np.isfinite(g)), name
        assert np.abs(g - w).max() <= 2e-2 * np.abs(w).max(), (name, np.abs(g - w).max() / np.abs(w).max())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("n, m, k", [(37, 24, 16), (5, 9, 8), (0, 8, 8)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_half_projection_is_a_half_linear(dtype, n, m, k, with_bias):
    # cuBLAS writes x @ W.T + b in the half type: float32 accumulation of half
    # operands, the bias rounded to the half type first, one rounding at the end
    # (within one unit in the last place of float64 arithmetic rounded once; odd
    # m takes the bias fill's one-value-per-thread path)
    from relattn.backends.gpu.cublas import linear_half, linear_half_plan

    if dtype == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes missing")
    half = np.dtype(BF16 if dtype == "bfloat16" else np.float16)
    dev = lambda a: cp.asarray(a.view(np.uint16)).view(half)  # noqa: E731
    rng = np.random.default_rng(n + m)
    x = rng.standard_normal((n, k)).astype(half)
    w = rng.standard_normal((m, k)).astype(half)
    b = (rng.standard_normal(m) * 4).astype(np.float32) if with_bias else None
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    if with_bias:
        exact += b.astype(half).astype(np.float64)
    want = exact.astype(half).astype(np.float64)
    tol = np.abs(want) * 2.0 ** -(7 if dtype == "bfloat16" else 10) + 1e-30
    for got in (linear_half(dev(x), dev(w), None if b is None else cp.asarray(b), half),
                linear_half_plan(n, dev(w), None if b is None else dev(b.astype(half)), half)(dev(x))):
        assert got.dtype == half and got.shape == (n, m)
        got = to_float32(got).get().astype(np.float64)
        assert np.all(np.abs(got - want) <= tol), np.max(np.abs(got - want) / tol)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_projection_input_copies_with_the_bias_tail(dtype):
    # the window partition and the heads' merge that feed the projections append
    # [1, 0, ..., 0] to every token (padding tokens too) and move the values bit
    # for bit; without the tail they are the plain copies
    from relattn.backends.gpu import windows

    if dtype == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes missing")
    half = np.dtype(BF16 if dtype == "bfloat16" else np.float16)
    dev = lambda a: cp.asarray(a.view(np.uint16)).view(half)  # noqa: E731
    bits = lambda a: a.view(cp.uint16).get()  # noqa: E731
    one = np.array(1.0, dtype=half).view(np.uint16)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 7, 24)).astype(half)
    padded = np.zeros((2, 8, 8, 24), dtype=half)
    padded[:, :5, :7] = x
    wins = padded.reshape(2, 2, 4, 2, 4, 24).transpose(0, 1, 3, 2, 4, 5).reshape(8, 4, 4, 24).view(np.uint16)
    tail = np.zeros(wins.shape[:-1] + (windows.TAIL,), dtype=np.uint16)
    tail[..., 0] = one
    got = bits(windows.partition_plan(dev(x), 4, 8, 8, tail=True)(dev(x)))
    np.testing.assert_array_equal(got, np.concatenate([wins, tail], axis=-1))
    np.testing.assert_array_equal(bits(windows.partition_plan(dev(x), 4, 8, 8)(dev(x))), wins)
    rows = x.reshape(70, 24)
    got = bits(windows.tail_plan(dev(rows))(dev(rows)).reshape(70, -1))
    np.testing.assert_array_equal(got[:, :24], rows.view(np.uint16))
    np.testing.assert_array_equal(got[:, 24:], tail.reshape(-1, windows.TAIL)[:70])
    a = rng.standard_normal((3, 4, 6, 8)).astype(half)      # (B, heads, S, D)
    merged = a.transpose(0, 2, 1, 3).reshape(3, 6, 32).view(np.uint16)
    got = bits(windows.merge_heads_plan(dev(a), tail=True)(dev(a)))
    np.testing.assert_array_equal(got[..., :32], merged)
    np.testing.assert_array_equal(got[..., 32:], tail.reshape(-1, windows.TAIL)[:18].reshape(3, 6, -1))
    np.testing.assert_array_equal(bits(windows.merge_heads_plan(dev(a))(dev(a))), merged)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "uint8"])
def test_copy_rows_between_strided_layouts(dtype):
    # the heads' splits and merges of the layer's backward: rows contiguous on
    # both sides, the outer axes strided, words of 16 bytes down to one byte
    from relattn.backends.gpu import windows
    from relattn.backends.gpu.cublas import contiguous

    if dtype == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes missing")
    dt = np.dtype(BF16 if dtype == "bfloat16" else dtype)
    rng = np.random.default_rng(5)
    for shape in ((2, 7, 3, 4, 64), (1, 5, 3, 3, 5), (3, 4, 3, 2, 24)):
        host = rng.integers(0, 256, size=shape[:-1] + (shape[-1] * dt.itemsize,), dtype=np.uint8).view(dt)
        qkv = cp.asarray(host.view(np.uint8)).view(dt)            # (B, S, 3, heads, D) bits as on the host
        for i in range(3):
            view = qkv[:, :, i].transpose(0, 2, 1, 3)              # (B, heads, S, D), strided
            got = contiguous(view)
            assert got.flags.c_contiguous and got.shape == view.shape
            np.testing.assert_array_equal(got.get().view(np.uint8),
                                          np.ascontiguousarray(host[:, :, i].transpose(0, 2, 1, 3)).view(np.uint8))
        back = cp.zeros_like(qkv)
        for i in range(3):   # and into a strided slot of a wider buffer
            src = cp.ascontiguousarray(qkv[:, :, i].transpose(0, 2, 1, 3))
            assert windows.copy_rows(src.transpose(0, 2, 1, 3), back[:, :, i]) is not None
        np.testing.assert_array_equal(back.get().view(np.uint8), host.view(np.uint8))
        offset = cp.zeros(qkv.size + 1, dtype=dt)[1:].reshape(qkv.shape)   # a base address off 16 bytes
        windows.copy_rows(qkv[:, :, 1], offset[:, :, 1])
        np.testing.assert_array_equal(offset[:, :, 1].get().view(np.uint8), host[:, :, 1].view(np.uint8))
    with pytest.raises(ValueError, match="copy_rows"):
        windows.copy_rows(qkv[..., ::2], cp.empty(qkv[..., ::2].shape, dtype=dt))
