"""relattn against golden vectors produced by PyTorch (tests/golden/make_golden.py).

The saved-vector tests always run (no torch needed). The live cross-checks
import the same torch functions and compare on fresh random cases; they are
skipped when torch is not installed.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def _relattn():
    import relattn

    return relattn


def load(name):
    with np.load(os.path.join(GOLDEN, name)) as f:
        return {k: f[k] for k in f.files}


def make_golden():
    """tests/golden/make_golden.py as a module (needs torch)."""
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("make_golden",
                                                  os.path.join(GOLDEN, "make_golden.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_rel_close(got, want, rtol=1e-5, what=""):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = np.max(np.abs(got - want), initial=0.0)
    ref = np.max(np.abs(want), initial=0.0)
    assert err <= rtol * ref + 1e-7, f"{what}: max error {err:.3g} (max|ref| {ref:.3g})"


def _cases(data, prefix_kind):
    return sorted({k.split("_")[0] for k in data if k.startswith(prefix_kind)})


# ---------------------------------------------------------------------------
# Saved vectors
# ---------------------------------------------------------------------------

RESIZE = load("resize.npz")


@pytest.mark.parametrize("case", _cases(RESIZE, "named") + _cases(RESIZE, "random"))
def test_resize_bit_identical_to_torch(case):
    relattn = _relattn()
    table, want = RESIZE[f"{case}_in"], RESIZE[f"{case}_out"]
    got = relattn.resize_rel_pos(table, want.shape[0])
    assert got.dtype == np.float32 and got.shape == want.shape
    if not np.array_equal(got, want):
        bad = np.argwhere(got != want)
        ulps = np.max(np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32)))
        pytest.fail(f"{case}: L={table.shape[0]} -> M={want.shape[0]}: {len(bad)} values "
                    f"differ (first at {tuple(bad[0])}), up to {ulps} ulp")


GET_REL_POS = load("get_rel_pos.npz")


@pytest.mark.parametrize("case", _cases(GET_REL_POS, "case") + ["half"])
def test_get_rel_pos_bit_identical_to_torch(case):
    relattn = _relattn()
    q_size, k_size = (int(s) for s in GET_REL_POS[f"{case}_sizes"])
    table, want = GET_REL_POS[f"{case}_table"], GET_REL_POS[f"{case}_out"]
    got = np.asarray(relattn.get_rel_pos(q_size, k_size, table))
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8),
                                  err_msg=f"{case}: q_size={q_size} k_size={k_size} "
                                          f"rows={table.shape[0]}")


TERMS = load("terms.npz")


@pytest.mark.parametrize("case", _cases(TERMS, "case"))
def test_decomposed_terms_match_torch(case):
    relattn = _relattn()
    d = {k[len(case) + 1:]: v for k, v in TERMS.items() if k.startswith(case + "_")}
    q_size, k_size = (tuple(int(s) for s in row) for row in d["sizes"])
    rel_h, rel_w = relattn.decomposed_rel_pos(d["q"], d["rel_pos_h"], d["rel_pos_w"],
                                              q_size, k_size)
    assert rel_h.dtype == np.float32 and rel_w.dtype == np.float32
    assert_rel_close(rel_h, d["rel_h"], what="rel_h")
    assert_rel_close(rel_w, d["rel_w"], what="rel_w")


def _attention_cases():
    out = []
    for dtype in ("float32", "float64"):
        data = load(f"attention_{dtype}.npz")
        for case in sorted({"_".join(k.split("_")[:2]) for k in data}):
            out.append(pytest.param(data, case, id=case))
    return out


@pytest.mark.parametrize("data,case", _attention_cases())
def test_attention_core_matches_torch(backend, data, case):
    relattn = _relattn()
    d = {k[len(case) + 1:]: v for k, v in data.items() if k.startswith(case + "_")}
    q_size, k_size = (tuple(int(s) for s in row) for row in d["sizes"])
    out = relattn.rel_pos_attention(d["q"], d["k"], d["v"], d["rel_pos_h"], d["rel_pos_w"],
                                    q_size, k_size, backend=backend)
    assert out.dtype == d["q"].dtype
    rtol = 1e-5 if d["q"].dtype == np.float32 else 1e-12
    assert_rel_close(out, d["out"], rtol, what=f"{case} vs SDPA")
    assert_rel_close(out, d["out_sam"], rtol, what=f"{case} vs SAM eager")


MODULE = load("module.npz")


def _module_from_golden(prefix):
    relattn = _relattn()
    state = {k[len(prefix) + 7:]: v for k, v in MODULE.items()
             if k.startswith(prefix + "_state_")}
    dim = state["proj.weight"].shape[0]
    heads = int(MODULE["num_heads"])
    input_size = ((state["rel_pos_h"].shape[0] + 1) // 2, (state["rel_pos_w"].shape[0] + 1) // 2)
    attn = relattn.Attention(dim, heads, qkv_bias=True, use_rel_pos=True,
                             input_size=input_size)
    attn.load_state_dict(state)
    return attn, state


@pytest.mark.parametrize("prefix", ["global", "windowed"])
@pytest.mark.parametrize("grid", ["x66", "x57"])
def test_seed_module_forward_matches_torch(prefix, grid):
    attn, _ = _module_from_golden(prefix)
    window = int(MODULE[f"{prefix}_window_size"])
    x = MODULE[f"{prefix}_{grid}"]
    got = attn(x, window_size=window) if window else attn(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert_rel_close(got, MODULE[f"{prefix}_{grid}_out"], 1e-5, what=f"{prefix} {grid}")


@pytest.mark.parametrize("prefix", ["global", "windowed"])
def test_state_dict_round_trip_of_golden_weights(prefix):
    attn, state = _module_from_golden(prefix)
    back = attn.state_dict()
    assert set(back) == set(state)
    for key in state:
        np.testing.assert_array_equal(back[key], state[key], err_msg=key)


# ---------------------------------------------------------------------------
# Live cross-checks against torch
# ---------------------------------------------------------------------------


def test_live_resize_bit_identical_random_cases():
    mg = make_golden()
    relattn = _relattn()
    rng = np.random.default_rng(12345)
    failures = []
    for _ in range(200):
        L, M = int(rng.integers(1, 260)), int(rng.integers(1, 320))
        magnitude = 10.0 ** rng.uniform(-8, 8)
        table = (rng.standard_normal((L, int(rng.integers(1, 6)))) * magnitude).astype(np.float32)
        want = mg.resize_np(table, M)
        got = relattn.resize_rel_pos(table, M)
        if not np.array_equal(got, want):
            failures.append((L, M, f"{magnitude:.3g}"))
    assert not failures, f"{len(failures)}/200 (L, M, magnitude) not bit-identical: {failures[:10]}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_live_get_rel_pos_half_tables(dtype):
    torch = pytest.importorskip("torch")
    mg = make_golden()
    relattn = _relattn()
    rng = np.random.default_rng(99)
    for q_size, k_size, rows in [(20, 20, 27), (32, 32, 127), (7, 56, 27), (9, 4, 5)]:
        t = torch.from_numpy(rng.standard_normal((rows, 8)).astype(np.float32)).to(
            getattr(torch, dtype))
        want = mg.get_rel_pos(q_size, k_size, t).float().numpy()
        if dtype == "bfloat16":
            ml_dtypes = pytest.importorskip("ml_dtypes")
            table = t.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            table = t.numpy()
        got = np.asarray(relattn.get_rel_pos(q_size, k_size, table))
        assert got.dtype == table.dtype
        np.testing.assert_array_equal(got.astype(np.float32), want,
                                      err_msg=f"{dtype} {q_size} {k_size} {rows}")


@pytest.mark.parametrize("q_size,k_size", [((5, 7), (5, 7)), ((8, 8), (4, 4)), ((3, 3), (6, 2))])
def test_live_attention_core(backend, q_size, k_size):
    mg = make_golden()
    relattn = _relattn()
    rng = np.random.default_rng(sum(q_size) * 10 + sum(k_size))
    d = 24
    q = rng.standard_normal((2, 3, q_size[0] * q_size[1], d)).astype(np.float32)
    k = rng.standard_normal((2, 3, k_size[0] * k_size[1], d)).astype(np.float32)
    v = rng.standard_normal((2, 3, k_size[0] * k_size[1], d)).astype(np.float32)
    rh = (rng.standard_normal((9, d)) * 0.3).astype(np.float32)  # resized for most sizes
    rw = (rng.standard_normal((13, d)) * 0.3).astype(np.float32)
    want = mg.attention_core_np(q, k, v, rh, rw, q_size, k_size)
    got = relattn.rel_pos_attention(q, k, v, rh, rw, q_size, k_size, backend=backend)
    assert_rel_close(got, want, 1e-5, what="attention core")


@pytest.mark.parametrize("dim,heads,input_size,grid,window,qkv_bias", [
    (32, 4, (6, 6), (6, 6), 0, True),
    (32, 4, (6, 6), (9, 4), 0, True),   # tables interpolated 11 -> 17 and 11 -> 7
    (40, 2, (4, 4), (7, 10), 4, True),  # windowed with padding
    (24, 3, (5, 3), (5, 3), 0, False),
])
def test_live_seed_module_forward(dim, heads, input_size, grid, window, qkv_bias):
    mg = make_golden()
    relattn = _relattn()
    module = mg.make_seed_module(dim, heads, input_size, seed=dim + heads, qkv_bias=qkv_bias)
    attn = relattn.Attention(dim, heads, qkv_bias=qkv_bias, use_rel_pos=True,
                             input_size=input_size)
    attn.load_state_dict(mg.state_dict_np(module))
    x = np.random.default_rng(5).standard_normal((2, *grid, dim)).astype(np.float32)
    want = mg.seed_forward_np(module, x, window)
    got = attn(x, window_size=window) if window else attn(x)
    assert_rel_close(got, want, 1e-5, what="module forward")
