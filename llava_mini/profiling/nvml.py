"""NVML readings (``pynvml`` from the ``nvidia-ml-py`` package): device, memory, clocks, power, energy.

Everything degrades cleanly: without the package, the driver or a GPU, readings are ``None`` and
``EnergyMeter`` reports ``available = False`` with a reason; nothing here raises for a missing NVML.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

_state = {"initialised": False, "error": None}


def _nvml():
    """The initialised ``pynvml`` module, or None (the reason is kept in ``unavailable_reason()``)."""
    try:
        import pynvml
    except ImportError:
        _state["error"] = "pynvml not installed (pip install nvidia-ml-py)"
        return None
    if not _state["initialised"]:
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # pynvml.NVMLError and driver-library load failures
            _state["error"] = f"NVML unavailable: {exc}"
            return None
        _state["initialised"] = True
        _state["error"] = None
    return pynvml


def reset() -> None:
    """Forget the cached NVML initialisation (for tests; the next call initialises again)."""
    _state.update(initialised=False, error=None)


def unavailable_reason() -> str | None:
    """Why NVML readings are unavailable, or None when they are available."""
    return None if _nvml() is not None else _state["error"]


def available() -> bool:
    """Whether NVML can be read on this machine (package, driver and at least one GPU)."""
    nv = _nvml()
    if nv is None:
        return False
    try:
        return nv.nvmlDeviceGetCount() > 0
    except Exception as exc:
        _state["error"] = f"NVML unavailable: {exc}"
        return False


def _handle(index: int):
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index: expected a GPU index >= 0, got {index!r}")
    nv = _nvml()
    if nv is None:
        return None, None
    try:
        return nv, nv.nvmlDeviceGetHandleByIndex(index)
    except Exception as exc:
        _state["error"] = f"GPU {index}: {exc}"
        return None, None


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception:
        return None


@dataclass
class DeviceInfo:
    """One NVML snapshot. Any field NVML cannot read on this device is None."""

    index: int
    name: str | None
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    sm_clock_mhz: int | None
    sm_clock_max_mhz: int | None
    power_w: float | None
    power_limit_w: float | None
    driver: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def device_info(index: int = 0) -> DeviceInfo | None:
    """Name, memory, SM clock, power of GPU ``index``; None when NVML or the GPU is unavailable."""
    nv, h = _handle(index)
    if h is None:
        return None
    name = _try(nv.nvmlDeviceGetName, h)
    if isinstance(name, bytes):
        name = name.decode()
    mem = _try(nv.nvmlDeviceGetMemoryInfo, h)
    power = _try(nv.nvmlDeviceGetPowerUsage, h)  # mW
    limit = _try(nv.nvmlDeviceGetEnforcedPowerLimit, h)  # mW
    clock_type = getattr(nv, "NVML_CLOCK_SM", 1)
    driver = _try(nv.nvmlSystemGetDriverVersion)
    return DeviceInfo(
        index=index, name=name,
        memory_total_bytes=int(mem.total) if mem is not None else None,
        memory_used_bytes=int(mem.used) if mem is not None else None,
        sm_clock_mhz=_try(nv.nvmlDeviceGetClockInfo, h, clock_type),
        sm_clock_max_mhz=_try(nv.nvmlDeviceGetMaxClockInfo, h, clock_type),
        power_w=power / 1e3 if power is not None else None,
        power_limit_w=limit / 1e3 if limit is not None else None,
        driver=driver.decode() if isinstance(driver, bytes) else driver,
    )


def power_w(index: int = 0) -> float | None:
    """Current board power draw in watts, or None."""
    nv, h = _handle(index)
    if h is None:
        return None
    mw = _try(nv.nvmlDeviceGetPowerUsage, h)
    return mw / 1e3 if mw is not None else None


def energy_mj(index: int = 0) -> int | None:
    """The GPU's total-energy counter in millijoules since driver load (Volta+), or None."""
    nv, h = _handle(index)
    if h is None:
        return None
    return _try(nv.nvmlDeviceGetTotalEnergyConsumption, h)


