"""Doctest collection: skip scripts and modules whose optional dependency is not installed."""

import importlib.util

# make_golden.py is the PyTorch generator of the golden files, a script, not a test
collect_ignore = ["relattn/__main__.py", "tests/golden/make_golden.py"]
for module, needs in (("relattn/dask.py", "dask"), ("relattn/array_api.py", "array_api_compat"),
                      ("relattn/torch.py", "torch"), ("relattn/jax.py", "jax")):
    if importlib.util.find_spec(needs) is None:
        collect_ignore.append(module)
