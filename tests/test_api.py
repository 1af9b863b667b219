"""The ``Attention`` module and the argument checking of the public API."""

from __future__ import annotations

import re

import numpy as np
import pytest

import oracle

KEYS_FULL = {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rel_pos_h", "rel_pos_w"}


def _relattn():
    import relattn

    return relattn


def make(dim=24, num_heads=3, seed=0, **kwargs):
    relattn = _relattn()
    kwargs.setdefault("use_rel_pos", True)
    kwargs.setdefault("rel_pos_zero_init", False)
    if kwargs["use_rel_pos"]:
        kwargs.setdefault("input_size", (4, 4))
    return relattn.Attention(dim, num_heads, rng=np.random.default_rng(seed), **kwargs)


def reference(attn, x, window_size=0):
    """The oracle's float64 forward with the module's own parameters."""
    return oracle.attention_module(
        x, attn.num_heads, attn.qkv_weight, attn.qkv_bias, attn.proj_weight, attn.proj_bias,
        attn.rel_pos_h, attn.rel_pos_w, window_size=window_size)


def assert_close(got, want, rtol, what=""):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = np.max(np.abs(got - want), initial=0.0)
    ref = np.max(np.abs(want), initial=0.0)
    assert err <= rtol * ref + rtol * 1e-2, f"{what}: max error {err:.3g} (max|ref| {ref:.3g})"


# ---------------------------------------------------------------------------
# Parameters and state dicts
# ---------------------------------------------------------------------------


def test_parameter_shapes_and_defaults():
    relattn = _relattn()
    attn = relattn.Attention(24, 3, use_rel_pos=True, input_size=(4, 5))
    assert attn.qkv_weight.shape == (72, 24)
    assert attn.qkv_bias.shape == (72,)
    assert attn.proj_weight.shape == (24, 24)
    assert attn.proj_bias.shape == (24,)
    assert attn.rel_pos_h.shape == (7, 8)
    assert attn.rel_pos_w.shape == (9, 8)
    for p in (attn.qkv_weight, attn.qkv_bias, attn.proj_weight, attn.proj_bias,
              attn.rel_pos_h, attn.rel_pos_w):
        assert isinstance(p, np.ndarray) and p.dtype == np.float32
    # SAM's default: zero tables
    assert not attn.rel_pos_h.any() and not attn.rel_pos_w.any()
    assert attn.qkv_weight.any() and attn.proj_weight.any()


def test_rel_pos_zero_init_false_gives_nonzero_tables():
    attn = make(rel_pos_zero_init=False)
    assert np.count_nonzero(attn.rel_pos_h) == attn.rel_pos_h.size
    assert np.count_nonzero(attn.rel_pos_w) == attn.rel_pos_w.size


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_parameter_dtype(dtype):
    attn = make(dtype=dtype)
    for key, value in attn.state_dict().items():
        assert value.dtype == np.dtype(dtype), key


def test_rng_reproducibility():
    a, b, c = make(seed=1), make(seed=1), make(seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)
    assert any(not np.array_equal(sa[key], sc[key]) for key in sa)


def test_state_dict_round_trip():
    a, b = make(seed=1), make(seed=2)
    state = a.state_dict()
    assert set(state) == KEYS_FULL
    b.load_state_dict(state)
    for key, value in b.state_dict().items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 24)).astype(np.float32)
    np.testing.assert_array_equal(a(x), b(x))


def test_state_dict_is_not_aliased():
    """Editing a loaded mapping or a returned state dict must not change the layer."""
    a = make(seed=1)
    state = {k: v.copy() for k, v in make(seed=3).state_dict().items()}
    a.load_state_dict(state)
    before = a.qkv_weight.copy()
    state["qkv.weight"][...] = 0
    a.state_dict()["qkv.weight"][...] = 0
    np.testing.assert_array_equal(a.qkv_weight, before)


def test_load_state_dict_converts_dtype():
    a = make(seed=1)
    state = {k: v.astype(np.float64) for k, v in make(seed=4).state_dict().items()}
    a.load_state_dict(state)
    assert a.qkv_weight.dtype == np.float32
    np.testing.assert_array_equal(a.qkv_weight, state["qkv.weight"].astype(np.float32))


