"""SAM-style checkpoints without PyTorch: load, inspect, adapt tables, save.

Files are read with ``safetensors``' numpy API or ``numpy.load(allow_pickle=False)``;
no pickle is ever loaded, so PyTorch ``.pth`` files must be converted first (for
example ``safetensors.torch.save_file(torch.load(path), "sam.safetensors")``).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from relattn import _arrays  # noqa: F401 - registers bfloat16 with numpy (ml_dtypes) when present
from relattn.relpos import resize_rel_pos

__all__ = [
    "AttentionLayerInfo",
    "attention_layers",
    "load_checkpoint",
    "resize_checkpoint_tables",
    "save_checkpoint",
]

_SUFFIX_QKV = "qkv.weight"


def _check_mapping(name: str, mapping) -> None:
    """``mapping`` must be a mapping with string keys."""
    if not (hasattr(mapping, "keys") and hasattr(mapping, "items")):
        raise TypeError(f"{name}: expected a mapping of names to arrays, got {type(mapping).__name__}")
    for key in mapping.keys():
        if not isinstance(key, str):
            raise TypeError(f"{name}: expected string keys, got {type(key).__name__} {key!r}")


def _shape(key: str, value, ndim: int) -> tuple:
    """The shape of a checkpoint entry that must be an ``ndim``-D array."""
    try:
        shape = tuple(int(n) for n in np.shape(value))
    except Exception as exc:  # noqa: BLE001 - re-raised naming the key
        raise TypeError(f"{key}: expected an array, got {type(value).__name__} ({exc})") from None
    if len(shape) != ndim:
        raise ValueError(f"{key}: expected a {ndim}-D array, got shape {shape} ({len(shape)}-D)")
    return shape


def load_checkpoint(path) -> dict:
    """Read a checkpoint into a dict of numpy arrays.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.safetensors`` file (needs the ``safetensors`` package) or a ``.npz``
        archive. Pickled formats (``.pth``, ``.pt``, ``.ckpt``) are refused.

    Returns
    -------
    dict[str, numpy.ndarray]
        Keys as stored (e.g. ``image_encoder.blocks.0.attn.qkv.weight``).
        bfloat16 tensors load as ml_dtypes bfloat16 arrays.

    Examples
    --------
    >>> import numpy as np, os, tempfile, relattn
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny.npz")
    >>> relattn.save_checkpoint({"attn.rel_pos_h": np.zeros((27, 64), np.float32)}, path)
    >>> relattn.load_checkpoint(path)["attn.rel_pos_h"].shape
    (27, 64)
    """
    path = _fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ImportError("path: reading .safetensors needs the safetensors package "
                              "(pip install relattn[io])") from None
        try:
            return dict(load_file(path))
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt file: name it
            raise ValueError(f"path: {path!r} is not a readable .safetensors file "
                             f"({type(exc).__name__}: {exc})") from None
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt file or pickled data: name it
            raise ValueError(f"path: {path!r} is not a readable .npz archive of numeric arrays "
                             f"({type(exc).__name__}: {exc})") from None
    raise ValueError(f"path: expected a .safetensors or .npz file, got {path!r} "
                     "(pickled checkpoints are never loaded; convert them to safetensors first)")


def save_checkpoint(state_dict, path) -> None:
    """Write a dict of arrays as ``.safetensors`` or ``.npz`` (chosen by suffix).

    Parameters
    ----------
    state_dict : Mapping[str, array-like]
        numpy or CuPy arrays, torch tensors, or anything ``numpy.asarray`` takes.
    path : str or os.PathLike

    Returns
    -------
    None

    Examples
    --------
    >>> import os, tempfile, relattn
    >>> layer = relattn.Attention(32, 4, use_rel_pos=True, input_size=(14, 14), rng=0)
    >>> path = os.path.join(tempfile.mkdtemp(), "layer.npz")
    >>> relattn.save_checkpoint(layer.state_dict(), path)
    >>> sorted(relattn.load_checkpoint(path))[:2]
    ['proj.bias', 'proj.weight']
    """
    path = _fspath(path)
    _check_mapping("state_dict", state_dict)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".safetensors", ".npz"):
        raise ValueError(f"path: expected a .safetensors or .npz file, got {path!r}")
    arrays = {key: np.ascontiguousarray(_host(value, key)) for key, value in state_dict.items()}
    if suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, path)
    elif suffix == ".npz":
        np.savez(path, **arrays)
    else:
        raise ValueError(f"path: expected a .safetensors or .npz file, got {path!r}")


def _host(value, key="state_dict value"):
    from relattn.module import _host_array

    return _host_array(key, value)


def _fspath(path) -> str:
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}") from None
    if not isinstance(path, str):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    return path


@dataclasses.dataclass(frozen=True)
class AttentionLayerInfo:
    """One attention layer found in a checkpoint.

    ``input_size`` is read from the table shapes (``(rows + 1) / 2``); a layer
    whose tables are smaller than the largest in the checkpoint is windowed
    (SAM: 14x14 windows, 27-row tables) and the largest are global (64x64).
    """

    prefix: str
    dim: int
    num_heads: int | None
    head_dim: int | None
    qkv_bias: bool
    use_rel_pos: bool
    input_size: tuple | None
    windowed: bool | None


def attention_layers(state_dict) -> list:
    """List the SAM-style attention layers of a checkpoint.

    A layer is any prefix ``P`` with ``P + "qkv.weight"`` and ``P + "proj.weight"``.

    Parameters
    ----------
    state_dict : Mapping[str, array]

    Returns
    -------
    list[AttentionLayerInfo]
        In key order. ``num_heads``/``head_dim`` come from the tables'
        width and are ``None`` for layers without relative position.

    Examples
    --------
    >>> import relattn
    >>> layer = relattn.Attention(64, 4, use_rel_pos=True, input_size=(14, 14))
    >>> sd = {"blocks.0.attn." + k: v for k, v in layer.state_dict().items()}
    >>> info = relattn.attention_layers(sd)[0]
    >>> info.prefix, info.num_heads, info.input_size
    ('blocks.0.attn.', 4, (14, 14))
    """
    _check_mapping("state_dict", state_dict)
    prefixes = [k[: -len(_SUFFIX_QKV)] for k in state_dict if k.endswith(_SUFFIX_QKV)]
    prefixes = [p for p in prefixes if p + "proj.weight" in state_dict]
    found = []
    for prefix in prefixes:
        dim = _shape(prefix + "proj.weight", state_dict[prefix + "proj.weight"], 2)[0]
        if dim < 1:
            raise ValueError(f"{prefix}proj.weight: expected at least one output channel, got dim {dim}")
        table_h, table_w = state_dict.get(prefix + "rel_pos_h"), state_dict.get(prefix + "rel_pos_w")
        use_rel_pos = table_h is not None and table_w is not None
        head_dim = input_size = None
        if use_rel_pos:
            shape_h = _shape(prefix + "rel_pos_h", table_h, 2)
            shape_w = _shape(prefix + "rel_pos_w", table_w, 2)
            head_dim = shape_h[1]
            if head_dim < 1 or shape_w[1] != head_dim or dim % head_dim:
                raise ValueError(
                    f"{prefix}rel_pos_h, {prefix}rel_pos_w: expected tables of one width head_dim >= 1 dividing dim={dim}, "
                    f"got rel_pos_h {shape_h} and rel_pos_w {shape_w}"
                )
            if shape_h[0] < 1 or shape_w[0] < 1:
                raise ValueError(f"{prefix}rel_pos_h: expected tables with rows, got {shape_h} and {shape_w}")
            input_size = ((shape_h[0] + 1) // 2, (shape_w[0] + 1) // 2)
        found.append(dict(prefix=prefix, dim=dim, head_dim=head_dim,
                          num_heads=dim // head_dim if head_dim else None,
                          qkv_bias=prefix + "qkv.bias" in state_dict, use_rel_pos=use_rel_pos,
                          input_size=input_size))
    sizes = [f["input_size"][0] * f["input_size"][1] for f in found if f["input_size"]]
    largest = max(sizes) if sizes else None
    return [
        AttentionLayerInfo(
            **f,
            windowed=None if not f["input_size"] or len(set(sizes)) == 1
            else f["input_size"][0] * f["input_size"][1] < largest,
        )
        for f in found
    ]


def resize_checkpoint_tables(state_dict, from_size, to_size) -> dict:
    """Adapt relative-position tables to a new token grid.

    Every ``rel_pos_h`` table with ``2 * from_size[0] - 1`` rows is resized to
    ``2 * to_size[0] - 1`` rows with :func:`relattn.resize_rel_pos` (PyTorch-exact),
    likewise ``rel_pos_w`` with the second entries; other tables (e.g. windowed
    layers) and all other keys are kept. SAM's global layers at 1280 px:
    ``from_size=(64, 64), to_size=(80, 80)``.

    Parameters
    ----------
    state_dict : Mapping[str, array]
    from_size, to_size : (int, int)

    Returns
    -------
    dict
        A new dict; the input is not modified.

    Examples
    --------
    >>> import numpy as np, relattn
    >>> sd = {"a.rel_pos_h": np.ones((127, 64), np.float32), "b.rel_pos_h": np.ones((27, 64), np.float32)}
    >>> out = relattn.resize_checkpoint_tables(sd, (64, 64), (80, 80))
    >>> out["a.rel_pos_h"].shape, out["b.rel_pos_h"].shape
    ((159, 64), (27, 64))
    """
    from relattn._arrays import check_size2

    _check_mapping("state_dict", state_dict)
    from_size = check_size2("from_size", from_size)
    to_size = check_size2("to_size", to_size)
    out = dict(state_dict)
    for key, value in state_dict.items():
        for axis, suffix in enumerate(("rel_pos_h", "rel_pos_w")):
            if key.endswith(suffix) and _shape(key, value, 2)[0] == 2 * from_size[axis] - 1:
                table = _host(value, key)
                try:
                    out[key] = resize_rel_pos(table, 2 * to_size[axis] - 1)
                except (TypeError, ValueError) as exc:  # name the key and the argument
                    arg = "to_size" if str(exc).startswith("length") else key
                    raise type(exc)(f"{arg}: {exc}") from None
    return out
