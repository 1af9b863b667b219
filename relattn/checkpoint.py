"""SAM-style checkpoints without PyTorch: load, inspect, adapt tables, save.

Files are read with ``safetensors``' numpy API or a bounded ``.npz`` reader that
only ever decodes ``.npy`` members of numeric dtypes; no pickle is ever loaded, so
PyTorch ``.pth`` files must be converted first (for example
``safetensors.torch.save_file(torch.load(path), "sam.safetensors")``).

``.npz`` layout
    A zip archive with one ``.npy`` member per key, named ``key + ".npy"``, as
    ``numpy.savez`` writes it, so ``numpy.load`` reads relattn's archives and
    relattn reads ``numpy.savez``'s. bfloat16 has no ``.npy`` type code (numpy
    would store it as untyped ``|V2``), so a bfloat16 array is stored as its raw
    bits (a little-endian ``uint16`` member) and listed in an extra member
    ``__relattn_dtypes__.json``, a JSON object mapping each such key to
    ``"bfloat16"``. The extra member is written only when there is a bfloat16
    array; ``numpy.load`` shows those keys as ``uint16`` bit patterns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import stat
import struct
import zipfile

import numpy as np

from relattn import _arrays  # registers bfloat16 with numpy (ml_dtypes) when present
from relattn.relpos import resize_rel_pos

__all__ = [
    "AttentionLayerInfo",
    "attention_layers",
    "load_checkpoint",
    "resize_checkpoint_tables",
    "save_checkpoint",
]

_SUFFIX_QKV = "qkv.weight"

#: Default ``max_bytes`` of :func:`load_checkpoint`: 64 GiB of declared data.
DEFAULT_MAX_BYTES = 64 * 2**30
#: Name of the ``.npz`` member that marks bfloat16 keys (see the module docstring).
NPZ_DTYPES_MEMBER = "__relattn_dtypes__.json"
# safetensors itself refuses headers above 100 MB; the same bound keeps a forged
# length field, or a forged dtype member, from allocating before it is parsed.
_MAX_HEADER_BYTES = 100_000_000
_READ_CHUNK = 16 * 2**20
# safetensors dtype codes relattn accepts, with their sizes in bytes.
_SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8,
    "F16": 2, "BF16": 2, "F32": 4, "F64": 8,
}
_INSTALL_SAFETENSORS = "needs the safetensors package (pip install relattn[io])"


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


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def load_checkpoint(path, *, max_bytes=DEFAULT_MAX_BYTES) -> dict:
    """Read a checkpoint into a dict of numpy arrays.

    Parameters
    ----------
    path : str or os.PathLike
        A regular ``.safetensors`` file (needs the ``safetensors`` package) or
        ``.npz`` archive; the suffix is matched case-insensitively. Pickled
        formats (``.pth``, ``.pt``, ``.ckpt``) are refused.
    max_bytes : int or None, optional
        Bound on the total data the file declares, checked from its headers
        before any array is read or decompressed: for ``.npz`` the sum of the
        members' uncompressed sizes in the zip directory (array bytes plus the
        small ``.npy`` headers), for ``.safetensors`` the sum of the tensors'
        byte sizes. Default 64 GiB (``DEFAULT_MAX_BYTES``); ``None`` for no
        bound. The ``.safetensors`` header itself may not exceed 100 MB.

    Returns
    -------
    dict[str, numpy.ndarray]
        Keys as stored (e.g. ``image_encoder.blocks.0.attn.qkv.weight``), any
        string included. Arrays have dtype float16, bfloat16 (ml_dtypes),
        float32, float64, bool or a signed/unsigned 8-64 bit integer.

    Raises
    ------
    OSError
        I/O failures: a missing or unreadable file, or a path that is not a
        regular file (``IsADirectoryError`` for a directory; a FIFO or device
        is refused without being read, so the call never blocks on it).
    ValueError
        Content problems, naming ``path`` (and the member or tensor at fault,
        where there is one): a corrupt file; a
        member that is not a ``.npy`` array; an object, string, bytes, void,
        complex or structured dtype (except the bfloat16 encoding described in
        the module docstring); a ``.npy`` header whose shape times item size
        differs from the member's size; declared data above ``max_bytes``.
    ImportError
        A ``.safetensors`` file without the ``safetensors`` package, or a
        bfloat16 array without ``ml_dtypes``.

    Examples
    --------
    >>> import numpy as np, os, tempfile, relattn
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny.npz")
    >>> relattn.save_checkpoint({"attn.rel_pos_h": np.zeros((27, 64), np.float32)}, path)
    >>> relattn.load_checkpoint(path)["attn.rel_pos_h"].shape
    (27, 64)
    """
    path = _fspath(path)
    max_bytes = _check_max_bytes(max_bytes)
    suffix = _suffix(path)
    if suffix not in (".safetensors", ".npz"):
        raise ValueError(f"path: expected a .safetensors or .npz file, got {path!r} "
                         "(pickled checkpoints are never loaded; convert them to safetensors first)")
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ImportError(f"path: reading .safetensors {_INSTALL_SAFETENSORS}") from None
    with _open_regular(path) as (f, size):
        if suffix == ".npz":
            return _read_npz(path, f, max_bytes)
        declared = _read_safetensors_header(path, f, size, max_bytes)
    return _load_safetensors(path, load_file, declared)


def _check_max_bytes(max_bytes):
    if max_bytes is None:
        return None
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)):
        raise TypeError(f"max_bytes: expected a non-negative int or None, got {type(max_bytes).__name__}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes: expected a non-negative int or None, got {max_bytes}")
    return int(max_bytes)


@contextlib.contextmanager
def _open_regular(path):
    """Open ``path`` for reading only if it is a regular file; yield ``(file, size)``."""
    # O_NONBLOCK: opening a FIFO for reading otherwise waits for a writer, forever.
    flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
             | getattr(os, "O_CLOEXEC", 0))
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"path: {path!r} is a directory, not a checkpoint file")
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"path: {path!r} is not a regular file (mode {stat.filemode(st.st_mode)}); "
                          "checkpoints are read from regular files only")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f, st.st_size


@contextlib.contextmanager
def _content_errors(where: str, what: str):
    """Re-raise a parser's complaint about the bytes as ``ValueError`` naming ``where``."""
    try:
        yield
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile, zlib and numpy raise many types
        raise ValueError(f"{where}: {what} ({type(exc).__name__}: {exc})") from None


