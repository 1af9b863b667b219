"""A call's problem: everything about it that decides a plan, no arrays."""

from __future__ import annotations

import dataclasses

from ._operands import dtype_of


@dataclasses.dataclass(frozen=True)
class Problem:
    """Shapes, dtypes, grids and scale of one attention call.

    ``tables`` is ``(dtype_h, dtype_w, rows_h, rows_w)`` of the stored tables
    when the call passes them (a kernel may then compute the terms itself),
    None otherwise; ``terms`` says whether the bias is present at all.
    """

    dtype: str
    B: int
    H: int
    Sq: int
    Sk: int
    D: int
    q_size: tuple | None
    k_size: tuple
    terms: bool
    tables: tuple | None
    scale: float

    @classmethod
    def from_arrays(cls, q, k, rel_pos_h, rel_pos_w, q_size, k_size, scale, *, terms=None):
        """``terms``: rel_pos_h / rel_pos_w are already the terms rel_h / rel_w."""
        B, H, Sq, D = (int(s) for s in q.shape)
        Sk = int(k.shape[2])
        tables = None
        if rel_pos_h is not None and not terms:
            tables = (dtype_of(rel_pos_h), dtype_of(rel_pos_w), int(rel_pos_h.shape[0]), int(rel_pos_w.shape[0]))
        has = rel_pos_h is not None
        kh, kw = (int(n) for n in k_size) if (has and k_size is not None) else (1, max(Sk, 1))
        qs = tuple(int(n) for n in q_size) if q_size is not None else None
        return cls(dtype_of(q), B, H, Sq, Sk, D, qs, (kh, kw), has, tables, float(scale))

    @property
    def half(self) -> bool:
        return self.dtype in ("float16", "bfloat16")

    @property
    def dt(self) -> int:
        """The kernels' 16-bit type code: 0 float16, 1 bfloat16."""
        return 1 if self.dtype == "bfloat16" else 0

    @property
    def table_rows(self) -> tuple:
        """Rows of the tables after SAM's resize: 2 * max(q, k) - 1 per axis."""
        (qh, qw), (kh, kw) = self.q_size, self.k_size
        return 2 * max(qh, kh) - 1, 2 * max(qw, kw) - 1

    @property
    def fusable(self) -> bool:
        """The terms could be computed inside the attention kernel: 16-bit q
        with tables of its own dtype and head_dim a multiple of 8."""
        return (self.tables is not None and self.half and self.tables[0] == self.dtype
                and self.tables[1] == self.dtype and self.D % 8 == 0 and self.B * self.H * self.Sq > 0
                and self.Sk > 0)

    def describe(self) -> str:
        grids = f"q grid {self.q_size}, k grid {self.k_size}" if self.terms else f"Sq {self.Sq}, Sk {self.Sk}"
        return f"{self.dtype}, B {self.B}, heads {self.H}, {grids}, head_dim {self.D}"
