"""``relattn.testing``, tested the way it asks to be used.

1. relattn itself, on every backend, passes ``assert_matches_reference`` over
   ``problems()``; the kit's reference agrees with ``oracle.py``'s loops.
2. Planted bugs fail, with the diagnosis that names them: rel_w or rel_h
   dropped, grid axes swapped, wrong scale, relative terms from the scaled q,
   off-by-one relative index (placed on its key axis), NaN / infinities.
3. The strategy keeps its bounds and draws what it promises when asked:
   q grid != k grid, resized tables, windows, masked keys, every dtype.
4. The python blocks of ``docs/testing.md`` run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re

import numpy as np
import pytest
from hypothesis import assume, find, given, settings
from hypothesis import strategies as st

import oracle
import relattn
from relattn.testing import TOLERANCES, Problem, assert_matches_reference, problems, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import ml_dtypes  # noqa: F401

    DTYPES = ("float64", "float32", "float16", "bfloat16")
except ImportError:  # pragma: no cover - optional dependency
    DTYPES = ("float64", "float32", "float16")


# --------------------------------------------------------------------------
# 1. relattn passes; the reference agrees with the oracle
# --------------------------------------------------------------------------


def _to(backend):
    """The array library a backend takes natively (CuPy for the GPU), or None."""
    if relattn.backends.get(backend).ARRAY_MODULE == "cupy":
        import cupy

        return cupy
    return None


@settings(max_examples=30)
@given(problem=problems(min_batch=0, max_grid=6, masked=True, windows=True))
def test_relattn_matches_reference_on_every_backend(backend, problem):
    to = _to(backend)
    try:
        relattn.explain(*problem.arrays(to), q_size=problem.q_size, k_size=problem.k_size,
                        backend=backend)
    except relattn.BackendError:
        assume(False)
    assert_matches_reference(problem.call(relattn.rel_pos_attention, to=to, backend=backend), problem)


@settings(max_examples=15)
@given(problem=problems(max_grid=4, head_dims=(1, 8, 17), masked=True, tables=True))
def test_reference_agrees_with_the_oracle(problem):
    want = oracle.attention(problem.q, problem.k, problem.v, problem.rel_pos_h, problem.rel_pos_w,
                            problem.q_size, problem.k_size, scale=problem.effective_scale)
    np.testing.assert_allclose(reference(problem), want, rtol=1e-12, atol=1e-12)


def test_plain_attention_problems():
    problem = Problem.random((2, 3), heads=2, tables=False, seed=4)
    want = oracle.attention(problem.q, problem.k, problem.v)
    np.testing.assert_allclose(reference(problem), want, rtol=1e-12, atol=1e-12)
    assert_matches_reference(problem.call(relattn.rel_pos_attention, backend="numpy"), problem)


# --------------------------------------------------------------------------
# 2. planted bugs
# --------------------------------------------------------------------------


def _numpy_attention(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale=None):
    return relattn.rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale=scale,
                                     backend="numpy")


def _shift(table):
    """Row ``idx + 1`` of the table where ``idx`` is asked (clamped): an
    off-by-one relative index, for tables of the exact row count."""
    return np.concatenate([table[1:], table[-1:]])


def drop_rel_w(q, k, v, rh, rw, q_size, k_size, scale=None):
    return _numpy_attention(q, k, v, rh, np.zeros_like(rw), q_size, k_size, scale)


def drop_rel_h(q, k, v, rh, rw, q_size, k_size, scale=None):
    return _numpy_attention(q, k, v, np.zeros_like(rh), rw, q_size, k_size, scale)


def swap_axes(q, k, v, rh, rw, q_size, k_size, scale=None):
    """Tokens read column-major: i = x * q_h + y."""
    return _numpy_attention(q, k, v, rw, rh, q_size[::-1], k_size[::-1], scale)


def unscaled(q, k, v, rh, rw, q_size, k_size, scale=None):
    return _numpy_attention(q, k, v, rh, rw, q_size, k_size, 1.0)


def ignores_scale(q, k, v, rh, rw, q_size, k_size, scale=None):
    return _numpy_attention(q, k, v, rh, rw, q_size, k_size, None)


def scaled_q_in_terms(q, k, v, rh, rw, q_size, k_size, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _numpy_attention((q * scale).astype(q.dtype), k, v, rh, rw, q_size, k_size, 1.0)


def off_by_one_h(q, k, v, rh, rw, q_size, k_size, scale=None):
    return _numpy_attention(q, k, v, _shift(rh), rw, q_size, k_size, scale)


def off_by_one_w(q, k, v, rh, rw, q_size, k_size, scale=None):
    return _numpy_attention(q, k, v, rh, _shift(rw), q_size, k_size, scale)


# bug -> (what the message must say, problems() keywords that let the bug show)
BUGS = {
    drop_rel_w: ("out matches the reference without rel_w", {}),
    drop_rel_h: ("out matches the reference without rel_h", {}),
    swap_axes: ("out matches the reference with the grid axes swapped", {}),
    unscaled: ("out matches the reference with scale = 1", {}),
    ignores_scale: ("instead of the given scale", {}),
    scaled_q_in_terms: ("computed from the scaled q", {}),
    off_by_one_h: ("the error follows the key row ky", {"resize_tables": False}),
    off_by_one_w: ("the error follows the key column kx", {"resize_tables": False}),
}


def _fails_with(bug, problem):
    with pytest.raises(AssertionError) as failure:
        assert_matches_reference(problem.call(bug), problem)
    return str(failure.value)


@pytest.mark.parametrize("bug", list(BUGS), ids=lambda f: f.__name__)
def test_planted_bug_is_diagnosed_on_a_telling_problem(bug):
    # non-square grids, a pooled key grid, head_dim > key rows + 1, an explicit scale
    problem = Problem.random((4, 6), (2, 3), batch=2, heads=2, head_dim=16, scale=0.4, seed=5)
    message = _fails_with(bug, problem)
    expected, _ = BUGS[bug]
    assert expected in message, message
    assert "worst element: batch " in message and "query " in message and "(y=" in message


@pytest.mark.parametrize("bug", list(BUGS), ids=lambda f: f.__name__)
@settings(max_examples=6)
@given(data=st.data())
def test_planted_bug_is_diagnosed_whenever_it_shows(bug, data):
    """Over drawn problems: whenever the bug moves the output well past the
    tolerance, the kit fails it and names it."""
    expected, keywords = BUGS[bug]
    problem = data.draw(problems(dtypes=("float64", "float32"), min_grid=2, max_grid=5,
                                 head_dims=(16, 24), **keywords), label="problem")
    if bug is ignores_scale:
        assume(problem.scale is not None)
    out = problem.call(bug)
    error = np.max(np.abs(out.astype(np.float64) - reference(problem)))
    rtol, atol = TOLERANCES[problem.dtype]
    assume(error > 100 * (rtol * np.max(np.abs(reference(problem))) + atol))
    message = _fails_with(bug, problem)
    assert expected in message, message


def test_a_term_error_is_placed_on_its_key_axis_under_masks():
    """Masked key rows carry no weight; the axis diagnosis skips them."""
    problem = Problem.random((5, 4), heads=2, head_dim=16, masked_keys=range(4, 8), seed=2)
    assert "the error follows the key row ky" in _fails_with(off_by_one_h, problem)
    assert "the error follows the key column kx" in _fails_with(off_by_one_w, problem)


def test_a_bug_elsewhere_follows_no_key_axis():
    def values_off(q, k, v, rh, rw, q_size, k_size, scale=None):
        return _numpy_attention(q, k, (v * 1.01).astype(v.dtype), rh, rw, q_size, k_size, scale)

    message = _fails_with(values_off, Problem.random((3, 5), heads=2, head_dim=16, seed=0))
    assert "does not follow one key axis" in message and "out matches" not in message


def test_small_head_dim_cannot_tell_the_axes():
    message = _fails_with(off_by_one_h, Problem.random((4, 4), head_dim=2, seed=1))
    assert "too small to tell key rows from key columns" in message


def test_coinciding_variants_are_flagged():
    message = _fails_with(drop_rel_w, Problem.random((1, 1), (1, 2), head_dim=16, seed=0))
    assert "these variants coincide on a problem this small" in message


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # the formula's -inf - -inf
def test_nan_and_infinity_patterns():
    k = np.random.default_rng(0).standard_normal((1, 1, 4, 2))
    k[..., 0] = -np.inf                                       # every key masked: NaN rows
    q = np.ones((1, 1, 4, 2))
    problem = Problem(q, k, np.ones_like(q), np.zeros((3, 2)), np.zeros((3, 2)), (2, 2), (2, 2))
    assert np.isnan(reference(problem)).all()
    assert_matches_reference(problem.call(relattn.rel_pos_attention, backend="numpy"), problem)
    message = _fails_with(lambda *a, **kw: np.zeros((1, 1, 4, 2)), problem)
    assert "NaN pattern: 8 entries differ" in message

    finite = Problem.random((2, 2), seed=0)
    out = reference(finite)
    out[0, 0, 3, 1] = np.inf
    with pytest.raises(AssertionError, match=r"infinities: 1 entries differ, first at batch 0, head 0, "
                                             r"query 3 = \(y=1, x=1\), channel 1"):
        assert_matches_reference(out.astype(np.float32), finite)


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_tolerances(dtype):
    problem = Problem.random((3, 3), head_dim=8, dtype=dtype, seed=3)
    ref = reference(problem)
    rtol, atol = TOLERANCES[dtype]
    tol = rtol * np.max(np.abs(ref)) + atol
    # float64 results, compared with check_dtype=False: no rounding hides the step
    assert_matches_reference(ref + 0.9 * tol, problem, check_dtype=False)
    with pytest.raises(AssertionError, match="worst element"):
        assert_matches_reference(ref + 1.5 * tol, problem, check_dtype=False)
    assert_matches_reference(ref + 1.5 * tol, problem, check_dtype=False, rtol=2 * rtol, atol=2 * atol)


def test_shape_and_dtype_are_checked():
    problem = Problem.random((2, 3), heads=2, seed=0)
    out = problem.call(relattn.rel_pos_attention, backend="numpy")
    with pytest.raises(AssertionError, match="heads and tokens axes are exchanged"):
        assert_matches_reference(out.transpose(0, 2, 1, 3), problem)
    with pytest.raises(AssertionError, match="dtype: got float64, expected float32"):
        assert_matches_reference(out.astype(np.float64), problem)
    assert_matches_reference(out.astype(np.float64), problem, check_dtype=False)


# --------------------------------------------------------------------------
# 3. the strategy
# --------------------------------------------------------------------------


@given(problem=problems(dtypes=("float32", "float16"), min_batch=0, max_batch=2, max_heads=3,
                        min_grid=2, max_grid=5, head_dims=(8, 16), masked=True))
def test_strategy_respects_its_bounds(problem):
    assert problem.dtype in ("float32", "float16")
    assert 0 <= problem.batch <= 2 and 1 <= problem.heads <= 3 and problem.head_dim in (8, 16)
    assert all(2 <= side <= 5 for side in problem.q_size + problem.k_size)
    arrays = (problem.q, problem.k, problem.v, problem.rel_pos_h, problem.rel_pos_w)
    assert all(a.dtype == problem.q.dtype and not a.flags.writeable for a in arrays)
    assert problem.rel_pos_h.shape[1] == problem.rel_pos_w.shape[1] == problem.head_dim
    if problem.scale is not None:
        assert 0.25 - 1e-9 <= problem.scale * problem.head_dim ** 0.5 <= 2.0 + 1e-9
    k_len = problem.k_size[0] * problem.k_size[1]
    masked = np.isneginf(problem.k[..., 0].astype(np.float64))
    if problem.batch:
        assert sorted(np.nonzero(masked[0, 0])[0]) == sorted(problem.masked_keys)
        assert len(problem.masked_keys) < k_len
        if len(problem.masked_keys):
            assert np.all(problem.q[..., 0] > 0)
        assert np.all(np.isfinite(reference(problem)))


@given(problem=problems(q_grid_differs=False, resize_tables=False, explicit_scale=False))
def test_strategy_without_the_options(problem):
    assert problem.q_size == problem.k_size
    assert problem.needs_resize == (False, False)
    assert problem.scale is None and len(problem.masked_keys) == 0


@given(problem=problems(tables=False))
def test_strategy_of_plain_attention(problem):
    assert problem.rel_pos_h is None and problem.rel_pos_w is None


FIND = settings(max_examples=500, database=None)


@pytest.mark.parametrize("what,keywords,condition", [
    ("q grid != k grid", {}, lambda p: p.q_size != p.k_size),
    ("pooled keys", {}, lambda p: p.k_size[0] < p.q_size[0] and p.k_size[1] < p.q_size[1]),
    ("height table resized", {}, lambda p: p.needs_resize[0]),
    ("width table resized", {}, lambda p: p.needs_resize[1]),
    ("SAM window", {"windows": True}, lambda p: p.q_size == p.k_size == (14, 14)
     and p.rel_pos_h.shape[0] == 27),
    ("masked keys", {"masked": True}, lambda p: len(p.masked_keys) > 0),
    ("explicit scale", {}, lambda p: p.scale is not None),
    ("empty batch", {"min_batch": 0}, lambda p: p.batch == 0),
] + [(dtype, {}, (lambda p, dtype=dtype: p.dtype == dtype)) for dtype in DTYPES])
def test_strategy_draws_what_is_asked(what, keywords, condition):
    found = find(problems(**keywords), condition, settings=FIND)
    assert condition(found), what


@pytest.mark.parametrize("keywords,error", [
    ({"dtypes": ("int32",)}, TypeError),
    ({"dtypes": ()}, ValueError),
    ({"max_grid": 0}, ValueError),
    ({"min_grid": 4, "max_grid": 3}, ValueError),
    ({"head_dims": ()}, ValueError),
    ({"window_sizes": (0,)}, ValueError),
])
def test_strategy_rejects_bad_bounds(keywords, error):
    with pytest.raises(error):
        problems(**keywords)


def test_problem_repr_rebuilds_it():
    problem = Problem.random((3, 4), (2, 2), batch=2, heads=3, head_dim=8, dtype="float16",
                             table_rows=(4, 9), scale=0.3, masked_keys=range(0, 4, 2), seed=9)
    again = eval(repr(problem), {"Problem": Problem})
    for name in ("q", "k", "v", "rel_pos_h", "rel_pos_w"):
        np.testing.assert_array_equal(getattr(again, name), getattr(problem, name))
    assert again.description == problem.description
    assert "array(" not in repr(problem) and "q grid 3x4, k grid 2x2" in problem.description
    by_hand = Problem(problem.q, problem.k, problem.v, None, None, (3, 4), (2, 2))
    assert repr(by_hand).startswith("Problem(q=(2, 3, 12, 8)")


def test_problem_arrays_are_copies():
    problem = Problem.random((2, 3), seed=0)
    want = reference(problem)

    def writes_into_q(q, k, v, rh, rw, q_size, k_size, scale=None):
        q[...] = 0
        return relattn.rel_pos_attention(q, k, v, rh, rw, q_size, k_size, backend="numpy")

    problem.call(writes_into_q)
    assert not problem.q.flags.writeable and problem.q.any()
    assert_matches_reference(problem.call(relattn.rel_pos_attention, backend="numpy"), problem)
    np.testing.assert_array_equal(reference(problem), want)


def test_problem_rejects_inconsistent_arrays():
    q = np.zeros((1, 1, 6, 4), np.float32)
    with pytest.raises(ValueError, match="q_size"):
        Problem(q, q, q, None, None, (2, 2), (2, 3))
    with pytest.raises(ValueError, match="rel_pos_h"):
        Problem(q, q, q, np.zeros((3, 5)), np.zeros((5, 4)), (2, 3), (2, 3))
    with pytest.raises(ValueError, match="masked_keys"):
        Problem.random((1, 2), masked_keys=(0, 1))


def test_torch_tensors_in_and_out():
    torch = pytest.importorskip("torch")
    problem = Problem.random((3, 3), heads=2, head_dim=8, seed=0)

    def torch_kernel(q, k, v, rh, rw, q_size, k_size, scale=None):
        assert isinstance(q, torch.Tensor)
        return torch.from_numpy(relattn.rel_pos_attention(q.numpy(), k.numpy(), v.numpy(), rh.numpy(),
                                                          rw.numpy(), q_size, k_size, backend="numpy"))

    for to in (torch.from_numpy, torch):
        assert_matches_reference(problem.call(torch_kernel, to=to), problem)
    if "bfloat16" in DTYPES:
        half = Problem.random((2, 2), dtype="bfloat16", seed=0)
        out = torch.from_numpy(reference(half)).to(torch.bfloat16)
        assert_matches_reference(out, half)


# --------------------------------------------------------------------------
# 4. the page
# --------------------------------------------------------------------------


def test_testing_page_examples_run():
    with open(os.path.join(ROOT, "docs", "testing.md")) as fh:
        text = fh.read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 6
    namespace = {"__name__": "docs_testing"}   # the blocks build on each other, like the page
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            if block.startswith("# needs:"):
                continue
            if "import torch" in block and importlib.util.find_spec("torch") is None:
                continue
            exec(compile(block, "docs/testing.md", "exec"), namespace)
    for needed in ("out matches the reference without rel_w",
                   "out matches the reference with the grid axes swapped",
                   "the error follows the key row ky"):
        assert needed in printed.getvalue() and needed in text