@pytest.mark.parametrize("key", sorted(KEYS_FULL))
def test_load_state_dict_missing_key(key):
    a = make()
    state = a.state_dict()
    del state[key]
    with pytest.raises((ValueError, KeyError), match=re.escape(key)):
        a.load_state_dict(state)


def test_load_state_dict_unexpected_key():
    a = make()
    state = a.state_dict()
    state["norm.weight"] = np.ones(24, np.float32)
    with pytest.raises((ValueError, KeyError), match=re.escape("norm.weight")):
        a.load_state_dict(state)


def test_load_state_dict_unexpected_bias_when_qkv_bias_false():
    a = make(qkv_bias=False)
    state = make(qkv_bias=True).state_dict()
    with pytest.raises((ValueError, KeyError), match=re.escape("qkv.bias")):
        a.load_state_dict(state)


def test_load_state_dict_non_strict():
    a, b = make(seed=1), make(seed=2)
    state = a.state_dict()
    del state["rel_pos_w"]
    state["extra"] = np.zeros(3)
    before = b.rel_pos_w.copy()
    b.load_state_dict(state, strict=False)
    np.testing.assert_array_equal(b.qkv_weight, a.qkv_weight)
    np.testing.assert_array_equal(b.rel_pos_h, a.rel_pos_h)
    np.testing.assert_array_equal(b.rel_pos_w, before)


@pytest.mark.parametrize("key,shape", [("qkv.weight", (72, 25)), ("qkv.bias", (71,)),
                                       ("proj.weight", (24, 23)), ("proj.bias", (24, 1)),
                                       ("rel_pos_h", (7, 9)), ("rel_pos_w", (9,))])
def test_load_state_dict_wrong_shape(key, shape):
    a = make()
    state = a.state_dict()
    state[key] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=re.escape(key)):
        a.load_state_dict(state)


def test_load_state_dict_rejects_other_table_length():
    """A checkpoint with 14x14 tables does not load into a 4x4 layer (SAM: strict shapes)."""
    a = make(input_size=(4, 4))
    state = a.state_dict()
    state["rel_pos_h"] = np.zeros((27, 8), np.float32)
    with pytest.raises(ValueError, match="rel_pos_h"):
        a.load_state_dict(state)


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 2), (1, 1), (7, 7)])
def test_forward_matches_oracle_float64(grid):
    """input_size is (4, 4): other grids interpolate the tables (up and down)."""
    attn = make(dtype="float64")
    x = np.random.default_rng(1).standard_normal((2, *grid, 24))
    out = attn(x)
    assert out.shape == x.shape and out.dtype == np.float64
    assert_close(out, reference(attn, x), 1e-10, f"grid {grid}")


@pytest.mark.parametrize("grid", [(4, 4), (5, 3)])
def test_forward_matches_oracle_float32(grid):
    attn = make()
    x = np.random.default_rng(2).standard_normal((2, *grid, 24)).astype(np.float32)
    out = attn(x)
    assert out.dtype == np.float32
    assert_close(out, reference(attn, x), 1e-5, f"grid {grid}")


def test_forward_half_precision():
    attn = make(dtype="float16")
    x = np.random.default_rng(3).standard_normal((1, 4, 4, 24)).astype(np.float16)
    out = attn(x)
    assert out.dtype == np.float16 and np.all(np.isfinite(out))
    assert_close(out, reference(attn, x), 3e-2, "float16 module")


def test_qkv_bias_false():
    attn = make(qkv_bias=False, dtype="float64")
    assert attn.qkv_bias is None
    assert set(attn.state_dict()) == KEYS_FULL - {"qkv.bias"}
    x = np.random.default_rng(4).standard_normal((1, 3, 4, 24))
    assert_close(attn(x), reference(attn, x), 1e-10)


def test_use_rel_pos_false_is_plain_attention():
    attn = make(use_rel_pos=False, dtype="float64")
    assert attn.rel_pos_h is None and attn.rel_pos_w is None
    assert set(attn.state_dict()) == KEYS_FULL - {"rel_pos_h", "rel_pos_w"}
    x = np.random.default_rng(5).standard_normal((2, 3, 5, 24))
    assert_close(attn(x), reference(attn, x), 1e-10)


