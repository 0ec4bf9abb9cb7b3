"""The device's own ceilings, measured: copy bandwidth and dense bf16 matmul rate.

Every ratio this project reports ("% of copy bandwidth", "x of the matmul rate") divides by these,
measured in the same process as the thing being compared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from llava_mini.profiling.estimate import Protocol, sample_until, timer


@dataclass
class Ceilings:
    device: str
    copy_gbps: float  # bytes read + bytes written per second, in GB/s (1e9)
    matmul_tflops: float  # dense matmul rate at `matmul_dtype`, in TFLOP/s (1e12)
    matmul_dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def device_name(device: torch.device | str | None = None) -> str:
    """A readable device name: the GPU's name, or ``cpu``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def time_ms(fn, device: torch.device, budget_s: float = 1.0) -> float:
    """Median time of ``fn()`` in ms (``estimate.sample_until``: at least 6 runs, up to ``budget_s``).

    A single figure, for a ceiling; a comparison of two things is ``estimate.paired_ratio``'s job.
    """
    return sample_until(timer(fn, device), Protocol(budget_s=budget_s, warmup=2)).median


def measure_copy_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """Achieved bandwidth of a large device-to-device copy (read + write), GB/s."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 26)
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_matmul_tflops(device: torch.device, n: int | None = None, dtype: torch.dtype | None = None) -> float:
    """Achieved rate of a large square matmul, TFLOP/s (bf16 on GPU, fp32 on CPU)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def measure_ceilings(device: torch.device | str | None = None) -> Ceilings:
    """Measure this device's copy bandwidth and matmul rate (a few seconds on a GPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Ceilings(
        device=device_name(device),
        copy_gbps=measure_copy_gbps(device),
        matmul_tflops=measure_matmul_tflops(device, dtype=dtype),
        matmul_dtype=str(dtype).removeprefix("torch."),
    )
