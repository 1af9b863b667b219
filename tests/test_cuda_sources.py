"""The CUDA sources and the Hopper kernel's host-side logic, without a GPU.

The kernels themselves are exercised on the GPU machine (tests/test_gpu.py); here:
the generated wgmma wrappers cover every shape the kernel instantiates, the
configuration choice and shared-memory sizing are what the launcher expects, and,
where ``nvcc`` is installed, both .cu files compile for sm_90 / sm_90a with the
instantiations the backend asks NVRTC for (skipped cleanly without ``nvcc``).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from relattn.backends import _sm90, cupy_gpu



def test_wrappers_cover_every_tile_and_head_dim():
    src = _sm90._wrappers()
    for dt in (0, 1):
        for n in sorted(set(_sm90._BNS) | set(_sm90._HDS)):
            assert f"template <> struct RaWg<{dt}, {n}>" in src
    # one wgmma per wrapper, accumulator count = N / 2 registers
    for n in (64, 80, 128):
        m = re.search(rf"m64n{n}k16\.f32\.bf16\.bf16 \{{([^}}]*)\}}, %{n // 2}, %{n // 2 + 1}", src)
        assert m is not None and len(m.group(1).split(",")) == n // 2


def test_source_puts_wrappers_before_the_kernel():
    src = _sm90.source()
    assert src.index("struct RaWg<1, 64>") < src.index("relattn_wg(")
    assert src.index("typedef unsigned long long u64;") < src.index("struct RaWg<0, 16>")


def test_choose(monkeypatch):
    monkeypatch.delenv("RELATTN_SM90_CFG", raising=False)
    assert _sm90.choose(64, 4096, 4096, 64, 64, True) == (1, 64, 1, 2)      # SAM-B/L global
    assert _sm90.choose(64, 4096, 4096, 1, 4096, False) == (1, 64, 0, 2)    # plain attention
    assert _sm90.choose(80, 4096, 4096, 64, 64, True) == (2, 64, 1, 2)      # SAM-H: split tiles
    assert _sm90.choose(80, 4096, 4096, 1, 4096, False) == (2, 64, 0, 2)
    assert _sm90.choose(96, 4096, 4096, 64, 64, True) is None               # mma.sync
    assert _sm90.choose(64, 196, 196, 14, 14, True) is None                 # windows: mma.sync
    assert _sm90.choose(64, 6400, 6400, 80, 80, True) == (1, 80, 3, 2)      # 1280 px: whole key rows
    assert _sm90.choose(64, 2304, 1024, 48, 32, True) is None               # k_w 32: mma.sync
    assert _sm90.choose(80, 6400, 6400, 80, 80, True) is None
    monkeypatch.setenv("RELATTN_SM90_CFG", "2,128,3")
    assert _sm90.choose(64, 196, 196, 14, 14, True) == (2, 128, 2, 3)
    assert _sm90.choose(64, 6400, 6400, 80, 80, True) == (2, 128, 2, 3)     # bn != k_w: generic bias
    monkeypatch.setenv("RELATTN_SM90_CFG", "1,80")
    assert _sm90.choose(64, 6400, 6400, 80, 80, True) == (1, 80, 3, 2)
    assert _sm90.choose(128, 4096, 4096, 2000, 2000, True) is None          # cache too large


def test_choose_ws(monkeypatch):
    """The warp-specialised kernel: head_dim 64 or 80 with k_w == 64 or no
    terms, off by RELATTN_SM90_WS=0 or an explicit relattn_wg configuration."""
    for name in ("RELATTN_SM90_WS", "RELATTN_SM90_CFG"):
        monkeypatch.delenv(name, raising=False)
    assert _sm90.WS_DEFAULT == {64: (3, 64, 4, 1, 160, 1), 80: (2, 128, 3, 1, 240, 1)}
    assert _sm90.choose_ws(64, 4096, 4096, 64, 64, True) == (3, 64, 1, 4, 1, 160, 1)    # SAM-B global
    assert _sm90.choose_ws(80, 4096, 4096, 64, 64, True) == (2, 128, 1, 3, 1, 240, 1)   # SAM-H global
    assert _sm90.choose_ws(64, 1000, 300, 1, 300, False) == (3, 64, 0, 4, 1, 160, 1)    # plain attention
    # small key grids in 16-slot key rows (rel 5): one consumer, three blocks per SM
    assert _sm90.choose_ws(64, 196, 196, 14, 14, True) == (1, 64, 5, 3, 0, 0, 3)       # SAM's windows
    assert _sm90.choose_ws(80, 196, 196, 14, 14, True) == (1, 32, 5, 3, 0, 0, 3)   # 32-key tiles
    assert _sm90.choose_ws(64, 300, 100, 10, 10, True) == (1, 64, 5, 3, 0, 0, 3)
    assert _sm90.choose_ws(64, 196, 196, 14, 14, False) == (3, 64, 0, 4, 1, 160, 1)      # no terms
    assert _sm90.choose_ws(64, 1024, 1024, 32, 32, True) is None                      # k_w 17..63
    assert _sm90.choose_ws(64, 400, 400, 20, 20, True) is None
    assert _sm90.choose_ws(64, 196, 195, 14, 14, True) is None                        # not a k_h x k_w grid
    monkeypatch.setenv("RELATTN_SM90_WSWIN", "0")
    assert _sm90.choose_ws(64, 196, 196, 14, 14, True) is None
    monkeypatch.delenv("RELATTN_SM90_WSWIN")
    assert _sm90.choose_ws(48, 4096, 4096, 64, 64, True) is None
    assert _sm90.choose_ws(96, 4096, 4096, 64, 64, True) is None
    monkeypatch.setenv("RELATTN_SM90_WS", "2,64,4,1,240")
    assert _sm90.choose_ws(64, 4096, 4096, 64, 64, True) == (2, 64, 1, 4, 1, 240, 1)
    monkeypatch.setenv("RELATTN_SM90_WS", "1,64,3,0,0,3")                              # blocks per SM last
    assert _sm90.choose_ws(64, 196, 196, 14, 14, True) == (1, 64, 5, 3, 0, 0, 3)
    monkeypatch.setenv("RELATTN_SM90_WS", "2,128,8,1,240")                             # too much shared memory
    assert _sm90.choose_ws(64, 4096, 4096, 64, 64, True) is None
    monkeypatch.setenv("RELATTN_SM90_WS", "0")
    assert _sm90.choose_ws(64, 4096, 4096, 64, 64, True) is None
    monkeypatch.delenv("RELATTN_SM90_WS")
    monkeypatch.setenv("RELATTN_SM90_CFG", "1,64")
    assert _sm90.choose_ws(64, 4096, 4096, 64, 64, True) is None
    monkeypatch.setenv("RELATTN_SM90_WS", "1")                                         # both: ws wins
    assert _sm90.choose_ws(64, 4096, 4096, 64, 64, True) == (3, 64, 1, 4, 1, 160, 1)


def test_ws_shared_memory():
    # Q (3 x 64 rows), 4 stages of K and V, alignment; fused: two tables + 3 scratches
    assert _sm90.ws_smem_bytes(64, 3, 64, 4) == 3 * 64 * 128 + 4 * 2 * 64 * 128 + 1024
    # the whole 128-row scratch where it fits (SAM-B), else two passes over 64 rows (SAM-H)
    assert _sm90.ws_smem_bytes(64, 3, 64, 4, True) == (_sm90.ws_smem_bytes(64, 3, 64, 4)
                                                       + 2 * 128 * 128 + 3 * 64 * 136 * 4)
    assert _sm90.ws_smem_bytes(80, 2, 128, 3, True) == (_sm90.ws_smem_bytes(80, 2, 128, 3)
                                                        + 2 * 128 * 160 + 2 * 64 * 72 * 4)
    assert _sm90.ws_smem_bytes(80, 2, 128, 3) == 2 * 64 * 160 + 3 * 2 * 128 * 160 + 1024
    # 16-slot key rows, fused (rel 6): tables of 32 rows, a 64 x 36 scratch per consumer
    assert _sm90.ws_smem_bytes(64, 1, 64, 3, True, True) == (_sm90.ws_smem_bytes(64, 1, 64, 3)
                                                             + 2 * 32 * 128 + 64 * 36 * 4)
    for hd, cfg in _sm90.WS_DEFAULT.items():   # the defaults fit with the fused terms
        nc, bn, st = cfg[:3]
        assert _sm90.ws_smem_bytes(hd, nc, bn, st, True) <= _sm90.MAX_SMEM - 1024
    for hd, cfg in _sm90.WS_WIN_DEFAULT.items():   # three blocks of the window defaults fit an SM (228 KB;
        nc, bn, st, _, _, mb = cfg                  # 1 KB reserved and 8-byte barriers per block)
        per_block = _sm90.ws_smem_bytes(hd, nc, bn, st, True, True) + 1024 + 8 * (2 * st + 2)
        assert mb * per_block <= 228 * 1024


def test_ws_usable():
    assert _sm90.ws_usable((0, 16), ([4096 * 64, 64, 3 * 768],), 64)
    assert _sm90.ws_usable((0,), ([80, 80, 80],), 80)
    assert not _sm90.ws_usable((8,), ([64, 64, 64],), 64)          # base not 16-byte aligned
    assert not _sm90.ws_usable((0,), ([64, 64, 68],), 64)          # row stride not 16 bytes
    assert not _sm90.ws_usable((0,), ([64, 64, 64],), 60)          # head dim not a multiple of 8
    assert not _sm90.ws_usable((0,), ([88, 88, 88],), 88)          # head dim > 80


def test_small_grid_kernel_choice(monkeypatch):
    monkeypatch.delenv("RELATTN_WIN", raising=False)
    monkeypatch.delenv("RELATTN_WIN_SPB", raising=False)
    assert cupy_gpu._win_config(64, 196, 14, 14) == (16, 13, (2 * 196 + 3) * 72 * 2)   # SAM windows: K, V, 3 zero rows
    assert cupy_gpu._win_config(64, 4096, 14, 14)[1] == 16
    assert cupy_gpu._win_config(80, 400, 8, 20)[0] == 32
    assert cupy_gpu._win_config(64, 4096, 64, 64) is None      # k_w > 32
    assert cupy_gpu._win_config(64, 289, 17, 16) is None       # 272 slots > 256
    monkeypatch.setenv("RELATTN_WIN_SPB", "4")
    assert cupy_gpu._win_config(64, 196, 14, 14)[1] == 4
    monkeypatch.setenv("RELATTN_WIN", "0")
    assert cupy_gpu._win_config(64, 196, 14, 14) is None


def test_fused_small_grid_choice(monkeypatch):
    for name in ("RELATTN_WIN", "RELATTN_WIN_SPB", "RELATTN_WIN_FUSE"):
        monkeypatch.delenv(name, raising=False)
    smem = (2 * 196 + 3) * 72 * 2 + 2 * 32 * 72 * 2 + 4 * 16 * 32 * 4 + 512
    assert cupy_gpu._win_fused_config(64, 196, 14, 14, 27, 27) == (13, smem)
    assert smem + 1024 <= 228 * 1024 // 3   # SAM windows: 3 blocks per SM (H100)
    assert cupy_gpu._win_fused_config(64, 256, 5, 11, 31, 31) is not None   # q grid 16 x 16
    assert cupy_gpu._win_fused_config(64, 289, 14, 14, 33, 27) is None      # q_h 17: table of 33 rows
    assert cupy_gpu._win_fused_config(64, 196, 14, 14, 27, 33) is None
    assert cupy_gpu._win_fused_config(64, 160, 8, 20, 39, 39) is None       # k_w > 16: 32-slot rows
    monkeypatch.setenv("RELATTN_WIN_FUSE", "0")
    assert cupy_gpu._win_fused_config(64, 196, 14, 14, 27, 27) is None


def test_smem_bytes_fit_the_device_limit():
    assert _sm90.smem_bytes(64, 1, 64, 1, 64, 64) == 64 * 64 * 2 + 4 * 64 * 64 * 2 + 1024
    assert _sm90.smem_bytes(64, 2, 128, 2, 14, 14, st=3) == (
        128 * 64 * 2 + 6 * 128 * 64 * 2 + 1024 + 128 * (28 | 1) * 4)
    assert _sm90.smem_bytes(64, 1, 64, 1, 64, 64) <= _sm90.MAX_SMEM


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("RELATTN_SM90", "0")
    assert _sm90.unavailable_reason() == "disabled by RELATTN_SM90=0"


def _nvcc_compile(tmp_path, source, extra, arch_flags):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    path = tmp_path / "check.cu"
    path.write_text(source + "\n" + extra)
    cmd = [nvcc, *arch_flags, "-std=c++17", "--use_fast_math", "-c", str(path), "-o", str(tmp_path / "check.o")]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:  # pragma: no cover - broken toolchain
        pytest.skip(f"nvcc did not run: {exc}")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "error" not in res.stderr.lower(), res.stderr[-4000:]


def _instantiate(names):
    """Force template instantiation by taking each kernel's address."""
    return "static void* const relattn_check_ptrs[] = {\n" + ",\n".join(
        f"    (void*)&{n}" for n in names) + "\n};\n"