def test_zero_tables_equal_use_rel_pos_false():
    with_tables = make(rel_pos_zero_init=True, seed=6, dtype="float64")
    plain = make(use_rel_pos=False, seed=7, dtype="float64")
    state = with_tables.state_dict()
    plain.load_state_dict({k: v for k, v in state.items() if not k.startswith("rel_pos")})
    x = np.random.default_rng(6).standard_normal((1, 4, 4, 24))
    assert_close(with_tables(x), plain(x), 1e-12)


@pytest.mark.parametrize("grid,window", [((8, 8), 4), ((5, 7), 4), ((9, 3), 2), ((3, 3), 4),
                                         ((6, 6), 1)])
def test_windowed_forward_equals_manual_partition(grid, window):
    relattn = _relattn()
    attn = make(input_size=(window, window), dtype="float64")
    x = np.random.default_rng(7).standard_normal((2, *grid, 24))
    got = attn(x, window_size=window)
    windows, pad_hw = relattn.window_partition(x, window)
    manual = relattn.window_unpartition(attn(windows), window, pad_hw, grid)
    assert_close(got, manual, 1e-12, "windowed vs manual")
    # and the oracle, which pads with zeros: padded tokens are NOT masked
    assert_close(got, reference(attn, x, window_size=window), 1e-10, "windowed vs oracle")


def test_constructor_window_size_equals_call_window_size():
    a = make(input_size=(3, 3), window_size=3, seed=8)
    b = make(input_size=(3, 3), seed=8)
    x = np.random.default_rng(8).standard_normal((1, 7, 5, 24)).astype(np.float32)
    np.testing.assert_array_equal(a(x), b(x, window_size=3))
    assert_close(a(x), reference(b, x, window_size=3), 1e-5)


def test_padded_tokens_take_part_in_the_softmax():
    """Border windows differ from attending over the real tokens only (SAM quirk)."""
    attn = make(input_size=(4, 4), dtype="float64")
    x = np.random.default_rng(9).standard_normal((1, 5, 5, 24))
    got = attn(x, window_size=4)
    corner_only = attn(x[:, 4:5, 4:5])  # the lone real token of the last window
    assert not np.allclose(got[:, 4:5, 4:5], corner_only)


def test_forward_does_not_modify_input():
    attn = make()
    x = np.random.default_rng(10).standard_normal((1, 5, 3, 24)).astype(np.float32)
    before = x.copy()
    attn(x)
    attn(x, window_size=2)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("backend_name", ["numpy", "auto"])
def test_module_backend_argument(backend_name):
    a = make(backend=backend_name, seed=11)
    x = np.random.default_rng(11).standard_normal((1, 4, 4, 24)).astype(np.float32)
    assert_close(a(x), reference(a, x), 1e-5)


def test_available_backends():
    relattn = _relattn()
    available = relattn.backends.available()
    assert "numpy" in available
    assert set(available) <= set(relattn.backends.names())


# ---------------------------------------------------------------------------
# Bad input: the right exception, naming the argument
# ---------------------------------------------------------------------------

RNG = np.random.default_rng(0)
Q = RNG.standard_normal((1, 2, 6, 8)).astype(np.float32)
RH = RNG.standard_normal((3, 8)).astype(np.float32)
RW = RNG.standard_normal((5, 8)).astype(np.float32)
SIZES = ((2, 3), (2, 3))


def raises(arg, exc=(ValueError, TypeError)):
    return pytest.raises(exc, match=rf"\b{re.escape(arg)}\b")


