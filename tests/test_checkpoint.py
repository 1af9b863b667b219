"""Checkpoints: safetensors / npz round trips, layer discovery, table adaptation."""

import numpy as np
import pytest

import relattn


def _sam_like_state_dict(rng):
    """Two blocks of a tiny SAM-style encoder: one windowed (4x4), one global (8x8)."""
    sd = {}
    for i, size in enumerate([(4, 4), (8, 8)]):
        layer = relattn.Attention(32, 4, use_rel_pos=True, rel_pos_zero_init=False, input_size=size, rng=rng)
        sd.update({f"image_encoder.blocks.{i}.attn.{k}": v for k, v in layer.state_dict().items()})
        sd[f"image_encoder.blocks.{i}.norm1.weight"] = np.ones(32, np.float32)
    return sd


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_load_round_trip(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    sd = _sam_like_state_dict(np.random.default_rng(0))
    path = tmp_path / f"ckpt{suffix}"
    relattn.save_checkpoint(sd, path)
    back = relattn.load_checkpoint(path)
    assert sorted(back) == sorted(sd)
    for key in sd:
        assert np.array_equal(back[key], sd[key]), key


def test_bfloat16_safetensors_written_by_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    weight = torch.randn(96, 32).to(torch.bfloat16)
    st.save_file({"attn.qkv.weight": weight}, str(tmp_path / "bf16.safetensors"))
    back = relattn.load_checkpoint(tmp_path / "bf16.safetensors")["attn.qkv.weight"]
    assert back.dtype.name == "bfloat16"
    assert np.array_equal(back.astype(np.float32), weight.float().numpy())


def test_pickle_formats_refused(tmp_path):
    path = tmp_path / "sam_vit_b.pth"
    path.write_bytes(b"not read")
    with pytest.raises(ValueError, match="path"):
        relattn.load_checkpoint(path)


def test_attention_layers_reads_sizes_and_kind():
    sd = _sam_like_state_dict(np.random.default_rng(1))
    infos = relattn.attention_layers(sd)
    assert [i.prefix for i in infos] == ["image_encoder.blocks.0.attn.", "image_encoder.blocks.1.attn."]
    assert [i.input_size for i in infos] == [(4, 4), (8, 8)]
    assert [i.windowed for i in infos] == [True, False]
    assert all(i.num_heads == 4 and i.head_dim == 8 and i.dim == 32 and i.qkv_bias for i in infos)


def test_from_state_dict_matches_source_layer():
    rng = np.random.default_rng(2)
    sd = _sam_like_state_dict(rng)
    x = rng.standard_normal((2, 8, 8, 32), dtype=np.float32)
    layer = relattn.Attention.from_state_dict(sd, "image_encoder.blocks.1.attn.")
    src = relattn.Attention(32, 4, use_rel_pos=True, input_size=(8, 8))
    src.load_state_dict({k.split("attn.")[1]: v for k, v in sd.items() if ".blocks.1.attn." in k})
    assert np.array_equal(layer(x), src(x))
    with pytest.raises(ValueError, match="prefix"):
        relattn.Attention.from_state_dict(sd, "image_encoder.blocks.9.attn.")
    with pytest.raises(ValueError, match="num_heads"):
        relattn.Attention.from_state_dict(sd, "image_encoder.blocks.1.attn.", num_heads=8)


def test_from_state_dict_without_tables_needs_heads():
    layer = relattn.Attention(32, 4, rng=3)
    with pytest.raises(ValueError, match="num_heads"):
        relattn.Attention.from_state_dict(layer.state_dict())
    again = relattn.Attention.from_state_dict(layer.state_dict(), num_heads=4)
    x = np.random.default_rng(4).standard_normal((1, 3, 5, 32), dtype=np.float32)
    assert np.array_equal(again(x), layer(x))


def test_resize_checkpoint_tables_only_touches_matching_tables(tmp_path):
    sd = _sam_like_state_dict(np.random.default_rng(5))
    before = {k: v.copy() for k, v in sd.items()}
    out = relattn.resize_checkpoint_tables(sd, (8, 8), (10, 10))
    for key, value in sd.items():  # input untouched
        assert np.array_equal(value, before[key])
    assert out["image_encoder.blocks.1.attn.rel_pos_h"].shape == (19, 8)
    assert np.array_equal(out["image_encoder.blocks.1.attn.rel_pos_w"],
                          relattn.resize_rel_pos(sd["image_encoder.blocks.1.attn.rel_pos_w"], 19))
    assert out["image_encoder.blocks.0.attn.rel_pos_h"] is sd["image_encoder.blocks.0.attn.rel_pos_h"]
    # The adapted checkpoint loads into a layer built for the new grid and runs on it.
    relattn.save_checkpoint(out, tmp_path / "adapted.npz")
    layer = relattn.Attention.from_state_dict(relattn.load_checkpoint(tmp_path / "adapted.npz"),
                                              "image_encoder.blocks.1.attn.")
    assert layer.input_size == (10, 10)
    x = np.random.default_rng(6).standard_normal((1, 10, 10, 32), dtype=np.float32)
    # Resizing once in the checkpoint equals resizing on the fly in the original layer.
    original = relattn.Attention.from_state_dict(sd, "image_encoder.blocks.1.attn.")
    np.testing.assert_allclose(layer(x), original(x), rtol=0, atol=1e-6)