def _allowed_dtype(dtype: np.dtype) -> bool:
    """Plain numeric dtypes only: no object, text, bytes, void, complex or records."""
    if dtype.fields is not None or dtype.subdtype is not None:
        return False
    if dtype.kind == "b":
        return dtype.itemsize == 1
    if dtype.kind in "iu":
        return dtype.itemsize in (1, 2, 4, 8)
    if dtype.kind == "f":
        return dtype.itemsize in (2, 4, 8)  # not longdouble: its layout is platform-specific
    return _arrays.BFLOAT16 is not None and dtype == _arrays.BFLOAT16


def _read_npz(path: str, f, max_bytes) -> dict:
    with _content_errors(f"path: {path!r}", "not a readable .npz archive"):
        archive = zipfile.ZipFile(f)
    with archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"path: {path!r} holds members named {dup} more than once")
        declared = sum(info.file_size for info in infos)
        if max_bytes is not None and declared > max_bytes:
            raise ValueError(f"path: {path!r} declares {declared} bytes of uncompressed members, "
                             f"more than max_bytes={max_bytes}")
        bf16_keys = set()
        if NPZ_DTYPES_MEMBER in names:
            bf16_keys = _read_dtypes_member(path, archive, archive.getinfo(NPZ_DTYPES_MEMBER), set(names))
        out = {}
        for info in infos:
            if info.filename == NPZ_DTYPES_MEMBER:
                continue
            if not info.filename.endswith(".npy") or info.is_dir():
                raise ValueError(f"path: {path!r} member {info.filename!r} is not a .npy array "
                                 "(a checkpoint archive holds only KEY.npy members)")
            key = info.filename[: -len(".npy")]
            out[key] = _read_npy_member(path, archive, info, max_bytes, bfloat16=key in bf16_keys)
    return out


