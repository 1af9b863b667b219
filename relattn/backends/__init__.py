"""Backends for the attention core.

Every backend is a module in this package exposing the same small interface:

``NAME``
    The string users pass as ``backend=``.
``ARRAY_MODULE``
    ``"numpy"`` or ``"cupy"``: the array type the backend consumes and returns.
``unavailable_reason() -> str | None``
    ``None`` when the backend can run on this machine, else a one-line reason
    (e.g. ``"numba is not installed"``). Must be cheap and never raise.
``not_supported_reasons(q, k, v, rel_pos_h, rel_pos_w, k_size) -> list[str]``
    Empty when the backend accepts these (already validated) inputs (the
    tables, or None), else one short human-readable reason per unmet
    requirement.
``describe() -> str`` (optional)
    One line on the kernel it runs, for :func:`relattn.explain`.
``plan(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, kernel, kernel_options)`` (optional)
    A backend that plans the terms and the core itself (the GPU backend:
    kernel families, see ``relattn.backends.gpu``) returns an object with
    ``run(q, k, v, rel_pos_h, rel_pos_w)`` and ``describe()``. Without it the
    terms are computed on the CPU and ``attention`` runs.
``attention(q, k, v, rel_h, rel_w, k_size, scale) -> out``
    The attention core. Inputs are already validated by the caller:

    * ``q``: ``(B, heads, Sq, d)``; ``k``, ``v``: ``(B, heads, Sk, d)``; all three
      the same dtype (float16, bfloat16, float32 or float64) and possibly
      non-contiguous views. ``B`` may be 0.
    * ``rel_h``: ``(B, heads, Sq, k_h)`` and ``rel_w``: ``(B, heads, Sq, k_w)``
      in the compute dtype (float32 for half-precision inputs, q's dtype
      otherwise), or both ``None`` for plain attention.
    * ``k_size = (k_h, k_w)`` with ``k_h * k_w == Sk``; key ``j = ky * k_w + kx``.
    * ``scale``: Python float.

    It computes ``softmax_j(scale * q_i.k_j + rel_h[i, ky] + rel_w[i, kx]) @ v``
    and returns a new ``(B, heads, Sq, d)`` array of q's dtype. It never modifies
    its inputs.

A backend whose kernels fail to compile or launch at run time raises
:class:`BackendFailure` and reports the reason from ``unavailable_reason()``
from then on; ``backend="auto"`` then falls back to the next backend with one
warning. A backend module that sets ``WARN_UNAVAILABLE = True`` (numba: a
required dependency, so its absence is a broken install) is also named in
that warning when ``"auto"`` passes it over as unavailable.

Adding a backend means adding its module name to ``_MODULES`` (in priority
order for ``backend="auto"``).
"""

from __future__ import annotations

import importlib

# Priority order for backend="auto": the first that can take the inputs wins.
_MODULES = {
    "cupy": "relattn.backends.gpu",
    "numba": "relattn.backends.numba_cpu",
    "numpy": "relattn.backends.reference",
}

_loaded: dict = {}


class BackendFailure(RuntimeError):
    """A backend's kernels failed to compile or launch in this process; the
    message says why, and the backend reports itself unavailable from then on."""


def names() -> list[str]:
    """All backend names, in ``backend="auto"`` priority order."""
    return list(_MODULES)


def get(name: str):
    """Return the backend module called ``name``.

    Raises
    ------
    ValueError
        If ``name`` is not a known backend.
    """
    if name not in _MODULES:
        raise ValueError(
            f"backend: expected one of {['auto', *_MODULES]}, got {name!r}"
        )
    mod = _loaded.get(name)
    if mod is None:
        try:
            mod = importlib.import_module(_MODULES[name])
        except Exception as exc:  # a broken optional backend must not break relattn
            mod = _Broken(name, f"{type(exc).__name__}: {exc}")
        _loaded[name] = mod
    return mod


class _Broken:
    """Stands in for a backend module that failed to import."""

    ARRAY_MODULE = None

    def __init__(self, name, why):
        self.NAME = name
        self._why = why

    def unavailable_reason(self):
        return f"could not import the {self.NAME} backend ({self._why})"


def available() -> list[str]:
    """Names of the backends that can run on this machine."""
    return [n for n in _MODULES if get(n).unavailable_reason() is None]