def test_portable_kernels_compile(tmp_path):
    src = cupy_gpu._read_source()
    names = [
        "relattn_mma<1, 64, 1, 1>", "relattn_mma<0, 80, 2, 2>", "relattn_mma<1, 128, 1, 0>",
        "relattn_simt<float, 64, 2>", "relattn_simt<double, 80, 0>",
        "relattn_relterms<1, 64>", "relattn_relterms<2, 16>", "relattn_relterms<0, 32>",
        "relattn_relterms_mma<1, 64, 2>", "relattn_relterms_mma<0, 80, 0>", "relattn_relterms_mma<1, 112, 1>",
        "relattn_tf32<64, 3, 1, 0, 0>", "relattn_tf32<64, 3, 1, 1, 0>", "relattn_tf32<80, 1, 2, 0, 0>",
        "relattn_tf32<32, 3, 0, 1, 0>", "relattn_tf32<128, 3, 2, 0, 0>",
        "relattn_tf32<64, 3, 1, 0, 1>", "relattn_tf32<80, 3, 2, 0, 1>", "relattn_tf32<96, 3, 0, 0, 1>",
        "relattn_win<1, 64, 16, 0>", "relattn_win<0, 80, 32, 0>", "relattn_win<1, 128, 16, 0>",
        "relattn_win<1, 64, 16, 1>", "relattn_win<0, 80, 16, 1>", "relattn_win<1, 128, 16, 1>",
    ]
    for n in names:  # every name is one the backend can ask NVRTC for
        kind = n.split("<")[0]
        assert kind in src
    _nvcc_compile(tmp_path, src, _instantiate(names), ["-arch=sm_90"])


