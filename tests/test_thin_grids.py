"""Grids with a long side: the rel_h / rel_w terms grow with a grid side
(Sq * (k_h + k_w) values, the gathered tables q_w * k_w * C), so on numpy
inputs they are computed by chunks of query rows once they pass
``functional.TERMS_BUDGET``. Memory stays bounded; results agree with the
whole-grid terms."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import relattn
from relattn import functional


def _problem(q_size, k_size, heads=2, head_dim=8, dtype=np.float32, rows=None, seed=0):
    rng = np.random.default_rng(seed)
    Sq, Sk = q_size[0] * q_size[1], k_size[0] * k_size[1]
    q = rng.standard_normal((1, heads, Sq, head_dim)).astype(dtype)
    k, v = (rng.standard_normal((1, heads, Sk, head_dim)).astype(dtype) for _ in range(2))
    rows_h, rows_w = rows or (2 * max(q_size[0], k_size[0]) - 1, 2 * max(q_size[1], k_size[1]) - 1)
    tables = [rng.standard_normal((n, head_dim)).astype(dtype) * 0.3 for n in (rows_h, rows_w)]
    return (q, k, v, *tables), dict(q_size=q_size, k_size=k_size)


@pytest.mark.parametrize("q_size,k_size,rows", [
    ((1, 300), (1, 300), None),
    ((300, 1), (300, 1), None),
    ((3, 70), (5, 40), None),        # q grid != k grid
    ((2, 90), (2, 90), (7, 101)),    # tables resized
    ((13, 11), (13, 11), None),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunked_terms_match_whole_terms(backend, monkeypatch, q_size, k_size, rows, dtype):
    arrays, sizes = _problem(q_size, k_size, dtype=dtype, rows=rows)
    if backend == "cupy":
        pytest.skip("chunking applies to numpy inputs; CuPy computes its terms on the device")
    whole = relattn.rel_pos_attention(*arrays, **sizes, backend=backend)
    monkeypatch.setattr(functional, "TERMS_BUDGET", 20_000)  # a few rows per chunk
    functional._plans.clear()
    assert functional._row_chunk(arrays[0], arrays[3], q_size, k_size) is not None
    chunked = relattn.rel_pos_attention(*arrays, **sizes, backend=backend)
    functional._plans.clear()
    tol = 2e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=tol * np.abs(whole).max())
    assert "runs these inputs" in relattn.explain(*arrays, **sizes, backend=backend)


def test_thin_grid_memory_is_bounded():
    """A 1 x 4096 grid: whole terms and gathered tables would take ~340 MB;
    numpy's allocations stay within twice the terms budget (the numba kernel's
    own buffers are a few tiles per thread)."""
    arrays, sizes = _problem((1, 4096), (1, 4096), heads=1, head_dim=4)
    want_backend = "numba" if "numba" in relattn.backends.available() else "numpy"
    small = _problem((1, 64), (1, 64), heads=1, head_dim=4)
    relattn.rel_pos_attention(*small[0], **small[1], backend=want_backend)  # compile first
    inputs = sum(a.nbytes for a in arrays)
    tracemalloc.start()
    try:
        out = relattn.rel_pos_attention(*arrays, **sizes, backend=want_backend)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if want_backend == "numpy":  # the reference also holds its logits chunk
        from relattn.backends import reference
        peak -= 3 * reference.CHUNK_BYTES
    assert peak <= 2 * functional.TERMS_BUDGET + out.nbytes + inputs, f"peak {peak / 2**20:.0f} MiB"
    assert np.isfinite(out).all()