def _read_dtypes_member(path: str, archive, info, names) -> set:
    where = f"path: {path!r} member {info.filename!r}"
    if info.file_size > _MAX_HEADER_BYTES:
        raise ValueError(f"{where}: declares {info.file_size} bytes, more than {_MAX_HEADER_BYTES}")
    with _content_errors(where, "not a JSON object of key -> dtype"):
        table = json.loads(archive.read(info).decode("utf-8"))
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a JSON object of key -> dtype, got {type(table).__name__}")
    for key, dtype in table.items():
        if dtype != "bfloat16":
            raise ValueError(f"{where}: key {key!r} has dtype {dtype!r}; only 'bfloat16' is defined")
        if key + ".npy" not in names:
            raise ValueError(f"{where}: lists key {key!r}, which the archive does not hold")
    if table and _arrays.BFLOAT16 is None:
        raise ImportError(f"path: {path!r} holds bfloat16 arrays, which need the ml_dtypes package "
                          "(pip install relattn[bf16])")
    return set(table)


def _read_npy_member(path: str, archive, info, max_bytes, bfloat16: bool) -> np.ndarray:
    """One ``.npy`` member, refused from its headers before its data is read."""
    where = f"path: {path!r} member {info.filename!r}"
    fmt = np.lib.format
    with _content_errors(where, "not a readable zip member"):
        member = archive.open(info)
    with member:
        with _content_errors(where, "not a readable .npy array"):
            version = fmt.read_magic(member)
            if version not in ((1, 0), (2, 0)):  # 3.0 exists only for structured dtypes
                raise ValueError(f"unsupported .npy format version {version}")
            reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran_order, dtype = reader(member)
            data_offset = member.tell()
        if not _allowed_dtype(dtype):
            raise ValueError(f"{where}: dtype {dtype.str} ({dtype}) is not a numeric array dtype; "
                             "accepted: float16/32/64, bfloat16, bool, (u)int8-64")
        if bfloat16 and not (dtype.kind == "u" and dtype.itemsize == 2):
            raise ValueError(f"{where}: is listed as bfloat16 but stores {dtype}, not uint16 bits")
        if any(n < 0 for n in shape):
            raise ValueError(f"{where}: the .npy header declares negative shape {shape}")
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if max_bytes is not None and nbytes > max_bytes:
            raise ValueError(f"{where}: the .npy header declares shape {shape} of {dtype} ({nbytes} bytes), "
                             f"more than max_bytes={max_bytes}")
        if data_offset + nbytes != info.file_size:
            raise ValueError(f"{where}: the .npy header declares shape {shape} of {dtype} ({nbytes} bytes) "
                             f"but the member holds {info.file_size - data_offset} bytes of data")
        array = np.empty(count, dtype)
        buffer = memoryview(array.view(np.uint8))
        with _content_errors(where, "truncated or corrupt data"):
            done = 0
            while done < nbytes:
                got = member.readinto(buffer[done: done + _READ_CHUNK])
                if not got:
                    raise ValueError(f"data ends after {done} of {nbytes} bytes")
                done += got
            if member.read(1):  # also makes zipfile verify the member's CRC
                raise ValueError("data continues past the declared shape")
    if fortran_order:
        array = array.reshape(shape[::-1]).transpose()
    else:
        array = array.reshape(shape)
    if bfloat16:
        array = array.astype(np.uint16, copy=False).view(_arrays.BFLOAT16)
    return array


