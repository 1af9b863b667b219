"""Doctest collection: skip modules whose optional dependency is not installed."""

import importlib.util

collect_ignore = ["relattn/__main__.py"]
for module, needs in (("relattn/dask.py", "dask"), ("relattn/array_api.py", "array_api_compat")):
    if importlib.util.find_spec(needs) is None:
        collect_ignore.append(module)
