"""Array-type plumbing and argument checks shared by the public functions.

Nothing here knows about attention: it answers "which array library is this",
"what dtype do we compute in" and "is this argument what we asked for", with
error messages that name the argument, the expectation and what was given.
"""

from __future__ import annotations

import collections.abc
import functools
import math
import numbers
import os

import numpy as np

try:  # bfloat16 on numpy is an optional extra
    import ml_dtypes as _ml_dtypes

    BFLOAT16 = np.dtype(_ml_dtypes.bfloat16)
except Exception:  # pragma: no cover - depends on the environment
    BFLOAT16 = None

FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def array_module(x):
    """Return the array library (``numpy`` or ``cupy``) that owns ``x``."""
    mod = type(x).__module__
    if mod.startswith("cupy"):
        import cupy

        return cupy
    return np


def is_array(x) -> bool:
    return isinstance(x, np.ndarray) or type(x).__module__.startswith("cupy")


def as_array(name: str, x):
    """``x`` as a numpy or CuPy array, converting array-likes and DLPack objects.

    numpy and CuPy arrays pass through untouched (never copied). Other objects
    exposing ``__dlpack__`` go to numpy (CPU) or CuPy (CUDA) without a copy when
    the producer allows it; plain sequences go through ``numpy.asarray``.
    """
    if is_array(x):
        return x
    if x is None:
        raise TypeError(f"{name}: expected an array, got None")
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        from relattn._interop import from_dlpack

        return from_dlpack(name, x)
    try:
        arr = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - re-raised with the argument name
        raise TypeError(
            f"{name}: expected an array (numpy, CuPy or a DLPack tensor), "
            f"got {type(x).__name__} ({exc})"
        ) from None
    if arr.dtype == object:
        raise TypeError(f"{name}: expected a numeric array, got an object array")
    return arr


def dtype_name(dtype) -> str:
    try:
        return _dtype_name_cached(dtype)
    except TypeError:  # unhashable dtype-likes
        return _dtype_name_cached.__wrapped__(dtype)


@functools.lru_cache(maxsize=64)
def _dtype_name_cached(dtype) -> str:
    dt = np.dtype(dtype)
    if BFLOAT16 is not None and dt == BFLOAT16:
        return "bfloat16"
    return dt.name


def is_float_dtype(dtype) -> bool:
    try:
        return dtype_name(dtype) in FLOAT_DTYPE_NAMES
    except TypeError:
        return False


def resolve_dtype(name: str, dtype) -> np.dtype:
    """Turn a user's dtype spec (``"float32"``, ``np.float16``, ...) into a dtype."""
    if dtype is None:
        raise TypeError(f"{name}: expected one of {FLOAT_DTYPE_NAMES}, got None")
    if isinstance(dtype, str) and dtype == "bfloat16":
        if BFLOAT16 is None:
            raise TypeError(f"{name}: bfloat16 needs the ml_dtypes package (pip install relattn[bf16])")
        return BFLOAT16
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name}: expected one of {FLOAT_DTYPE_NAMES}, got {dtype!r}") from None
    if not is_float_dtype(dt):
        raise TypeError(f"{name}: expected one of {FLOAT_DTYPE_NAMES}, got {dtype_name(dt)}")
    return dt


def compute_dtype(*dtypes) -> np.dtype:
    """float64 when any input is float64, float32 otherwise (halves compute in float32)."""
    for dt in dtypes:
        if dt is not None and np.dtype(dt) == np.float64:
            return np.dtype(np.float64)
    return np.dtype(np.float32)


def check_float_array(name: str, x, ndim=None, min_ndim=None):
    """Convert ``x`` to an array and check it is floating point with the given rank."""
    x = as_array(name, x)
    if not is_float_dtype(x.dtype):
        raise TypeError(
            f"{name}: expected a floating dtype ({', '.join(FLOAT_DTYPE_NAMES)}), "
            f"got {dtype_name(x.dtype)}"
        )
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {tuple(x.shape)} ({x.ndim}-D)")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(
            f"{name}: expected at least {min_ndim} dimensions, got shape {tuple(x.shape)} ({x.ndim}-D)"
        )
    return x


