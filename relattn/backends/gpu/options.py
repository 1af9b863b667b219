"""The GPU backend's settings, read once per process.

Two environment variables, no more:

``RELATTN_CACHE_DIR``
    Where compiled Hopper kernels (cubins) are kept between runs; default
    ``~/.cache/relattn``. Unwritable: compiled in memory on each run.
``RELATTN_SM90``
    ``0`` turns the Hopper (sm_90a) kernels off; the portable ``mma.sync``
    kernels run instead (a safety switch, e.g. for a driver that misbehaves).

Everything else a call could vary (which kernel family, its configuration) is
chosen by the planner from the problem, or forced by an argument
(``relattn.plan(..., kernel=..., kernel_options=...)``), never by the
environment.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Options:
    cache_dir: str
    hopper: bool

    @classmethod
    def from_environment(cls) -> "Options":
        return cls(
            cache_dir=os.environ.get("RELATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "relattn"),
            hopper=os.environ.get("RELATTN_SM90", "1") != "0",
        )


OPTIONS = Options.from_environment()
