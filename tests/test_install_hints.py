"""Every optional package relattn needs is named, with its extra, when it is missing:
"<what> needs the <package> package (pip install relattn[<extra>])".

Each test blocks the package (``sys.modules[name] = None``, which makes ``import name``
raise ImportError) in this process, or in a subprocess where relattn probes the package
at import time, and reads the error.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import relattn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block(monkeypatch, name):
    """Make ``import name`` (and of its submodules) fail for the rest of the test."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        monkeypatch.setitem(sys.modules, key, None)
    monkeypatch.setitem(sys.modules, name, None)


def _hint(package, extra):
    return f"the {package} package (pip install relattn[{extra}]"


class _CudaTensor:
    """A DLPack producer on a CUDA device, as a torch or JAX GPU tensor is."""

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None):  # pragma: no cover - never reached without cupy
        raise AssertionError("not consumed")


def test_cupy_for_a_cuda_tensor(monkeypatch):
    _block(monkeypatch, "cupy")
    x = _CudaTensor()
    with pytest.raises(TypeError) as info:
        relattn.rel_pos_attention(x, x, x)
    message = str(info.value)
    assert message.startswith("q: a CUDA tensor needs ") and _hint("cupy", "gpu") in message
    assert "relattn[gpu-cuda12]" in message


def test_ml_dtypes_for_bfloat16(tmp_path):
    """ml_dtypes is probed when relattn is imported, so this runs in a fresh interpreter."""
    pytest.importorskip("ml_dtypes")
    path = tmp_path / "bf16.npz"
    relattn.save_checkpoint({"w": np.ones(3, relattn._arrays.BFLOAT16)}, path)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["ml_dtypes"] = None
        import relattn

        assert relattn._arrays.BFLOAT16 is None
        for call in (lambda: relattn.Attention(8, 2, dtype="bfloat16"),
                     lambda: relattn.load_checkpoint({str(path)!r})):
            try:
                call()
            except (TypeError, ImportError) as exc:
                print(type(exc).__name__, exc)
            else:
                print("no error")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 2, run.stdout
    assert lines[0].startswith("TypeError dtype: bfloat16 needs ") and _hint("ml_dtypes", "bf16") in lines[0]
    assert lines[1].startswith("ImportError path: ") and _hint("ml_dtypes", "bf16") in lines[1]


def test_ml_dtypes_for_a_torch_bfloat16_tensor(monkeypatch):
    torch = pytest.importorskip("torch")
    x = torch.ones((1, 1, 4, 8), dtype=torch.bfloat16)
    monkeypatch.setattr(relattn._arrays, "BFLOAT16", None)  # what a blocked ml_dtypes leaves at import
    with pytest.raises(TypeError) as info:
        relattn.rel_pos_attention(x, x, x)
    message = str(info.value)
    assert message.startswith("q: a bfloat16 tensor needs ") and _hint("ml_dtypes", "bf16") in message


def test_dask(monkeypatch):
    import relattn.dask

    _block(monkeypatch, "dask")
    q = np.ones((1, 1, 4, 8), np.float32)
    layer = relattn.Attention(8, 2, rng=0)
    for call in (lambda: relattn.dask.rel_pos_attention(q, q, q), lambda: relattn.dask.attention(layer, q)):
        with pytest.raises(ImportError) as info:
            call()
        assert str(info.value) == f"relattn.dask needs {_hint('dask', 'dask')})"


def test_safetensors(tmp_path, monkeypatch):
    _block(monkeypatch, "safetensors")
    path = tmp_path / "x.safetensors"
    for call in (lambda: relattn.save_checkpoint({"w": np.ones(3, np.float32)}, path),
                 lambda: relattn.load_checkpoint(path)):
        with pytest.raises(ImportError) as info:
            call()
        assert f"needs {_hint('safetensors', 'io')})" in str(info.value)
        path.write_bytes(b"")  # for the load


def test_matplotlib_for_bench_plots(tmp_path, monkeypatch, capsys):
    from relattn import cli

    _block(monkeypatch, "matplotlib")
    assert cli.main(["bench", "--no-torch", "--plot", str(tmp_path / "bench.png")]) == 2
    assert "pip install relattn[plot]" in capsys.readouterr().err


def test_hypothesis_for_relattn_testing(monkeypatch):
    import relattn.testing

    _block(monkeypatch, "hypothesis")
    with pytest.raises(ImportError) as info:
        relattn.testing.problems()
    assert _hint("hypothesis", "testing") in str(info.value)


def test_cupy_for_a_plan_of_cupy_shapes(monkeypatch):
    _block(monkeypatch, "cupy")
    with pytest.raises(ImportError) as info:
        relattn.plan((1, 1, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8), array_type="cupy")
    assert _hint("cupy", "gpu") in str(info.value)
