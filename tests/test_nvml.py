"""NVML: degrades cleanly without a GPU; the energy arithmetic checked against a fake NVML."""

import sys
import time
import types

import pytest
import torch

from llava_mini.profiling import nvml


@pytest.fixture
def fresh():
    nvml.reset()
    yield
    nvml.reset()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_degrades_cleanly_without_nvml(fresh):
    assert nvml.available() is False
    assert nvml.device_info() is None
    assert nvml.power_w() is None and nvml.energy_mj() is None
    assert isinstance(nvml.unavailable_reason(), str)
    with nvml.EnergyMeter() as m:
        sum(range(1000))
    assert not m.available and m.joules is None and m.reason
    assert m.per_item(10) is None and m.mean_power_w is None
    assert m.to_dict()["available"] is False


def test_missing_package_is_a_reason_not_an_error(fresh, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert nvml.available() is False
    assert "nvidia-ml-py" in nvml.unavailable_reason()


def fake_pynvml(energy=True, power_mw=200_000.0):
    """A stand-in pynvml: the energy counter advances at ``power_mw`` in real time."""
    t0 = time.perf_counter()
    m = types.ModuleType("pynvml")
    m.NVML_CLOCK_SM = 1

    class MemInfo:
        total, used = 80 << 30, 1 << 30

    m.nvmlInit = lambda: None
    m.nvmlDeviceGetCount = lambda: 1
    m.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i) if i == 0 else (_ for _ in ()).throw(RuntimeError("no gpu"))
    m.nvmlDeviceGetName = lambda h: b"Fake GPU"
    m.nvmlDeviceGetMemoryInfo = lambda h: MemInfo()
    m.nvmlDeviceGetPowerUsage = lambda h: power_mw
    m.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700_000
    m.nvmlDeviceGetClockInfo = lambda h, t: 1980
    m.nvmlDeviceGetMaxClockInfo = lambda h, t: 1980
    m.nvmlSystemGetDriverVersion = lambda: "555.42"

    def counter(h):
        if not energy:
            raise RuntimeError("not supported")
        return int((time.perf_counter() - t0) * power_mw)  # mW * s = mJ

    m.nvmlDeviceGetTotalEnergyConsumption = counter
    return m


def test_device_info_from_fake_nvml(fresh, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    info = nvml.device_info(0)
    assert info.name == "Fake GPU" and info.memory_total_bytes == 80 << 30
    assert info.power_w == 200.0 and info.power_limit_w == 700.0 and info.sm_clock_mhz == 1980
    assert nvml.device_info(3) is None  # a missing GPU index is None, not an exception
    with pytest.raises(ValueError, match="index"):
        nvml.device_info(-1)


@pytest.mark.parametrize("energy", [True, False])
def test_energy_meter_counter_and_sampling(fresh, monkeypatch, energy):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(energy=energy))
    with nvml.EnergyMeter(interval_s=0.005) as m:
        time.sleep(0.2)
    assert m.method == ("counter" if energy else "sampling")
    # 200 W for ~0.2 s = ~40 J
    assert m.joules == pytest.approx(200.0 * m.seconds, rel=0.15)
    assert m.per_item(4) == pytest.approx(m.joules / 4)
    assert m.mean_power_w == pytest.approx(200.0, rel=0.15)
    with pytest.raises(ValueError, match="count"):
        m.per_item(0)


def test_energy_meter_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        nvml.EnergyMeter(method="guess")
    with pytest.raises(ValueError, match="interval_s"):
        nvml.EnergyMeter(interval_s=0)