@pytest.mark.parametrize("arg,call", [
    ("q", lambda r: r.rel_pos_attention(Q[0], Q, Q, RH, RW, *SIZES)),
    ("k", lambda r: r.rel_pos_attention(Q, Q[0], Q, RH, RW, *SIZES)),
    ("v", lambda r: r.rel_pos_attention(Q, Q, Q[..., None], RH, RW, *SIZES)),
    ("v", lambda r: r.rel_pos_attention(Q, Q, Q[:, :, :5], RH, RW, *SIZES)),
    ("k", lambda r: r.rel_pos_attention(Q, Q[..., :4], Q, RH, RW, *SIZES)),
    ("k", lambda r: r.rel_pos_attention(Q, Q[:, :1], Q[:, :1], RH, RW, *SIZES)),
    ("q_size", lambda r: r.rel_pos_attention(Q, Q, Q, RH, RW, (2, 2), (2, 3))),
    ("q_size", lambda r: r.rel_pos_attention(Q, Q, Q, RH, RW, (6,), (2, 3))),
    ("q_size", lambda r: r.rel_pos_attention(Q, Q, Q, RH, RW, None, (2, 3))),
    ("k_size", lambda r: r.rel_pos_attention(Q, Q, Q, RH, RW, (2, 3), (3, 3))),
    ("k_size", lambda r: r.rel_pos_attention(Q, Q[:, :, :4], Q[:, :, :4], RH, RW, (2, 3), None)),
    ("q_size", lambda r: r.rel_pos_attention(Q, Q, Q, RH, RW, (-2, -3), (2, 3))),
    ("q", lambda r: r.rel_pos_attention(Q[:, :, :0], Q, Q, RH, RW, (0, 3), (2, 3))),
    ("q_size", lambda r: r.rel_pos_attention(Q, Q, Q, RH, RW, (2.5, 2.4), (2, 3))),
    ("q_size", lambda r: r.rel_pos_attention(Q, Q, Q, RH, RW, (0, 6), (2, 3))),
    ("rel_pos_h", lambda r: r.rel_pos_attention(Q, Q, Q, RH[:, :7], RW, *SIZES)),
    ("rel_pos_w", lambda r: r.rel_pos_attention(Q, Q, Q, RH, RW[:, :7], *SIZES)),
    ("rel_pos_h", lambda r: r.rel_pos_attention(Q, Q, Q, RH[None], RW, *SIZES)),
    ("rel_pos_h", lambda r: r.rel_pos_attention(Q, Q, Q, RH[:0], RW, *SIZES)),
    ("rel_pos_w", lambda r: r.rel_pos_attention(Q, Q, Q, RH, None, *SIZES)),
    ("rel_pos_h", lambda r: r.rel_pos_attention(Q, Q, Q, None, RW, *SIZES)),
    ("backend", lambda r: r.rel_pos_attention(Q, Q, Q, RH, RW, *SIZES, backend="torch")),
    ("scale", lambda r: r.rel_pos_attention(Q, Q, Q, RH, RW, *SIZES, scale="big")),
])
def test_rel_pos_attention_bad_input(arg, call):
    relattn = _relattn()
    with raises(arg):
        call(relattn)


@pytest.mark.parametrize("bad", [
    np.array([["a"] * 8] * 6, dtype=object)[None, None],
    np.ones((1, 2, 6, 8), dtype=np.int32),
    np.ones((1, 2, 6, 8), dtype=np.complex64),
    np.ones((1, 2, 6, 8), dtype=bool),
    "not an array",
])
def test_non_numeric_or_non_float_q(bad):
    relattn = _relattn()
    with raises("q"):
        relattn.rel_pos_attention(bad, Q, Q, RH, RW, *SIZES)


def test_mismatched_dtypes():
    relattn = _relattn()
    with raises("k"):
        relattn.rel_pos_attention(Q, Q.astype(np.float64), Q, RH, RW, *SIZES)
    with raises("v"):
        relattn.rel_pos_attention(Q, Q, Q.astype(np.float16), RH, RW, *SIZES)


@pytest.mark.parametrize("arg,call", [
    ("length", lambda r: r.resize_rel_pos(RH, 0)),
    ("length", lambda r: r.resize_rel_pos(RH, -3)),
    ("length", lambda r: r.resize_rel_pos(RH, 2.5)),
    ("rel_pos", lambda r: r.resize_rel_pos(RH[0], 4)),
    ("rel_pos", lambda r: r.resize_rel_pos(RH.astype(np.int64), 4)),
    ("q_size", lambda r: r.get_rel_pos(0, 3, RH)),
    ("k_size", lambda r: r.get_rel_pos(3, -1, RH)),
    ("rel_pos", lambda r: r.get_rel_pos(2, 2, RH[None])),
    ("q_size", lambda r: r.decomposed_rel_pos(Q, RH, RW, (3, 3), (2, 3))),
    ("rel_pos_h", lambda r: r.decomposed_rel_pos(Q, RH[:, :3], RW, *SIZES)),
    ("window_size", lambda r: r.window_partition(np.zeros((1, 4, 4, 2)), 0)),
    ("window_size", lambda r: r.window_partition(np.zeros((1, 4, 4, 2)), -2)),
    ("x", lambda r: r.window_partition(np.zeros((4, 4, 2)), 2)),
    ("window_size", lambda r: r.window_unpartition(np.zeros((4, 2, 2, 2)), 0, (4, 4), (4, 4))),
])
def test_functional_bad_input(arg, call):
    relattn = _relattn()
    with raises(arg):
        call(relattn)


