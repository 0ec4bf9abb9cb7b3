"""Where a call's fixed cost goes: host enqueue time against device time, and what takes the host's.

A small call on a GPU can be host-bound: the device finishes each kernel before the host has
enqueued the next, and the call's time is the Python and launch work around the kernels. Timing
the call (CUDA events, as ``estimate.timer`` does) cannot tell the two apart; ``host_overhead``
measures them separately and names the host-side functions and torch ops that take the time.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


@dataclass
class HostOverhead:
    """Per-call figures of one function, in ms (``None`` where the device gives no such figure).

    ``enqueue_ms``: host time of a call, the device never waited on (calls back to back, no
    synchronisation between them). ``drain_ms``: how long the device still ran after the host had
    enqueued them all, per call (near 0: host-bound). ``timeline_ms``: the device timeline a call
    spans, CUDA events around calls back to back (what a timer reports). ``kernel_ms``: the device
    time of the kernels a call launches (profiler). ``python``: the Python functions with the most
    own time per call, ``(function, calls per call, own ms per call)``; ``ops``: the same for the
    torch ops and CUDA runtime calls the profiler sees (own CPU time).
    """

    enqueue_ms: float
    drain_ms: float | None
    timeline_ms: float | None
    kernel_ms: float | None
    python: list[tuple[str, float, float]] = field(default_factory=list)
    ops: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def host_bound(self) -> bool | None:
        """Whether the host takes longer to enqueue a call than the device takes to run its kernels."""
        return None if self.kernel_ms is None else self.enqueue_ms > self.kernel_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "host_bound": self.host_bound}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _python_top(fn: Callable[[], object], calls: int, top: int) -> list[tuple[str, float, float]]:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (primitive calls, calls, own s, cumulative s, callers)}
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [(f"{name} ({file}:{line})", count / calls, own * 1e3 / calls)
            for (file, line, name), (_, count, own, _, _) in rows]


def host_overhead(fn: Callable[[], object], device: torch.device | str, calls: int = 50, warmup: int = 3,
                  top: int = 12) -> HostOverhead:
    """Measure ``fn``'s host and device time per call on ``device`` (see ``HostOverhead``).

    ``calls`` back-to-back calls per figure (keep their device work well under the launch queue's
    depth, ~1,000 kernels, or the host waits on the device and ``enqueue_ms`` grows); ``warmup``
    calls first (compiles, autotuning, caches).
    """
    device = torch.device(device)
    if not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls: expected a positive int, got {calls!r}")
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top: expected a positive int, got {top!r}")
    for _ in range(warmup):
        fn()
    _synchronize(device)

    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    _synchronize(device)
    t2 = time.perf_counter()
    enqueue_ms = (t1 - t0) * 1e3 / calls
    drain_ms = (t2 - t1) * 1e3 / calls if device.type == "cuda" else None

    timeline_ms = None
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        timeline_ms = start.elapsed_time(end) / calls

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _synchronize(device)
    averages = prof.key_averages()
    kernel_ms = None
    if device.type == "cuda":
        # the device's own events only: a CPU op's row also carries its kernels' time
        device_events = [e for e in averages if e.device_type == DeviceType.CUDA]
        kernel_ms = sum(e.self_device_time_total for e in device_events) / 1e3 / calls
    by_cpu = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    ops = [(e.key, e.count / calls, e.self_cpu_time_total / 1e3 / calls) for e in by_cpu]

    return HostOverhead(enqueue_ms, drain_ms, timeline_ms, kernel_ms, _python_top(fn, calls, top), ops)


def format_overhead(name: str, result: HostOverhead, rows: int = 6) -> str:
    """A few lines: the figures, then the top Python functions and ops by own host time per call."""
    def ms(value):
        return "-" if value is None else f"{value:.3f}"

    bound = {None: "", True: "  host-bound", False: "  device-bound"}[result.host_bound]
    lines = [f"{name}: enqueue {ms(result.enqueue_ms)} ms, drain {ms(result.drain_ms)} ms, timeline "
             f"{ms(result.timeline_ms)} ms, kernels {ms(result.kernel_ms)} ms per call{bound}"]
    lines += [f"    py  {own:8.3f} ms  x{count:<5g} {what}" for what, count, own in result.python[:rows]]
    lines += [f"    op  {own:8.3f} ms  x{count:<5g} {what}" for what, count, own in result.ops[:rows]]
    return "\n".join(lines)