def test_hopper_kernel_compiles(tmp_path):
    names = [_sm90.kernel_name(1, 64, 1, 64, 1, 2), _sm90.kernel_name(0, 64, 1, 64, 0, 2),
             _sm90.kernel_name(1, 80, 2, 128, 2, 3), _sm90.kernel_name(1, 16, 3, 64, 2, 2),
             _sm90.kernel_name(1, 64, 1, 80, 3, 2), _sm90.kernel_name(0, 64, 1, 128, 3, 2),
             _sm90.kernel_name(1, 64, 1, 48, 3, 2),
             # the warp-specialised kernel: defaults, fused terms, no terms, other configurations
             _sm90.ws_kernel_name(1, 64, 3, 64, 1, 4, 1, 160), _sm90.ws_kernel_name(1, 64, 3, 64, 4, 4, 1, 160),
             _sm90.ws_kernel_name(0, 64, 3, 64, 0, 4, 1, 160), _sm90.ws_kernel_name(1, 80, 2, 128, 4, 3, 1, 240),
             _sm90.ws_kernel_name(1, 80, 2, 128, 1, 3, 1, 240), _sm90.ws_kernel_name(1, 64, 2, 64, 1, 2, 0, 0),
             # 16-slot key rows (small key grids): given and fused terms
             _sm90.ws_kernel_name(1, 64, 2, 64, 5, 4, 1, 240), _sm90.ws_kernel_name(0, 80, 2, 64, 6, 4, 1, 240),
             _sm90.ws_kernel_name(1, 64, 1, 64, 6, 3, 0, 0, 3), _sm90.ws_kernel_name(1, 80, 1, 32, 6, 3, 0, 0, 3),
             _sm90.ws_kernel_name(1, 80, 2, 128, 7, 3, 1, 240)]
    _nvcc_compile(tmp_path, _sm90.source(), _instantiate(names),
                  ["-gencode=arch=compute_90a,code=sm_90a"])


