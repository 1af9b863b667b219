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


# ---------------------------------------------------------------------------
# Trustworthy files: atomic writes, keys as given, bfloat16, bounded strict loads
# ---------------------------------------------------------------------------


def _old_file(tmp_path, suffix):
    """A checkpoint already on disk, and its bytes."""
    path = tmp_path / f"ckpt{suffix}"
    relattn.save_checkpoint({"old": np.arange(6, dtype=np.float32)}, path)
    return path, path.read_bytes()


def _new_state_dict():
    return {f"k{i}": np.full((64, 64), i, np.float32) for i in range(3)}


def _fail_mid_write(monkeypatch, suffix, exc):
    """Make the format's writer write part of the file, then raise ``exc``."""
    if suffix == ".npz":
        real, calls = np.lib.format.write_array, []

        def writer(fp, array, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # one member written, the next one half-way
                fp.write(b"\x93NUMPY partial")
                raise exc
            return real(fp, array, *args, **kwargs)

        monkeypatch.setattr(np.lib.format, "write_array", writer)
    else:  # serialization fails after the temporary file exists
        st_numpy = pytest.importorskip("safetensors.numpy")

        def writer(arrays, *args, **kwargs):
            raise exc

        def file_writer(arrays, filename, *args, **kwargs):
            with open(filename, "wb") as f:
                f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00{partial")
            raise exc

        monkeypatch.setattr(st_numpy, "save", writer)
        monkeypatch.setattr(st_numpy, "save_file", file_writer)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "interrupt"])
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_failure_mid_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch, suffix, exc):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    path, before = _old_file(tmp_path, suffix)
    _fail_mid_write(monkeypatch, suffix, exc)
    with pytest.raises(type(exc)):
        relattn.save_checkpoint(_new_state_dict(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    monkeypatch.undo()
    assert np.array_equal(relattn.load_checkpoint(path)["old"], np.arange(6, dtype=np.float32))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_disk_full_keeps_old_file_and_no_temp(tmp_path, monkeypatch, suffix):
    import errno
    import os

    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    path, before = _old_file(tmp_path, suffix)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        relattn.save_checkpoint(_new_state_dict(), path)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_save_killed_mid_write_keeps_old_file(tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys

    if not hasattr(signal, "SIGKILL"):
        pytest.skip("needs SIGKILL")
    path, before = _old_file(tmp_path, ".npz")
    script = (
        "import os, signal, sys, numpy as np, relattn\n"
        "real, calls = np.lib.format.write_array, []\n"
        "def dying(fp, array, *args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        fp.write(b'partial'); os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(fp, array, *args, **kwargs)\n"
        "np.lib.format.write_array = dying\n"
        "relattn.save_checkpoint({f'k{i}': np.full((64, 64), i, np.float32) for i in range(3)}, sys.argv[1])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, os.fspath(path)], timeout=120, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert path.read_bytes() == before
    # Only a killed process's temporary file may remain, hidden and named after the target.
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert all(re.fullmatch(r"\.ckpt\.npz\.[0-9a-f]{8}\.tmp", name) for name in leftovers), leftovers


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_permissions_match_a_plain_write(tmp_path, suffix):
    import os
    import stat

    if os.name != "posix":
        pytest.skip("POSIX permission bits")
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    sd = {"w": np.ones(3, np.float32)}
    for umask in (0o022, 0o027, 0o077, 0o002):
        old = os.umask(umask)
        try:
            with open(tmp_path / f"plain{umask}", "w"):
                pass
            relattn.save_checkpoint(sd, tmp_path / f"new{umask}{suffix}")
        finally:
            os.umask(old)
        expected = stat.S_IMODE(os.stat(tmp_path / f"plain{umask}").st_mode)
        assert expected == 0o666 & ~umask
        assert stat.S_IMODE(os.stat(tmp_path / f"new{umask}{suffix}").st_mode) == expected
    # Rewriting an existing file keeps its bits, as open(path, "w") does.
    path = tmp_path / f"existing{suffix}"
    relattn.save_checkpoint(sd, path)
    os.chmod(path, 0o640)
    relattn.save_checkpoint({"w": np.zeros(3, np.float32)}, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert np.array_equal(relattn.load_checkpoint(path)["w"], np.zeros(3, np.float32))
    # A symlink is followed, like open(path, "w"): the link stays, its target changes.
    link = tmp_path / f"link{suffix}"
    link.symlink_to(path.name)
    relattn.save_checkpoint({"w": np.full(3, 7, np.float32)}, link)
    assert link.is_symlink()
    assert np.array_equal(relattn.load_checkpoint(path)["w"], np.full(3, 7, np.float32))


ODD_KEYS = ["allow_pickle", "file", "compress", "args", "kwds", "a/b.c", "../up", "x.npy",
            "ünïcødé.κλειδί", "空 白", ""]


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_keys_stored_as_given(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    sd = {key: np.full(i + 1, i, np.float32) for i, key in enumerate(ODD_KEYS)}
    path = tmp_path / f"odd{suffix}"
    relattn.save_checkpoint(sd, path)
    back = relattn.load_checkpoint(path)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert np.array_equal(back[key], value), key
    if suffix == ".npz":  # the archive is an ordinary one that numpy reads
        with np.load(path, allow_pickle=False) as archive:
            assert sorted(archive.files) == sorted(sd)
            assert np.array_equal(archive["allow_pickle"], sd["allow_pickle"])


@pytest.mark.parametrize("name", ["x.NPZ", "x.Npz", "x.SAFETENSORS", "x.SafeTensors"])
def test_upper_case_suffix_written_where_asked(tmp_path, name):
    if name.lower().endswith(".safetensors"):
        pytest.importorskip("safetensors")
    sd = {"w": np.arange(4, dtype=np.float32)}
    relattn.save_checkpoint(sd, tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert np.array_equal(relattn.load_checkpoint(tmp_path / name)["w"], sd["w"])


def test_bfloat16_npz_round_trip_is_bit_exact(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    layer = relattn.Attention(32, 4, use_rel_pos=True, rel_pos_zero_init=False, input_size=(4, 4),
                              dtype="bfloat16", rng=0)
    sd = layer.state_dict()
    sd["extra.int"] = np.arange(5, dtype=np.int64)
    path = tmp_path / "bf16.npz"
    relattn.save_checkpoint(sd, path)
    back = relattn.load_checkpoint(path)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype, key
        assert back[key].tobytes() == value.tobytes(), key
    assert back["qkv.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
    again = relattn.Attention.from_state_dict({k: v for k, v in back.items() if k != "extra.int"},
                                              dtype="bfloat16")
    for key, value in again.state_dict().items():
        assert value.tobytes() == sd[key].tobytes(), key
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 32)).astype(np.float32)
    assert np.array_equal(again(x), layer(x))
    # The documented encoding: uint16 bits, listed in __relattn_dtypes__.json.
    import json
    import zipfile

    with zipfile.ZipFile(path) as archive:
        table = json.loads(archive.read("__relattn_dtypes__.json"))
    assert table == {key: "bfloat16" for key in sd if key != "extra.int"}
    with np.load(path, allow_pickle=False) as archive:
        assert archive["qkv.weight"].dtype == np.uint16
        assert np.array_equal(archive["qkv.weight"], sd["qkv.weight"].view(np.uint16))


def test_plain_numpy_savez_archives_still_load(tmp_path):
    sd = {
        "f16": np.arange(6, dtype=np.float16), "f32": np.ones((2, 3), np.float32),
        "f64": np.asfortranarray(np.arange(12.0).reshape(3, 4)), "i8": np.arange(-3, 3, dtype=np.int8),
        "u8": np.arange(4, dtype=np.uint8), "i64": np.arange(3, dtype=np.int64), "bool": np.array([True, False]),
        "scalar": np.array(2.5), "empty": np.zeros((0, 3), np.float32),
    }
    for saver, name in ((np.savez, "plain.npz"), (np.savez_compressed, "compressed.npz")):
        saver(tmp_path / name, **sd)
        back = relattn.load_checkpoint(tmp_path / name)
        assert sorted(back) == sorted(sd)
        for key, value in sd.items():
            assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
            assert np.array_equal(back[key], value), key


def _zip(path, members):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _npy(descr, shape, data: bytes, fortran_order=False) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran_order, "shape": shape})
    return buf.getvalue() + data


@pytest.mark.parametrize("member, value", [
    ("a.npy", np.array([b"ab", b"cd"])),
    ("a.npy", np.array(["text"])),
    ("a.npy", np.zeros(3, "V2")),
    ("a.npy", np.zeros(2, [("x", "<f4"), ("y", "<i4")])),
    ("a.npy", np.zeros(2, np.complex64)),
    ("a.npy", np.zeros(2, np.longdouble)),
    ("a.npy", np.zeros(2, "datetime64[s]")),
    ("notes.txt", None),
], ids=["bytes", "str", "void", "structured", "complex", "longdouble", "datetime", "stray-member"])
def test_npz_non_numeric_members_refused(tmp_path, member, value):
    import io

    path = tmp_path / "bad.npz"
    members = {"ok.npy": _npy("<f4", (2,), np.ones(2, "<f4").tobytes())}
    if value is None:
        members[member] = b"hello"
    else:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, value, allow_pickle=False)
        members[member] = buf.getvalue()
    _zip(path, members)
    with pytest.raises(ValueError, match=r"^path: .*bad\.npz.*" + member.replace(".", r"\.")):
        relattn.load_checkpoint(path)


def test_npz_pickled_member_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", ok=np.ones(2), a=np.array([{"x": 1}, None], dtype=object))
    with pytest.raises(ValueError, match=r"^path: .*obj\.npz.*'a\.npy'"):
        relattn.load_checkpoint(tmp_path / "obj.npz")


def test_npz_size_limit_checked_before_decompression(tmp_path, monkeypatch):
    import zipfile

    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, big=np.zeros(2**21, np.float32))  # 8 MiB of data, a few KiB on disk
    assert path.stat().st_size < 2**16
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, *a, **k: opened.append(a) or real_open(self, *a, **k))
    with pytest.raises(ValueError, match=r"^path: .*max_bytes=1048576"):
        relattn.load_checkpoint(path, max_bytes=2**20)
    assert opened == []  # refused from the zip directory alone
    assert relattn.load_checkpoint(path, max_bytes=None)["big"].shape == (2**21,)
    assert relattn.load_checkpoint(path, max_bytes=2**23 + 1024)["big"].shape == (2**21,)
    for bad, kind in ((-1, ValueError), ("1", TypeError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(kind, match="^max_bytes"):
            relattn.load_checkpoint(path, max_bytes=bad)


@pytest.mark.parametrize("shape, data", [
    ((2**40,), np.ones(4, "<f4").tobytes()),   # declares 4 TiB, holds 16 bytes
    ((1000,), np.ones(4, "<f4").tobytes()),    # declares more than it holds
    ((2,), np.ones(4, "<f4").tobytes()),       # declares less: trailing bytes
    ((-3,), b""),
], ids=["huge", "short", "trailing", "negative"])
def test_npz_lying_npy_header_refused(tmp_path, shape, data):
    path = _zip(tmp_path / "lie.npz", {"w.npy": _npy("<f4", shape, data)})
    with pytest.raises(ValueError, match=r"^path: .*lie\.npz.*'w\.npy'"):
        relattn.load_checkpoint(path)


def _safetensors_file(path, header: dict, data: bytes, length=None):
    import json
    import struct

    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_safetensors_header_checked_before_loading(tmp_path, monkeypatch):
    st_numpy = pytest.importorskip("safetensors.numpy")
    data = np.ones(2**18, np.float32).tobytes()  # 1 MiB
    good = _safetensors_file(tmp_path / "good.safetensors",
                             {"w": {"dtype": "F32", "shape": [2**18], "data_offsets": [0, len(data)]}}, data)
    assert relattn.load_checkpoint(good)["w"].shape == (2**18,)
    calls = []
    real = st_numpy.load_file
    monkeypatch.setattr(st_numpy, "load_file", lambda *a, **k: calls.append(a) or real(*a, **k))
    with pytest.raises(ValueError, match=r"^path: .*max_bytes=1000"):
        relattn.load_checkpoint(good, max_bytes=1000)
    cases = {
        "length": ({}, b"", 2**60),
        "complex": ({"c": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, bytes(16), None),
        "fp8": ({"c": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), None),
        "offsets": ({"w": {"dtype": "F32", "shape": [2**30], "data_offsets": [0, 8]}}, bytes(8), None),
        "outside": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), None),
        "shape": ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]}}, b"", None),
        "list": ([1, 2], b"", None),
        "dtypelist": ({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4), None),
    }
    for name, (header, payload, length) in cases.items():
        path = _safetensors_file(tmp_path / f"{name}.safetensors", header, payload, length)
        with pytest.raises(ValueError, match=rf"^path: .*{name}\.safetensors"):
            relattn.load_checkpoint(path)
    assert calls == []  # every refusal came from relattn's own header check
    relattn.load_checkpoint(good)
    assert len(calls) == 1


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_not_regular_file_refused_without_blocking(tmp_path, suffix):
    import json
    import os
    import subprocess
    import sys

    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs os.mkfifo")
    fifo = tmp_path / f"fifo{suffix}"
    os.mkfifo(fifo)
    # In a child process: a reader blocked in open() may hold the GIL, which would
    # hang this process instead of failing the test.
    script = (
        "import json, sys, time, relattn\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    relattn.load_checkpoint(sys.argv[1]); out = dict(error=None)\n"
        "except BaseException as exc:\n"
        "    out = dict(error=type(exc).__name__, oserror=isinstance(exc, OSError), message=str(exc))\n"
        "out['seconds'] = time.perf_counter() - start\n"
        "print(json.dumps(out))\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", script, os.fspath(fifo)], capture_output=True,
                              timeout=30, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail("load_checkpoint blocked on a FIFO")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["oserror"], out
    assert out["message"].startswith("path: ") and "fifo" in out["message"], out
    assert out["seconds"] < 5, out
    directory = tmp_path / f"dir{suffix}"
    directory.mkdir()
    with pytest.raises(IsADirectoryError, match="^path: .*dir"):
        relattn.load_checkpoint(directory)


def test_io_failures_are_oserror(tmp_path, monkeypatch):
    import os

    for suffix in (".npz", ".safetensors"):
        with pytest.raises(FileNotFoundError):
            relattn.load_checkpoint(tmp_path / f"missing{suffix}")
    safetensors = pytest.importorskip("safetensors")
    st_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "gone.safetensors"
    relattn.save_checkpoint({"w": np.ones(3, np.float32)}, path)

    def vanishing(filename, *args, **kwargs):  # the file disappears between check and load
        os.remove(filename)
        raise safetensors.SafetensorError("No such file or directory (os error 2)")

    monkeypatch.setattr(st_numpy, "load_file", vanishing)
    with pytest.raises(FileNotFoundError):
        relattn.load_checkpoint(path)


def test_save_safetensors_without_package_has_install_hint(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    hint = r"needs the safetensors package \(pip install relattn\[io\]\)"
    with pytest.raises(ImportError, match=hint):
        relattn.save_checkpoint({"w": np.ones(3, np.float32)}, tmp_path / "x.safetensors")
    with pytest.raises(ImportError, match=hint):
        relattn.load_checkpoint(tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
