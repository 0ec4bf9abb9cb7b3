"""The GPUs the kernels are built for, and what each allows one program (a CUDA block).

The figures are NVIDIA's (CUDA C Programming Guide, "Compute Capabilities" table); the shared memory
limit per block is the opt-in maximum, the one Triton's launcher checks (``max_shared_mem``).
``device_limits`` reads the same two numbers from a running device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Arch:
    """Per-block and per-SM limits of one compute capability."""

    capability: int  # 80 for sm_80
    gpu: str  # a card our users own with this capability
    shared_per_block: int  # bytes one program may use (opt-in maximum)
    shared_per_sm: int  # bytes an SM holds for all resident programs
    max_threads_per_sm: int
    max_blocks_per_sm: int
    registers_per_sm: int = 64 * 1024
    shared_reserved_per_block: int = 1024  # the driver keeps 1 KB of each block's share since sm_80

    @property
    def name(self) -> str:
        return f"sm_{self.capability}"


ARCHS = (
    Arch(80, "A100", shared_per_block=163 * 1024, shared_per_sm=164 * 1024, max_threads_per_sm=2048,
         max_blocks_per_sm=32),
    Arch(86, "RTX 3090", shared_per_block=99 * 1024, shared_per_sm=100 * 1024, max_threads_per_sm=1536,
         max_blocks_per_sm=16),
    Arch(89, "RTX 4090", shared_per_block=99 * 1024, shared_per_sm=100 * 1024, max_threads_per_sm=1536,
         max_blocks_per_sm=24),
    Arch(90, "H100", shared_per_block=227 * 1024, shared_per_sm=228 * 1024, max_threads_per_sm=2048,
         max_blocks_per_sm=32),
)


def arch(capability: int) -> Arch:
    """The ``Arch`` of a compute capability in ``ARCHS`` (e.g. 86)."""
    for candidate in ARCHS:
        if candidate.capability == capability:
            return candidate
    raise ValueError(f"capability: expected one of {[a.capability for a in ARCHS]}, got {capability!r}")


def device_limits(device: torch.device) -> tuple[int, int] | None:
    """``(capability, shared memory one program may use)`` of a CUDA device; None off CUDA."""
    if device.type != "cuda":
        return None
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_limits(index: int) -> tuple[int, int]:
    """Per device, once: a driver query on every kernel call costs host time."""
    import triton  # the driver query Triton's own launcher uses

    major, minor = torch.cuda.get_device_capability(index)
    shared = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return 10 * major + minor, shared


MAX_REGISTERS_PER_THREAD = 255  # every arch since sm_35


def max_registers_per_thread(threads: int) -> int:
    """Registers each of a program's ``threads`` threads can have with the whole program on one SM
    (64K registers per SM on every arch in ``ARCHS``); ptxas spills beyond."""
    return min(MAX_REGISTERS_PER_THREAD, min(a.registers_per_sm for a in ARCHS) // threads)


def occupancy(arch: Arch, num_warps: int, registers: int, shared: int) -> int:
    """Programs resident per SM for a kernel using ``registers`` per thread and ``shared`` bytes.

    The occupancy calculator's rule: the least of the block, thread, register and shared memory
    limits; registers are allocated per warp in units of 256.
    """
    threads = 32 * num_warps
    by_threads = arch.max_threads_per_sm // threads
    registers_per_warp = -(-registers * 32 // 256) * 256
    by_registers = (arch.registers_per_sm // registers_per_warp) // num_warps if registers else by_threads
    by_shared = arch.shared_per_sm // (shared + arch.shared_reserved_per_block)
    return min(arch.max_blocks_per_sm, by_threads, by_registers, by_shared)