def _read_safetensors_header(path: str, f, size: int, max_bytes) -> dict:
    """Check a ``.safetensors`` header: ``{name: (dtype code, shape)}`` of its tensors."""
    where = f"path: {path!r}"
    if size < 8:
        raise ValueError(f"{where}: not a .safetensors file ({size} bytes, shorter than its length field)")
    (length,) = struct.unpack("<Q", f.read(8))
    if length > min(_MAX_HEADER_BYTES, size - 8):
        raise ValueError(f"{where}: .safetensors header length {length} exceeds "
                         f"{'the file' if length > size - 8 else f'the {_MAX_HEADER_BYTES}-byte bound'}")
    raw = f.read(length)
    if len(raw) != length:
        raise ValueError(f"{where}: .safetensors header truncated ({len(raw)} of {length} bytes)")
    with _content_errors(where, "not a readable .safetensors header"):
        header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError(f"{where}: .safetensors header is a {type(header).__name__}, not a JSON object")
    data_size = size - 8 - length
    declared, total = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensor = f"{where} tensor {name!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{tensor}: expected a JSON object, got {type(entry).__name__}")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(code, str) or code not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{tensor}: dtype {code!r} is not a numeric array dtype; "
                             f"accepted: {', '.join(_SAFETENSORS_DTYPES)}")
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise ValueError(f"{tensor}: expected a list of non-negative ints as shape, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
            raise ValueError(f"{tensor}: expected [begin, end] data_offsets, got {offsets!r}")
        nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[code]
        if not 0 <= offsets[0] <= offsets[1] <= data_size or offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"{tensor}: shape {shape} of {code} ({nbytes} bytes) does not match "
                             f"data_offsets {offsets} within {data_size} bytes of data")
        total += nbytes
        declared[name] = (code, tuple(shape))
    if max_bytes is not None and total > max_bytes:
        raise ValueError(f"{where}: declares {total} bytes of tensors, more than max_bytes={max_bytes}")
    return declared


def _load_safetensors(path: str, load_file, declared: dict) -> dict:
    try:
        loaded = dict(load_file(path))
    except Exception as exc:  # noqa: BLE001 - the dependency's own error types
        if isinstance(exc, OSError):
            raise
        os.stat(path)  # the file vanished meanwhile: an I/O error, not bad content
        raise ValueError(f"path: {path!r} is not a readable .safetensors file "
                         f"({type(exc).__name__}: {exc})") from None
    # The file is read twice; what was loaded must be what was checked.
    if sorted(loaded) != sorted(declared):
        raise ValueError(f"path: {path!r} changed while being read (tensor names differ from its header)")
    for name, array in loaded.items():
        code, shape = declared[name]
        itemsize = _SAFETENSORS_DTYPES[code]
        if array.shape != shape or not _allowed_dtype(array.dtype) or array.dtype.itemsize != itemsize:
            raise ValueError(f"path: {path!r} tensor {name!r}: loaded as {array.dtype} {array.shape}, "
                             f"but the header declares {code} {list(shape)}")
    return loaded


