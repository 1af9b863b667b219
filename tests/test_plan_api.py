"""relattn.plan: a planned call gives rel_pos_attention's bits and checks only
the arrays' signature; explain names the kernel."""

from __future__ import annotations

import numpy as np
import pytest

import relattn

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

DTYPES = [np.float32, np.float64, np.float16] + ([BF16] if BF16 is not None else [])


def _arrays(dtype, q_size=(3, 5), k_size=(4, 4), B=2, H=3, d=8, xp=np, seed=0):
    rng = np.random.default_rng(seed)
    Sq, Sk = q_size[0] * q_size[1], k_size[0] * k_size[1]
    q = rng.standard_normal((B, H, Sq, d)).astype(dtype)
    k, v = (rng.standard_normal((B, H, Sk, d)).astype(dtype) for _ in range(2))
    th = rng.standard_normal((7, d)).astype(dtype)     # resized to 2 * 4 - 1 = 7: as is
    tw = rng.standard_normal((6, d)).astype(dtype)     # resized to 9
    return [xp.asarray(a) for a in (q, k, v, th, tw)]


def _on(backend, arrays):
    if relattn.backends.get(backend).ARRAY_MODULE == "cupy":
        import cupy

        return [cupy.asarray(a) for a in arrays]
    return arrays


def _host(a):
    return a.get() if hasattr(a, "get") else a


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_plan_gives_the_calls_bits(backend, dtype):
    arrays = _on(backend, _arrays(dtype))
    if backend == "cupy" and np.dtype(dtype) == np.float64:
        pytest.skip("float64 tables on the GPU: computed by einsum, same path either way")
    p = relattn.plan(*arrays, (3, 5), (4, 4), backend=backend)
    assert p.backend == backend and isinstance(p.kernel, str) and p.kernel
    want = relattn.rel_pos_attention(*arrays, (3, 5), (4, 4), backend=backend)
    for _ in range(2):
        got = p(*arrays)
        assert type(got) is type(want) and got.dtype == want.dtype
        np.testing.assert_array_equal(_host(got).astype(np.float64), _host(want).astype(np.float64))
    other = _on(backend, _arrays(dtype, seed=1))   # new values, same signature
    np.testing.assert_array_equal(_host(p(*other)).astype(np.float64),
                                  _host(relattn.rel_pos_attention(*other, (3, 5), (4, 4), backend=backend))
                                  .astype(np.float64))


def test_plan_without_tables_and_from_shapes():
    q, k, v = _arrays(np.float32)[:3]
    p = relattn.plan(q.shape, k.shape, v.shape, dtype="float32")
    np.testing.assert_array_equal(p(q, k, v), relattn.rel_pos_attention(q, k, v))
    p2 = relattn.plan(q.shape, k.shape, v.shape, (7, 8), (6, 8), (3, 5), (4, 4), dtype=np.float32)
    th, tw = _arrays(np.float32)[3:]
    np.testing.assert_array_equal(p2(q, k, v, th, tw), relattn.rel_pos_attention(q, k, v, th, tw, (3, 5), (4, 4)))


def test_plan_checks_the_signature():
    q, k, v, th, tw = _arrays(np.float32)
    p = relattn.plan(q, k, v, th, tw, (3, 5), (4, 4))
    with pytest.raises(ValueError, match=r"^q: expected an array of the planned signature"):
        p(q[:1], k, v, th, tw)
    with pytest.raises(ValueError, match=r"^k: .*dtype float32.*got.*float64"):
        p(q, k.astype(np.float64), v, th, tw)
    with pytest.raises(ValueError, match=r"^v: .*strides"):
        p(q, k, np.asfortranarray(v), th, tw)
    with pytest.raises(TypeError, match=r"^rel_pos_h: expected ndarray, got list"):
        p(q, k, v, th.tolist(), tw)
    with pytest.raises(ValueError, match=r"^rel_pos_w: the plan was made without it"):
        relattn.plan(q, k, v)(q, k, v, None, tw)


def test_plan_argument_errors():
    q, k, v, th, tw = _arrays(np.float32)
    with pytest.raises(ValueError, match="^kernel: only the GPU backend"):
        relattn.plan(q, k, v, th, tw, (3, 5), (4, 4), backend="numpy", kernel="ws")
    with pytest.raises(TypeError, match="^kernel_options: expected a dict"):
        relattn.plan(q, k, v, th, tw, (3, 5), (4, 4), kernel="ws", kernel_options=[1])
    with pytest.raises(ValueError, match="^dtype: given with arrays"):
        relattn.plan(q, k, v, dtype="float32")
    with pytest.raises(ValueError, match="^array_type:"):
        relattn.plan(q.shape, k.shape, v.shape, array_type="torch")
    with pytest.raises(ValueError, match="^q_size"):
        relattn.plan(q, k, v, th, tw, (5, 5), (4, 4))


def test_explain_names_the_kernel(backend):
    arrays = _on(backend, _arrays(np.float32))
    text = relattn.explain(*arrays, (3, 5), (4, 4), backend=backend)
    lines = text.splitlines()
    assert lines[0] == f"backend {backend!r} runs these inputs"
    assert lines[1].startswith("  kernel: ")
    if backend == "cupy":
        assert lines[1].split()[1].startswith("relattn_")
        assert relattn.plan(*arrays, (3, 5), (4, 4), backend=backend).kernel == lines[1][len("  kernel: "):]
