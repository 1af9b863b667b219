"""What the planner needs to know of the current CUDA device, asked once per device."""

from __future__ import annotations

import dataclasses
import threading

from .options import OPTIONS


@dataclasses.dataclass(frozen=True)
class Device:
    id: int
    cc: int                 # compute capability, e.g. 90
    sms: int                # multiprocessors
    smem_optin: int         # largest dynamic shared memory per block, bytes
    hopper_reason: str | None   # None: the sm_90a kernels can run here, else why not

    @property
    def hopper(self) -> bool:
        return self.hopper_reason is None


_devices: dict = {}
_lock = threading.Lock()


def current() -> Device:
    import cupy

    dev_id = cupy.cuda.runtime.getDevice()
    found = _devices.get(dev_id)
    if found is None:
        with _lock:
            found = _devices.get(dev_id) or _devices.setdefault(dev_id, _probe(cupy.cuda.Device(dev_id)))
    return found


def _probe(dev) -> Device:
    cc = int(dev.compute_capability)
    try:
        optin = int(dev.attributes["MaxSharedMemoryPerBlockOptin"])
    except Exception:   # an attribute table without it: the documented limits
        optin = 227 * 1024 if cc >= 90 else 163 * 1024 if cc in (80, 87) else 99 * 1024
    return Device(dev.id, cc, int(dev.attributes["MultiProcessorCount"]), optin, _hopper_reason(cc))


def _hopper_reason(cc: int) -> str | None:
    if not OPTIONS.hopper:
        return "disabled by RELATTN_SM90=0"
    if cc != 90:
        return f"compute capability {cc // 10}.{cc % 10} is not 9.0 (wgmma needs sm_90a)"
    try:
        from cupy_backends.cuda.libs import nvrtc

        major, minor = nvrtc.getVersion()
        if (major, minor) < (12, 0):
            return f"NVRTC {major}.{minor} cannot target sm_90a (needs 12.0 or newer)"
    except Exception as exc:  # pragma: no cover - depends on the CuPy build
        return f"CuPy's NVRTC bindings are not usable ({type(exc).__name__}: {exc})"
    return None


def mark_hopper_broken(dev: Device, why: str) -> None:
    """A Hopper kernel failed to build on this device: the planner stops asking for them."""
    with _lock:
        _devices[dev.id] = dataclasses.replace(dev, hopper_reason=why)