def test_tf32_shared_split_choice(monkeypatch):
    """When the 3xTF32 call takes relattn_tf32's SH variant (8 warps, one split
    per block): head_dim 48..96 with a grid that fills the device, or where
    the 64-row layout would need more than one wave; RELATTN_TF32_SH forces."""
    monkeypatch.setattr(_sm90, "_sm_count", lambda: 132)
    monkeypatch.setattr(cupy_gpu, "_smem_optin", lambda: 227 * 1024)   # H100
    monkeypatch.delenv("RELATTN_TF32_SH", raising=False)
    choose = cupy_gpu._tf32_shared_split
    assert choose(64, 12 * 32, 12 * 64)          # SAM-B global
    assert choose(80, 16 * 32, 16 * 64)          # SAM-H global
    assert choose(64, 300 * 2, 300 * 4)          # SAM-B windows
    assert not choose(32, 16 * 32, 16 * 64)      # head_dim 32: measured slower
    assert not choose(96, 64, 128)               # half the SMs idle; the 64-row grid fits one wave
    assert choose(96, 100, 196)                  # the 64-row grid needs 2 waves (1 block per SM)
    assert not choose(64, 64, 128)               # 2 blocks per SM of the 64-row layout: one wave
    assert choose(64, 100, 300)
    assert not choose(112, 10 ** 4, 2 * 10 ** 4)  # shared memory too small
    monkeypatch.setenv("RELATTN_TF32_SH", "1")
    assert choose(16, 1, 2) and choose(96, 1, 2) and not choose(112, 1, 2)
    monkeypatch.setenv("RELATTN_TF32_SH", "0")
    assert not choose(64, 12 * 32, 12 * 64)
    # a device with less shared memory per block (A100: 163 KB): never a layout that does not fit
    monkeypatch.setattr(cupy_gpu, "_smem_optin", lambda: 163 * 1024)
    monkeypatch.setenv("RELATTN_TF32_SH", "1")
    assert choose(64, 1, 2) and not choose(80, 1, 2) and not choose(96, 1, 2)
    monkeypatch.delenv("RELATTN_TF32_SH")
    assert choose(64, 12 * 32, 12 * 64) and not choose(80, 16 * 32, 16 * 64)
    # shared memory of either layout as the kernel lays it out
    assert cupy_gpu.tf32_smem_bytes(64, 0) == (64 * 72 + 2 * (64 * 72 + 64 * 68)) * 4
    assert cupy_gpu.tf32_smem_bytes(80, 1) == (128 * 88 + 64 * 88 + 64 * 84) * 4 + (64 * 44 + 32 * 82) * 16
    assert cupy_gpu.tf32_smem_bytes(96, 1) <= 227 * 1024 < cupy_gpu.tf32_smem_bytes(112, 1)



