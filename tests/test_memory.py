"""The numpy backend's memory bound, and that bounding it left the arithmetic alone.

The numpy backend (``relattn.backends.reference``) materializes the logits of
one chunk at a time: a block of (batch, head) pairs when one head's logits fit
``CHUNK_BYTES``, else a block of query rows of one head (at least one row). The
softmax runs in place in that one buffer. Measured with ``tracemalloc`` (numpy
reports its array allocations to it; the inputs are allocated before tracing
starts, so they are not counted), the peak during a call is at most

    CHUNK_BYTES                                 the chunk's logits
    + the output                                in the compute dtype
    + rows * (d + 2) * itemsize per chunk       scaled q rows, row max, row sum
    + half inputs only: float32 copies of the chunk's heads' k and v and of its
      q rows, and the output's final cast to the input dtype
    + the rel_h / rel_w terms                   (public API only: computed before the backend runs)
    + np.getbufsize() * itemsize                numpy's iteration buffer for the broadcast in-place
                                                steps (32 KiB float32, 64 KiB float64)
    + SLACK                                     Python objects and array headers

(The per-row terms and the iteration buffer never coexist, so the sum over-counts.)

Bit-identity: when one head's logits fit ``CHUNK_BYTES`` the backend gives the
same bits as the materialized formula with one new array per step
(``_formula`` below). When a head is split into query-row blocks, every
block gives the bits of that formula applied to the same rows: the elementwise
steps are unchanged, and only the shapes of the BLAS calls differ. OpenBLAS's
per-element matmul result depends on the number of rows of the call (small-
matrix kernels, edge tiles, gemv for one row), so those results agree with the
whole-head formula to rounding, not bit for bit.
"""

from __future__ import annotations

import gc
import tracemalloc
import warnings

import numpy as np
import pytest

import relattn
from relattn.backends import reference

try:
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BFLOAT16 = None

MiB = 2**20
SLACK = 16 * 2**10  # Python objects and array headers

DTYPES = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)] + (
    [BFLOAT16] if BFLOAT16 is not None else [])
DTYPE_IDS = ["float16", "float32", "float64", "bfloat16"][: len(DTYPES)]


def _work(dtype):
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _formula(q, k, v, rel_h, rel_w, k_size, scale):
    """The materialized formula, one new array per step: (B, heads, Sq, d) in and
    out, q's dtype, computed in float32 (half inputs) or float64."""
    batch, heads, q_len, _ = q.shape
    work = _work(q.dtype)
    n = batch * heads
    q3, k3, v3 = (a.reshape(n, *a.shape[2:]).astype(work) for a in (q, k, v))
    logits = np.matmul(q3 * work.type(scale), np.matrix_transpose(k3))
    if rel_h is not None:
        k_h, k_w = k_size
        grid = logits.reshape(n, q_len, k_h, k_w)
        grid = (grid + rel_h.reshape(n, q_len, k_h).astype(work)[..., :, None]) \
            + rel_w.reshape(n, q_len, k_w).astype(work)[..., None, :]
        logits = grid.reshape(n, q_len, k_h * k_w)
    logits = logits - np.max(logits, axis=-1, keepdims=True)
    weights = np.exp(logits)
    weights = weights / np.sum(weights, axis=-1, keepdims=True)
    return np.matmul(weights, v3).reshape(batch, heads, q_len, -1).astype(q.dtype)


def _bits(a):
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _inputs(dtype, batch, heads, q_grid, k_grid, d, rel=True, seed=0):
    rng = np.random.default_rng(seed)
    q_len, k_len = q_grid[0] * q_grid[1], k_grid[0] * k_grid[1]
    q = rng.standard_normal((batch, heads, q_len, d)).astype(dtype)
    k, v = (rng.standard_normal((batch, heads, k_len, d)).astype(dtype) for _ in range(2))
    rel_h = rel_w = None
    if rel:
        work = _work(dtype)
        rel_h = rng.standard_normal((batch, heads, q_len, k_grid[0])).astype(work)
        rel_w = rng.standard_normal((batch, heads, q_len, k_grid[1])).astype(work)
    return q, k, v, rel_h, rel_w, tuple(k_grid) if rel else (1, k_len)


def _quiet(fn, *args):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args)