def check_positive_int(name: str, value) -> int:
    """``value`` as a positive ``int``: an integer, or a real number with an integral value,
    no larger than the longest possible array axis."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a positive integer, got bool {value!r}")
    if not isinstance(value, numbers.Integral):
        if not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: expected a positive integer, got {type(value).__name__} {describe(value)}")
        try:  # int() refuses nan (ValueError) and +-inf (OverflowError)
            integral = value == int(value)
        except (OverflowError, ValueError, TypeError):
            integral = False
        if not integral:
            raise ValueError(f"{name}: expected a positive integer, got {describe(value)}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {describe(value)}")
    if value > _MAX_INDEX:  # no array axis can be longer
        raise ValueError(f"{name}: expected a positive integer up to 2**63 - 1, got {describe(value)}")
    return value


def check_size2(name: str, value) -> tuple[int, int]:
    """Check a ``(rows, cols)`` grid size: an ordered pair (tuple, list, 1-D array).

    Sets, mappings, strings and one-shot iterables (generators, iterators) are
    refused with ``TypeError``: they have no meaningful or repeatable order.
    """
    expected = "expected a pair of positive integers (h, w) as a tuple, list or 1-D array"
    if not _is_ordered_pair_container(value):
        raise TypeError(f"{name}: {expected}, got {type(value).__name__} {describe(value)}")
    try:
        items = tuple(value)
    except TypeError:  # e.g. a 0-d array
        raise TypeError(f"{name}: {expected}, got {type(value).__name__} {describe(value)}") from None
    if len(items) != 2:
        raise ValueError(f"{name}: {expected}, got {describe(value)} ({len(items)} entries)")
    return (check_positive_int(f"{name}[0]", items[0]), check_positive_int(f"{name}[1]", items[1]))


def _physical_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        return 2**40


# No single array relattn allocates because of a size argument may exceed this:
# the machine's physical memory (an allocation that large can never be useful,
# and with overcommit it would be killed later rather than refused now).
MAX_ALLOC_BYTES = _physical_memory_bytes()


def check_alloc(name: str, shape, itemsize: int, what: str = "an array") -> None:
    """Raise ValueError (naming ``name``) if an array of ``shape`` would exceed ``MAX_ALLOC_BYTES``."""
    nbytes = alloc_bytes(shape, itemsize)
    if nbytes > MAX_ALLOC_BYTES:
        shape_text = "(" + ", ".join(describe(int(n)) for n in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(
            f"{name}: too large, {what} of shape {shape_text} would need "
            f"{_format_bytes(nbytes)} (limit {MAX_ALLOC_BYTES / 2**30:.3g} GiB, the physical memory)"
        )


def same_array_type(arrays: dict) -> None:
    """Raise if numpy and CuPy arrays are mixed in one call."""
    kinds = {n: array_module(a).__name__ for n, a in arrays.items() if a is not None}
    if len(set(kinds.values())) > 1:
        detail = ", ".join(f"{n}={k}" for n, k in kinds.items())
        raise TypeError(f"arrays must all be numpy or all be CuPy, got {detail}")


def to_module(x, xp):
    """Move ``x`` to the array library ``xp`` (host <-> device copy when they differ)."""
    if x is None or array_module(x) is xp:
        return x
    if xp is np:
        return x.get()
    return xp.asarray(x)


def astype(x, dtype):
    """``x.astype(dtype, copy=False)``, also for bfloat16 CuPy arrays (via their bits)."""
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    if array_module(x) is not np and "bfloat16" in (dtype_name(x.dtype), dtype_name(dtype)):
        from relattn.backends.gpu.cublas import from_float32, to_float32

        return from_float32(to_float32(x), dtype) if dtype != np.float32 else to_float32(x)
    return x.astype(dtype, copy=False)


def describe(value, limit: int = 60) -> str:
    """A short ``repr`` of ``value`` for an error message (never raises).

    Huge integers are described by their number of digits (their decimal
    ``repr`` can be too long to print, or refused by Python); long reprs are cut.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        as_int = int(value)
        if as_int.bit_length() > 3 * limit:  # > ~0.9 * limit decimal digits
            digits = int(as_int.bit_length() * math.log10(2)) + 1
            return f"{'-' if as_int < 0 else ''}<an integer of about {digits} digits>"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_ordered_pair_container(value) -> bool:
    """Whether ``value`` can hold an ordered ``(h, w)``: a sequence or array, not a
    set, mapping, string or one-shot iterator."""
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return False
    if isinstance(value, (collections.abc.Set, collections.abc.Mapping)):
        return False
    if isinstance(value, (collections.abc.Sequence, np.ndarray)):
        return True
    kind = type(value)  # other array types (CuPy, torch): indexable with a length
    return hasattr(kind, "__len__") and hasattr(kind, "__getitem__") and not hasattr(kind, "keys")


def alloc_bytes(shape, itemsize: int) -> int:
    """Bytes of an array of ``shape`` (empty dimensions counted as 1, an upper bound)."""
    nbytes = int(itemsize)
    for n in shape:
        nbytes *= max(int(n), 1)
    return nbytes


def _format_bytes(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB" if nbytes < 2**1000 else "more than 2**1000 bytes"


def check_alloc_total(name: str, arrays, what: str) -> None:
    """Raise ValueError (naming ``name``) if the arrays ``[(shape, itemsize), ...]``
    together would exceed ``MAX_ALLOC_BYTES``; ``what`` says what they are."""
    nbytes = sum(alloc_bytes(shape, itemsize) for shape, itemsize in arrays)
    if nbytes > MAX_ALLOC_BYTES:
        raise ValueError(
            f"{name}: too large, {what} would need {_format_bytes(nbytes)} in all "
            f"(limit {MAX_ALLOC_BYTES / 2**30:.3g} GiB, the physical memory)"
        )


_MAX_INDEX = int(np.iinfo(np.intp).max)