@pytest.mark.parametrize("arg,kwargs", [
    ("dim", dict(dim=25, num_heads=3)),
    ("dim", dict(dim=0, num_heads=3)),
    ("num_heads", dict(dim=24, num_heads=0)),
    ("num_heads", dict(dim=24, num_heads=-3)),
    ("input_size", dict(dim=24, num_heads=3, use_rel_pos=True)),
    ("input_size", dict(dim=24, num_heads=3, use_rel_pos=True, input_size=(0, 4))),
    ("input_size", dict(dim=24, num_heads=3, use_rel_pos=True, input_size=(4,))),
    ("dtype", dict(dim=24, num_heads=3, dtype="int32")),
    ("dtype", dict(dim=24, num_heads=3, dtype="float128-ish")),
    ("window_size", dict(dim=24, num_heads=3, window_size=-1)),
    ("rng", dict(dim=24, num_heads=3, rng="seed")),
])
def test_attention_constructor_bad_input(arg, kwargs):
    relattn = _relattn()
    with raises(arg):
        relattn.Attention(**kwargs)


def test_attention_bad_backend_raises_by_first_forward():
    relattn = _relattn()
    with raises("backend"):
        attn = relattn.Attention(24, 3, backend="jax")
        attn(np.zeros((1, 2, 2, 24), np.float32))


def test_k_size_defaults_to_q_size_when_lengths_match():
    relattn = _relattn()
    a = relattn.rel_pos_attention(Q, Q, Q, RH, RW, (2, 3))
    b = relattn.rel_pos_attention(Q, Q, Q, RH, RW, (2, 3), (2, 3))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("arg,x,kwargs", [
    ("x", np.zeros((4, 4, 24), np.float32), {}),
    ("x", np.zeros((1, 4, 4, 23), np.float32), {}),
    ("x", np.zeros((1, 0, 4, 24), np.float32), {}),
    ("x", np.zeros((1, 4, 4, 24), np.int64), {}),
    ("window_size", np.zeros((1, 4, 4, 24), np.float32), dict(window_size=-3)),
])
def test_forward_bad_input(arg, x, kwargs):
    attn = make()
    with raises(arg):
        attn(x, **kwargs)


def test_load_state_dict_bad_mapping():
    attn = make()
    with raises("mapping"):
        attn.load_state_dict([("qkv.weight", np.zeros((72, 24)))])


def test_layer_parameters_are_read_only_views_and_assignment_takes_effect():
    """The layer caches device / dtype copies of its parameters: an in-place
    edit of a returned array would be missed, so it is refused; assigning a
    new array updates every later call."""
    relattn = _relattn()
    layer = relattn.Attention(16, 2, use_rel_pos=True, input_size=(3, 3), rng=0, rel_pos_zero_init=False)
    x = np.random.default_rng(0).standard_normal((1, 3, 3, 16)).astype(np.float32)
    before = layer(x)
    for name in ("qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "rel_pos_h", "rel_pos_w"):
        with pytest.raises(ValueError, match="read-only"):
            getattr(layer, name)[...] = 0
    np.testing.assert_array_equal(layer(x), before)
    layer.rel_pos_h = layer.rel_pos_h * 3
    after = layer(x)
    assert not np.array_equal(after, before)
    fresh = relattn.Attention.from_state_dict(layer.state_dict(), num_heads=2)
    np.testing.assert_allclose(after, fresh(x), rtol=1e-6, atol=1e-6)
