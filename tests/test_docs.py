"""Docs stay true: the API reference matches the docstrings, every public name is documented."""

import importlib.util
import inspect
import os

import pytest

import relattn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_api_reference_is_current():
    # api.md documents the PyTorch and JAX bridges, whose modules import those packages
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    spec = importlib.util.spec_from_file_location("gen_api", os.path.join(ROOT, "docs", "gen_api.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    with open(os.path.join(ROOT, "docs", "api.md")) as fh:
        assert fh.read() == gen.render(), "docs/api.md is stale: run python docs/gen_api.py"


def test_every_public_function_has_a_numpydoc_docstring_with_an_example():
    for name in relattn.__all__:
        obj = getattr(relattn, name)
        if inspect.ismodule(obj) or (inspect.isclass(obj) and issubclass(obj, Exception)):
            continue
        doc = inspect.getdoc(obj) or ""
        assert "Examples" in doc or name == "AttentionLayerInfo", f"{name} has no example"
        if inspect.isfunction(obj):
            assert "Returns" in doc, f"{name} does not document its result"


def _guide_blocks():
    import re

    with open(os.path.join(ROOT, "docs", "guide.md")) as fh:
        text = fh.read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [b for b in blocks if "# needs:" not in b.splitlines()[0]]


def test_user_guide_examples_run(capsys):
    blocks = _guide_blocks()
    assert len(blocks) >= 6
    for block in blocks:
        needs = [m for m in ("torch", "dask") if f"import {m}" in block]
        if any(importlib.util.find_spec(m) is None for m in needs):
            continue
        exec(compile(block, "docs/guide.md", "exec"), {"__name__": "guide"})


# --- README.md ----------------------------------------------------------------------------


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as fh:
        return fh.read()


def _fenced(text, lang):
    import re

    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _block_needs(block):
    """What a ``# needs: a, b`` first line names (empty when there is none)."""
    first = block.splitlines()[0] if block.strip() else ""
    if not first.startswith("# needs:"):
        return []
    return [n.strip() for n in first[len("# needs:"):].split(",") if n.strip()]


def _missing(need):
    if need == "cupy":  # the package and a usable CUDA device
        return "cupy" not in relattn.backends.available()
    try:
        return importlib.util.find_spec(need) is None
    except (ImportError, ValueError):  # not a module name (a service such as "cluster")
        return True


_README_BLOCKS = _fenced(_read("README.md"), "python")


def test_readme_has_a_runnable_quickstart():
    assert any(not _block_needs(b) for b in _README_BLOCKS), "README.md has no python block that always runs"


@pytest.mark.parametrize("index", range(len(_README_BLOCKS)))
def test_readme_examples_run(index, tmp_path, monkeypatch, capsys):
    """Every python block of README.md runs as written, each in a fresh namespace (a new user
    copies one block, not the state the one before left); ``# needs: X`` blocks skip without X."""
    import tempfile

    block = _README_BLOCKS[index]
    missing = [n for n in _block_needs(block) if _missing(n)]
    if missing:
        pytest.skip(f"README block {index} needs {', '.join(missing)}")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the example's files go to tmp_path
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"README.md (python block {index})", "exec"), {"__name__": "readme"})


def _extras():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return set(tomllib.load(fh)["project"]["optional-dependencies"])


def test_readme_names_every_extra():
    """Each extra of pyproject.toml has its row in README.md's table of extras, and no row
    names an extra that does not exist."""
    import re

    lines = _read("README.md").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| extra |")), None)
    assert start is not None, "README.md has no table of extras (a header row '| extra | ...')"
    table = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        table.append(line)
    rows = {m.group(1) for m in (re.match(r"\| `([\w-]+)` \|", line) for line in table) if m}
    extras = _extras()
    assert extras - rows == set(), f"extras missing from README.md's table of extras: {sorted(extras - rows)}"
    assert rows - extras == set(), f"README.md lists extras pyproject.toml lacks: {sorted(rows - extras)}"


def test_readme_keeps_the_two_commands():
    commands = [line.strip() for b in _fenced(_read("README.md"), "bash") for line in b.splitlines()]
    assert "pip install -e . && python -m relattn" in commands
    assert 'pip install -e ".[test]" && python -m pytest -q' in commands


def test_license_is_the_apache_license_pyproject_names():
    text = _read("LICENSE")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "Copyright 2026 the relattn authors" in text and "[yyyy]" not in text
    assert "Apache-2.0" in _read("pyproject.toml")