class EnergyMeter:
    """Energy used by GPU ``index`` over a block::

        with EnergyMeter() as m:
            run()
        m.joules, m.per_item(n_images)

    Prefers the hardware energy counter (difference of ``nvmlDeviceGetTotalEnergyConsumption``);
    falls back to sampling power in a thread every ``interval_s`` and integrating (trapezoid).
    Without NVML: ``available`` is False, ``joules`` None, ``reason`` says why; the block still runs.
    Call ``torch.cuda.synchronize()`` at the end of the block so the GPU work is inside it.
    """

    def __init__(self, index: int = 0, interval_s: float = 0.01, method: str = "auto"):
        if method not in ("auto", "counter", "sampling"):
            raise ValueError(f"method: expected 'auto', 'counter' or 'sampling', got {method!r}")
        if not interval_s > 0:
            raise ValueError(f"interval_s: expected > 0, got {interval_s!r}")
        self.index = index
        self.interval_s = interval_s
        self.requested = method
        self.method: str | None = None
        self.joules: float | None = None
        self.seconds: float | None = None
        self.samples: list[tuple[float, float]] = []
        self.reason: str | None = None
        self._start_mj = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self.method is not None

    def __enter__(self) -> "EnergyMeter":
        self._t0 = time.perf_counter()
        nv, h = _handle(self.index)
        if h is None:
            self.reason = _state["error"] or "NVML unavailable"
            return self
        if self.requested in ("auto", "counter"):
            self._start_mj = _try(nv.nvmlDeviceGetTotalEnergyConsumption, h)
            if self._start_mj is not None:
                self.method = "counter"
                return self
            if self.requested == "counter":
                self.reason = "this GPU has no total-energy counter"
                return self
        if _try(nv.nvmlDeviceGetPowerUsage, h) is None:
            self.reason = "this GPU reports no power reading"
            return self
        self.method = "sampling"
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, args=(nv, h), daemon=True)
        self._thread.start()
        return self

    def _sample(self, nv, h) -> None:
        while True:
            mw = _try(nv.nvmlDeviceGetPowerUsage, h)
            if mw is not None:
                self.samples.append((time.perf_counter(), mw / 1e3))
            if self._stop.wait(self.interval_s):
                break
        mw = _try(nv.nvmlDeviceGetPowerUsage, h)
        if mw is not None:
            self.samples.append((time.perf_counter(), mw / 1e3))

    def __exit__(self, *exc) -> bool:
        self.seconds = time.perf_counter() - self._t0
        if self.method == "counter":
            end = energy_mj(self.index)
            if end is None:
                self.method, self.reason = None, "the energy counter stopped answering"
            else:
                self.joules = (end - self._start_mj) / 1e3
        elif self.method == "sampling":
            self._stop.set()
            self._thread.join()
            pts = self.samples
            if len(pts) >= 2:
                self.joules = sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(pts, pts[1:]))
            elif len(pts) == 1:
                self.joules = pts[0][1] * self.seconds
            else:
                self.method, self.reason = None, "no power samples"
        return False

    @property
    def mean_power_w(self) -> float | None:
        """Average power over the block (joules / seconds), or None."""
        if self.joules is None or not self.seconds:
            return None
        return self.joules / self.seconds

    def per_item(self, count: int) -> float | None:
        """Joules per image (or frame, or token) for ``count`` items; None when unavailable."""
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise ValueError(f"count: expected a positive int, got {count!r}")
        return None if self.joules is None else self.joules / count

    def to_dict(self) -> dict:
        return {"available": self.available, "method": self.method, "joules": self.joules, "seconds": self.seconds,
                "mean_power_w": self.mean_power_w, "samples": len(self.samples), "reason": self.reason}
