"""Write docs/api.md from the docstrings of relattn's public API.

Run ``python docs/gen_api.py``; ``tests/test_docs.py`` fails when api.md is stale.
"""

import inspect
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import relattn  # noqa: E402
import relattn.array_api  # noqa: E402
import relattn.dask  # noqa: E402

SECTIONS = [
    ("Attention core", ["rel_pos_attention", "explain", "BackendError"]),
    ("Relative-position tables", ["decomposed_rel_pos", "get_rel_pos", "resize_rel_pos"]),
    ("Windows", ["window_partition", "window_unpartition"]),
    ("The layer", ["Attention"]),
    ("Checkpoints", ["load_checkpoint", "save_checkpoint", "attention_layers", "AttentionLayerInfo",
                     "resize_checkpoint_tables"]),
    ("GPU float32 precision", ["get_gpu_float32_mode", "set_gpu_float32_mode", "gpu_float32_mode"]),
]
EXTRA = [
    ("relattn.array_api", relattn.array_api, ["rel_pos_attention"]),
    ("relattn.dask", relattn.dask, ["rel_pos_attention", "attention"]),
    ("relattn.backends", relattn.backends, ["names", "available", "get"]),
    ("relattn.torch", relattn.torch, ["rel_pos_attention"]),
    ("relattn.jax", relattn.jax, ["rel_pos_attention"]),
]
METHODS = ["forward", "vjp", "load_state_dict", "state_dict", "from_state_dict"]


def _entry(qualname, obj, level="###"):
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        sig = ""
    doc = inspect.getdoc(obj) or "(undocumented)"
    return f"{level} `{qualname}{sig}`\n\n```text\n{doc}\n```\n"


def render() -> str:
    parts = ["# API reference\n",
             "Generated from the docstrings by `docs/gen_api.py`; do not edit by hand.\n"]
    for title, names in SECTIONS:
        parts.append(f"## {title}\n")
        for name in names:
            obj = getattr(relattn, name)
            parts.append(_entry(f"relattn.{name}", obj))
            if name == "Attention":
                for meth in METHODS:
                    parts.append(_entry(f"Attention.{meth}", getattr(obj, meth), level="####"))
    for modname, module, names in EXTRA:
        parts.append(f"## `{modname}`\n")
        parts.append((inspect.getdoc(module) or "") + "\n")
        for name in names:
            parts.append(_entry(f"{modname}.{name}", getattr(module, name)))
    return "\n".join(parts)


if __name__ == "__main__":
    with open(os.path.join(HERE, "api.md"), "w") as fh:
        fh.write(render())
    print("wrote docs/api.md")
