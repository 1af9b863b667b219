"""One planning pass: a problem becomes one plan, terms and core together.

``make_plan`` asks the families of ``families.PRIORITY`` in order (or the one
a caller forces) and returns a :class:`Plan` whose ``run(q, k, v,
rel_pos_h, rel_pos_w)`` computes the terms where the chosen kernel does not
and launches it. Plans are built from a first call's arrays and are valid for
every call whose arrays have their signature (shape, strides, dtype, 16-byte
alignment, device): ``relattn.functional`` caches them per signature, and
``relattn.plan`` hands one to the user.
"""

from __future__ import annotations

import dataclasses
import warnings

from . import _build, _device, terms
from .families import FAMILIES, PRIORITY
from .problem import Problem


class NoKernel(ValueError):
    """No family serves the problem (or not the forced one): ``reasons`` per family."""

    def __init__(self, reasons: dict):
        self.reasons = reasons
        lines = "; ".join(f"{name}: {', '.join(r)}" for name, r in reasons.items())
        super().__init__(f"no GPU kernel serves this problem ({lines})")


@dataclasses.dataclass(frozen=True)
class Plan:
    problem: Problem
    family: str | None        # None: nothing to launch (empty problem)
    config: object
    fused: bool               # the kernel computes the terms itself
    terms: str                # how the terms are computed: "fused", "kernel", "einsum" or "none"
    run: object = dataclasses.field(repr=False, compare=False)
    passed_over: tuple = ()   # (family, reasons) of the families asked before

    @property
    def writes_lse(self) -> bool:
        """``run(..., lse=buf)`` also stores each row's log-sum-exp (log2
        domain; float32 (B, H, Sq), C-contiguous) for the fused backward."""
        return self.family is not None and getattr(FAMILIES[self.family], "WRITES_LSE", False)

    def describe(self) -> str:
        if self.family is None:
            return "nothing to compute (empty input)"
        fam = FAMILIES[self.family]
        return f"{fam.KERNEL} ({self.config.describe()}), terms: {self.terms}"


def make_plan(q, k, v, rel_pos_h, rel_pos_w, q_size, k_size, scale, kernel=None, kernel_options=None,
              terms_given=False) -> Plan:
    """The plan of a validated call (CuPy arrays; tables or None). With
    ``terms_given``, rel_pos_h / rel_pos_w are the terms rel_h / rel_w (the
    backend contract of ``relattn.backends``), and the plan runs the core only."""
    p = Problem.from_arrays(q, k, rel_pos_h, rel_pos_w, q_size, k_size, scale, terms=terms_given or None)
    if p.B * p.H * p.Sq * p.D == 0:
        return Plan(p, None, None, False, "none", _empty_run(p))
    dev = _device.current()
    options = dict(kernel_options or {})
    if kernel is not None:
        if kernel not in FAMILIES:
            raise ValueError(f"kernel: expected one of {sorted(FAMILIES)}, got {kernel!r}")
        families = (FAMILIES[kernel],)
    else:
        if options:
            raise ValueError("kernel_options: given without kernel")
        families = PRIORITY.get(p.dtype, ())
    want_fused = options.pop("fused", None)
    modes = (True, False) if p.fusable else (False,)
    if want_fused is not None:
        modes = (bool(want_fused),)
    refused: dict = {}
    for fused in modes:
        for fam in families:
            reasons = list(fam.not_supported_reasons(p, dev, fused))
            if not reasons and kernel is None and hasattr(fam, "tuned_reasons"):
                reasons = fam.tuned_reasons(p)
            if not reasons:
                try:
                    cfg = fam.config(p, dev, fused, options)
                except TypeError as exc:   # an unknown option name
                    raise ValueError(f"kernel_options: {exc}") from None
                reasons = fam.config_reasons(p, cfg)
            if not reasons:
                try:
                    core, why = fam.build(p, dev, cfg, q, k, v, rel_pos_h, rel_pos_w)
                except _build.BuildError as exc:
                    warnings.warn(f"relattn: {exc}; using the next kernel", RuntimeWarning, stacklevel=4)
                    core, why = None, str(exc)
                if core is not None:
                    passed = tuple((n, tuple(r)) for n, r in refused.items())
                    if terms_given or not p.terms:
                        return Plan(p, fam.NAME, cfg, False, "given" if p.terms else "none", core, passed)
                    return _assemble(p, fam.NAME, cfg, fused, core, q, rel_pos_h, rel_pos_w, passed)
                reasons = [why]
            label = fam.NAME + (" (fused terms)" if fused else "")
            refused.setdefault(label, []).extend(reasons)
    raise NoKernel(refused)


def _assemble(p, family, cfg, fused, core, q, rel_pos_h, rel_pos_w, passed):
    if fused:
        return Plan(p, family, cfg, True, "fused", core, passed)
    step, how = terms.plan(q, rel_pos_h, rel_pos_w, p.q_size, p.k_size)

    def run(q, k, v, th, tw, **kw):
        return core(q, k, v, *step(q, th, tw), **kw)

    return Plan(p, family, cfg, False, how, run, passed)


def _empty_run(p):
    def run(q, k, v, th, tw):
        import cupy

        return cupy.empty((p.B, p.H, p.Sq, p.D), dtype=q.dtype)

    return run