def test_rel_h_one_pass(monkeypatch):
    """relattn_ws rel 7 (rel_h of the fused terms in one pass of 72 table
    rows): where the tables take two passes (head_dim 80) and every 64-row
    warpgroup's rel_h rows lie in 72 rows from the kernel's base."""
    from relattn.backends import cupy_gpu

    monkeypatch.delenv("RELATTN_WS_H72", raising=False)
    sam_h = (2, 128, 4, 3, 1, 240, 1)
    assert cupy_gpu._rel_h_one_pass(80, sam_h, 64, 64, 64, 4096)                 # SAM-H: one query row per warpgroup
    assert cupy_gpu._rel_h_one_pass(80, sam_h, 64, 64, 32, 2048)                 # two query rows: 65 table rows
    assert cupy_gpu._rel_h_one_pass(80, sam_h, 9, 5, 64, 9 * 64)                 # q / k grids of different sizes
    assert not cupy_gpu._rel_h_one_pass(80, sam_h, 64, 64, 4, 256)               # 16 query rows: 78 table rows
    assert not cupy_gpu._rel_h_one_pass(64, (3, 64, 4, 4, 1, 160, 1), 64, 64, 64, 4096)   # one pass already
    monkeypatch.setenv("RELATTN_WS_H72", "0")
    assert not cupy_gpu._rel_h_one_pass(80, sam_h, 64, 64, 64, 4096)
