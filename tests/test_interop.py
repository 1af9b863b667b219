"""DLPack interop (torch CPU here; CUDA tensors and JAX run on the GPU machine) and dispatch."""

import numpy as np
import pytest

import relattn
from relattn import backends


def _inputs(rng, shape=(2, 3, 12, 8), dtype=np.float32):
    q, k, v = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    th, tw = (rng.standard_normal((r, shape[-1])).astype(dtype) for r in (5, 7))
    return q, k, v, th, tw


def test_torch_tensors_in_torch_tensor_out():
    torch = pytest.importorskip("torch")
    q, k, v, th, tw = _inputs(np.random.default_rng(0))
    expected = relattn.rel_pos_attention(q, k, v, th, tw, (3, 4))
    tq, tk, tv, tth, ttw = (torch.from_numpy(a) for a in (q, k, v, th, tw))
    out = relattn.rel_pos_attention(tq, tk, tv, tth, ttw, (3, 4))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert np.array_equal(out.numpy(), expected)


def test_torch_input_is_shared_not_copied_and_not_modified():
    torch = pytest.importorskip("torch")
    from relattn._interop import wrap_result

    t = torch.randn(2, 3, 4, 5)
    arr, restore = wrap_result("x", t)
    assert arr.ctypes.data == t.data_ptr()  # zero-copy view
    before = t.clone()
    relattn.rel_pos_attention(t, t, t)
    assert torch.equal(t, before)


def test_torch_requires_grad_and_bfloat16():
    torch = pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    q, k, v, th, tw = _inputs(np.random.default_rng(1))
    tq = torch.from_numpy(q).requires_grad_(True)
    out = relattn.rel_pos_attention(tq, torch.from_numpy(k), torch.from_numpy(v))
    assert isinstance(out, torch.Tensor)
    bq, bk, bv = (torch.from_numpy(a).to(torch.bfloat16) for a in (q, k, v))
    out16 = relattn.rel_pos_attention(bq, bk, bv)
    assert out16.dtype == torch.bfloat16
    ref = relattn.rel_pos_attention(*(a.float().numpy() for a in (bq, bk, bv)))
    np.testing.assert_allclose(out16.float().numpy(), ref, rtol=0, atol=2e-2)


def test_module_and_windows_with_torch():
    torch = pytest.importorskip("torch")
    layer = relattn.Attention(32, 4, use_rel_pos=True, input_size=(6, 6), rel_pos_zero_init=False, rng=2)
    x = np.random.default_rng(3).standard_normal((1, 6, 6, 32), dtype=np.float32)
    out = layer(torch.from_numpy(x), window_size=4)
    assert isinstance(out, torch.Tensor)
    assert np.array_equal(out.numpy(), layer(x, window_size=4))
    windows, pad_hw = relattn.window_partition(torch.from_numpy(x), 4)
    assert isinstance(windows, torch.Tensor) and pad_hw == (8, 8)
    back = relattn.window_unpartition(windows, 4, pad_hw, (6, 6))
    assert isinstance(back, torch.Tensor) and torch.equal(back, torch.from_numpy(x))
    rel_h, rel_w = relattn.decomposed_rel_pos(torch.zeros(2, 36, 8), torch.ones(11, 8), torch.ones(11, 8), (6, 6), (6, 6))
    assert isinstance(rel_h, torch.Tensor) and tuple(rel_w.shape) == (2, 36, 6)


def test_forced_unknown_backend_names_the_choices():
    q, k, v, *_ = _inputs(np.random.default_rng(4))
    with pytest.raises(ValueError, match="backend.*auto"):
        relattn.rel_pos_attention(q, k, v, backend="tpu")


def test_forced_unavailable_backend_says_why():
    q, k, v, *_ = _inputs(np.random.default_rng(5))
    missing = [n for n in backends.names() if n not in backends.available()]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(relattn.BackendError, match=missing[0]):
        relattn.rel_pos_attention(q, k, v, backend=missing[0])


def test_explain_names_the_choice_and_the_others():
    q, k, v, th, tw = _inputs(np.random.default_rng(6))
    report = relattn.explain(q, k, v, th, tw, (3, 4))
    chosen = report.splitlines()[0].split("'")[1]
    assert chosen == [n for n in backends.names() if n in backends.available()
                      and backends.get(n).ARRAY_MODULE == "numpy"][0]
    for other in backends.names():
        if other != chosen:
            assert repr(other) in report
    # The choice explain reports is the one the call takes: same result as forcing it.
    assert np.array_equal(relattn.rel_pos_attention(q, k, v, th, tw, (3, 4)),
                          relattn.rel_pos_attention(q, k, v, th, tw, (3, 4), backend=chosen))


def test_reference_refuses_logits_that_cannot_fit(monkeypatch):
    from relattn.backends import reference

    monkeypatch.setattr(reference, "MAX_HEAD_BYTES", 100)
    q, k, v, *_ = _inputs(np.random.default_rng(7))
    with pytest.raises(relattn.BackendError, match="fused backend"):
        relattn.rel_pos_attention(q, k, v, backend="numpy")