def save_checkpoint(state_dict, path) -> None:
    """Write a dict of arrays as ``.safetensors`` or ``.npz`` (chosen by suffix).

    The write is atomic: the data goes to a temporary file in the target's
    directory, which is flushed, ``fsync``-ed and then renamed over ``path``
    (the directory is ``fsync``-ed too where the OS allows). If anything fails
    or interrupts the call, ``path`` keeps its old content and the temporary
    file is removed; a process killed mid-write also leaves ``path`` whole
    (only a ``.NAME.XXXXXXXX.tmp`` file may remain). A symlink at ``path`` is
    followed, as ``open(path, "w")`` would.

    Parameters
    ----------
    state_dict : Mapping[str, array-like]
        numpy or CuPy arrays, torch tensors, or anything ``numpy.asarray`` takes
        (float, bfloat16 or integer). Keys are stored exactly as given, e.g.
        ``"allow_pickle"``, ``"file"``, ``"a/b.c"`` or non-ASCII names; they
        must be encodable as UTF-8, and ``.npz`` keys may not contain NUL.
    path : str or os.PathLike
        Ends in ``.safetensors`` (needs the ``safetensors`` package) or ``.npz``,
        case-insensitively; the file is written at exactly this path. ``.npz``
        archives are uncompressed and laid out as the module docstring says
        (bfloat16 as ``uint16`` bits plus ``__relattn_dtypes__.json``); a
        ``.safetensors`` file is serialized in memory before it is written
        (one extra copy of the data).

    Returns
    -------
    None

    Notes
    -----
    A new file gets the permissions ``open(path, "w")`` would give it
    (``0o666`` less the umask); a file that is replaced keeps its permission
    bits, as it would when rewritten in place.

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
    suffix = _suffix(path)
    if suffix not in (".safetensors", ".npz"):
        raise ValueError(f"path: expected a .safetensors or .npz file, got {path!r}")
    for key in state_dict.keys():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"state_dict: key {key!r} is not encodable as UTF-8") from None
        if suffix == ".npz" and "\0" in key:
            raise ValueError(f"state_dict: key {key!r} contains NUL, which zip member names cannot hold")
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import save as serialize
        except ImportError:
            raise ImportError(f"path: writing .safetensors {_INSTALL_SAFETENSORS}") from None
    arrays = {key: np.ascontiguousarray(_host(value, key)) for key, value in state_dict.items()}
    if suffix == ".npz":
        _atomic_write(path, lambda f: _write_npz(f, arrays))
    else:
        # Serialized in memory: safetensors' save_file does its own rename, which
        # would leave this function syncing and renaming a file it no longer owns.
        _atomic_write(path, lambda f: f.write(serialize(arrays)))


def _write_npz(f, arrays: dict) -> None:
    bf16 = [key for key, array in arrays.items()
            if _arrays.BFLOAT16 is not None and array.dtype == _arrays.BFLOAT16]
    # Uncompressed and ZIP64 like numpy.savez, so numpy.load reads it unchanged.
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        if bf16:
            archive.writestr(NPZ_DTYPES_MEMBER, json.dumps({key: "bfloat16" for key in bf16}))
        for key, array in arrays.items():
            if key in bf16:
                array = array.view(np.uint16).astype("<u2", copy=False)
            with archive.open(key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def _chmod(fd: int, path: str, mode: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:
        os.chmod(path, mode)


def _atomic_write(path: str, write) -> None:
    """Run ``write(file)`` on a temporary file next to ``path``, then rename it over ``path``."""
    target = os.path.realpath(path)
    directory, base = os.path.split(target)
    try:
        old = os.stat(target)
    except FileNotFoundError:
        old = None
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise IsADirectoryError(f"path: {path!r} is a directory")
    if old is not None and not stat.S_ISREG(old.st_mode):
        raise OSError(f"path: {path!r} exists and is not a regular file")
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    # A new file is created with 0o666 so the kernel applies the umask (and any
    # default ACL) exactly as for open(path, "w"); a replacement stays private
    # until it gets the old file's bits, so it is never readable more widely.
    create_mode = 0o666 if old is None else 0o600
    for _ in range(100):
        tmp = os.path.join(directory, f".{base[:200]}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, flags, create_mode)
            break
        except FileExistsError:
            continue
        except OSError as exc:  # name the path the caller gave, not the temporary one
            raise type(exc)(exc.errno, f"path: {exc.strerror}", path) from None
    else:
        raise FileExistsError(f"path: no free temporary name next to {path!r}")
    try:
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                write(f)
            if old is not None:
                _chmod(fd, tmp, stat.S_IMODE(old.st_mode))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable; not every OS or filesystem can open or sync a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