def _poison(q, k, v, rel_h, rel_w):
    """NaN / inf in every place the documented semantics name, one row each."""
    q, k, v, rel_h, rel_w = (a.copy() for a in (q, k, v, rel_h, rel_w))
    b = q.shape[0] - 1
    q[0, 0, 1, 0] = np.nan                # NaN in query row 1          -> row NaN
    q[b, -1, 2, 1] = np.inf               # +inf in query row 2         -> row NaN
    rel_h[0, 0, 3, 0] = -np.inf           # keys ky=0 masked for row 3  -> weight 0
    rel_w[0, 0, 3, 1] = -np.inf           # and kx=1 too
    rel_h[0, 0, 4, :] = -np.inf           # all keys masked for row 4   -> row NaN
    rel_w[0, 0, 5, 0] = np.inf            # +inf logit in row 5         -> row NaN
    k[b, -1, 2, :] = np.nan               # NaN key 2 of the last head  -> its rows NaN
    v[0, 0, 5, 2] = np.inf                # +inf in v column 2          -> column +inf
    v[0, 0, 3, 3] = np.nan                # NaN in v column 3           -> column NaN
    return q, k, v, rel_h, rel_w


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("chunk_heads", [None, 1, 3])  # default budget; one head a chunk; three
@pytest.mark.parametrize("rel", [True, False], ids=["rel", "plain"])
def test_same_bits_as_the_formula_when_heads_fit(dtype, chunk_heads, rel, monkeypatch):
    q, k, v, rel_h, rel_w, k_size = _inputs(dtype, 2, 3, (3, 4), (4, 3), 8, rel=rel)
    if chunk_heads is not None:
        head_bytes = q.shape[2] * k.shape[2] * _work(dtype).itemsize
        monkeypatch.setattr(reference, "CHUNK_BYTES", chunk_heads * head_bytes + head_bytes // 2)
    got = reference.attention(q, k, v, rel_h, rel_w, k_size, 8 ** -0.5)
    want = _formula(q, k, v, rel_h, rel_w, k_size, 8 ** -0.5)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("chunk_heads", [None, 1])
def test_nan_and_inf_give_the_formulas_bits(dtype, chunk_heads, monkeypatch):
    q, k, v, rel_h, rel_w = _poison(*_inputs(dtype, 2, 2, (2, 3), (2, 3), 6)[:5])
    k_size = (2, 3)
    if chunk_heads is not None:
        monkeypatch.setattr(reference, "CHUNK_BYTES", q.shape[2] * k.shape[2] * _work(dtype).itemsize)
    got = _quiet(reference.attention, q, k, v, rel_h, rel_w, k_size, 0.5)
    want = _quiet(_formula, q, k, v, rel_h, rel_w, k_size, 0.5)
    assert np.array_equal(_bits(got), _bits(want))
    g = got.astype(np.float64)
    nan_rows = np.isnan(g).all(axis=-1)
    assert nan_rows[0, 0, [1, 4, 5]].all()                      # NaN q, all keys masked, +inf logit
    assert nan_rows[1, 1].all()                                 # NaN key 2 poisons every row of its head
    assert np.isfinite(g[0, 0, 3, [0, 1, 4, 5]]).all()          # masked keys: weight 0, row finite
    assert np.isposinf(g[0, 0, [0, 3], 2]).all()                # +inf in v column 2
    assert np.isnan(g[0, 0, [0, 3], 3]).all()                   # NaN in v column 3
    assert np.isfinite(g[0, 1]).all() and np.isfinite(g[1, 0]).all()  # untouched heads


def _row_blocks(q_len, k_len, work):
    rows = max(1, reference.CHUNK_BYTES // (k_len * work.itemsize))
    return [slice(s, min(s + rows, q_len)) for s in range(0, q_len, rows)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("poison", [False, True], ids=["finite", "nan-inf"])
def test_row_blocks_give_the_formulas_bits_on_the_same_rows(dtype, rows, poison, monkeypatch):
    q, k, v, rel_h, rel_w, k_size = _inputs(dtype, 2, 2, (6, 7), (5, 8), 8)
    if poison:
        q, k, v, rel_h, rel_w = _poison(q, k, v, rel_h, rel_w)
    work = _work(dtype)
    # Room for `rows` query rows and a bit: one head (42 rows) never fits.
    monkeypatch.setattr(reference, "CHUNK_BYTES", rows * k.shape[2] * work.itemsize + 3)
    blocks = _row_blocks(q.shape[2], k.shape[2], work)
    assert len(blocks) == -(-q.shape[2] // rows)
    got = _quiet(reference.attention, q, k, v, rel_h, rel_w, k_size, 0.3)
    want = np.concatenate([_quiet(_formula, q[:, :, b], k, v, rel_h[:, :, b], rel_w[:, :, b], k_size, 0.3)
                           for b in blocks], axis=2)
    assert np.array_equal(_bits(got), _bits(want))
    # Against the whole-head formula: the same NaN / inf pattern, values to rounding.
    whole = _quiet(_formula, q, k, v, rel_h, rel_w, k_size, 0.3).astype(np.float64)
    g = got.astype(np.float64)
    assert np.array_equal(np.isnan(g), np.isnan(whole))
    assert np.array_equal(np.isinf(g), np.isinf(whole))
    tol = {2: 1e-2, 4: 1e-5, 8: 1e-13}[dtype.itemsize]
    np.testing.assert_allclose(g, whole, rtol=tol, atol=tol)


# ------------------------------------------------------------------ peak memory


def _peak(fn, *args):
    """(peak bytes traced during fn(*args), its result)."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = fn(*args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, out


def _chunk_rows(heads_total, q_len, k_len, work):
    """Query rows of one chunk: all heads' rows of a block of heads, or a row block."""
    head_bytes = q_len * k_len * work.itemsize
    if head_bytes <= reference.CHUNK_BYTES:
        return min(heads_total, reference.CHUNK_BYTES // head_bytes) * q_len
    return min(q_len, max(1, reference.CHUNK_BYTES // (k_len * work.itemsize)))


def _bound(q, k, v, chunk_rows):
    """CHUNK_BYTES plus the stated extra terms (see the module docstring)."""
    work = _work(q.dtype)
    d, dv = q.shape[3], v.shape[3]
    pairs, q_len, k_len = q.shape[0] * q.shape[1], q.shape[2], k.shape[2]
    out_work = pairs * q_len * dv * work.itemsize
    bound = reference.CHUNK_BYTES + out_work + chunk_rows * (d + 2) * work.itemsize
    bound += np.getbufsize() * work.itemsize + SLACK
    if q.dtype.itemsize < work.itemsize:  # half inputs: copies in float32, and the final cast
        heads = max(1, chunk_rows // q_len)
        bound += 2 * heads * k_len * d * work.itemsize + chunk_rows * d * work.itemsize
        bound += pairs * q_len * dv * q.dtype.itemsize
    return bound


MEMORY_CASES = {
    # one 16 MiB head (float32, 2048 x 2048 logits), 1 MiB budget: 128-row blocks
    "big-head-float32": (np.float32, 1, 1, (32, 64), (32, 64), 16),
    # 32 heads of 256 KiB logits, 1 MiB budget: chunks of 4 heads
    "many-small-heads": (np.float32, 2, 16, (16, 16), (16, 16), 16),
    # one 8 MiB float64 head (1024 x 1024), 1 MiB budget: 128-row blocks
    "big-head-float64": (np.float64, 1, 1, (32, 32), (32, 32), 32),
    # float16 inputs: float32 copies of k and v are part of the bound
    "big-head-float16": (np.float16, 1, 2, (32, 32), (32, 32), 16),
}


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_backend_peak_memory_is_one_chunk_of_logits_plus_the_output(case, monkeypatch):
    dtype, batch, heads, q_grid, k_grid, d = MEMORY_CASES[case]
    monkeypatch.setattr(reference, "CHUNK_BYTES", 1 * MiB)
    q, k, v, rel_h, rel_w, k_size = _inputs(np.dtype(dtype), batch, heads, q_grid, k_grid, d)
    work = _work(q.dtype)
    head_bytes = q.shape[2] * k.shape[2] * work.itemsize
    rows = _chunk_rows(batch * heads, q.shape[2], k.shape[2], work)
    peak, out = _peak(reference.attention, q, k, v, rel_h, rel_w, k_size, d ** -0.5)
    assert out.shape == q.shape and np.isfinite(out.astype(np.float64)).all()
    bound = _bound(q, k, v, rows)
    print(f"{case}: head logits {head_bytes / MiB:.2f} MiB, chunk {rows} rows, "
          f"peak {peak / MiB:.3f} MiB, bound {bound / MiB:.3f} MiB, "
          f"peak - output {(peak - out.nbytes) / MiB:.3f} MiB")
    assert peak <= bound


def test_public_call_peak_memory(monkeypatch):
    """rel_pos_attention(..., backend="numpy"): the same bound plus the rel_h / rel_w
    terms (and their intermediates), which the public function computes first."""
    monkeypatch.setattr(reference, "CHUNK_BYTES", 1 * MiB)
    rng = np.random.default_rng(1)
    grid, d = (32, 64), 16
    q, k, v = (rng.standard_normal((1, 1, grid[0] * grid[1], d)).astype(np.float32) for _ in range(3))
    th = rng.standard_normal((2 * grid[0] - 1, d)).astype(np.float32)
    tw = rng.standard_normal((2 * grid[1] - 1, d)).astype(np.float32)
    peak, out = _peak(lambda: relattn.rel_pos_attention(q, k, v, th, tw, grid, backend="numpy"))
    terms = q.shape[2] * (grid[0] + grid[1]) * 4
    rows = _chunk_rows(1, q.shape[2], k.shape[2], np.dtype(np.float32))
    bound = _bound(q, k, v, rows) + 2 * terms
    print(f"public call: peak {peak / MiB:.3f} MiB, bound {bound / MiB:.3f} MiB")
    assert peak <= bound
    assert out.shape == q.shape and np.isfinite(out).all()
