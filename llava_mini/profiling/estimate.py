"""Measurement you can trust on a shared machine: medians with intervals, and paired ratios.

Everything this project reports as a time or a ratio comes from here:

- :func:`median_interval`: the sample median and a distribution-free confidence interval for the
  true median from order statistics (no assumption about the noise's shape).
- :func:`sample_until`: draws samples until that interval is narrower than a stated relative width,
  or a time budget runs out (or a sample cap is hit), and records which ended it.
- :func:`paired_ratio`: the comparison of two things, interleaved. The two sides alternate
  (A B, B A, A B, ...: each pair back to back, the order flipped every pair), the ratio is taken per
  pair, and the median ratio gets the interval. Whatever else loads the machine hits both sides of a
  pair alike and cancels in its ratio; a burst that lands on one side moves one pair, not the median.
- :func:`timer`: one timed call of a function, CUDA events (synchronised) on a GPU, ``perf_counter``
  on the CPU, or any injected clock (the tests drive a deterministic fake clock).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

CONFIDENCE = 0.95
MIN_SAMPLES = 6  # the fewest samples whose [min, max] covers the median with >= 95% (1 - 2 / 2**6)
STOP_REASONS = ("width", "budget", "max_samples")


@dataclass
class Estimate:
    """A median with its confidence interval [low, high] over ``n`` samples.

    ``confidence``: the interval's coverage of the true median (order statistics, exact for
    independent samples; at least ``CONFIDENCE`` once n >= ``MIN_SAMPLES``). ``stopped_by``: what
    ended the sampling ("width": the interval reached the target width; "budget": the time budget
    ran out; "max_samples": the sample cap). ``unit``: "ms", "x" (a ratio), "tokens/s", ...
    """

    median: float
    low: float
    high: float
    n: int
    confidence: float
    stopped_by: str
    unit: str = "ms"

    @property
    def rel_width(self) -> float:
        """(high - low) / median: 0.1 means the interval spans 10% of the median."""
        return (self.high - self.low) / self.median if self.median > 0 else math.inf

    def reciprocal(self, scale: float = 1.0, unit: str = "") -> "Estimate":
        """``scale / x`` (e.g. ms per token -> tokens per second); the interval's ends swap."""
        inv = lambda x: scale / x if x > 0 else math.inf  # noqa: E731
        return Estimate(inv(self.median), inv(self.high), inv(self.low), self.n, self.confidence, self.stopped_by,
                        unit)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return format_estimate(self.to_dict())


def format_estimate(value, name: str = "value") -> str:
    """``2.1x [1.98, 2.23] (n=12)``: a figure is never printed without its interval.

    Raises ``ValueError`` when ``value`` is not an Estimate (or its dict) with an interval.
    """
    d = value.to_dict() if isinstance(value, Estimate) else value
    if not isinstance(d, dict) or not all(isinstance(d.get(k), (int, float)) for k in ("median", "low", "high", "n")):
        raise ValueError(f"{name}: expected a median with its interval (an Estimate or its dict with median, "
                         f"low, high, n), got {value!r}; a ratio is never reported without its interval")
    unit = d.get("unit", "")
    suffix = "x" if unit == "x" else ""
    return f"{d['median']:.3g}{suffix} [{d['low']:.3g}, {d['high']:.3g}] (n={d['n']})"


def median_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(median, low, high, coverage) of ``values``.

    [low, high] = [x_(k), x_(n+1-k)] of the sorted values, with the largest k whose coverage of the
    true median, 1 - 2 P(Binomial(n, 1/2) <= k - 1), is at least ``confidence``. With too few
    values for that (n < 6 at 95%), it is [min, max] and ``coverage`` says how much less it holds.
    """
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        raise ValueError("values: expected at least one sample")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence}")
    total, below = 2 ** n, 1  # below: the number of outcomes with B <= k - 1, for k = 1
    k, coverage = 1, 1 - 2 * below / total
    for j in range(1, (n + 1) // 2):  # try k = j + 1
        below += math.comb(n, j)
        if 1 - 2 * below / total < confidence:
            break
        k, coverage = j + 1, 1 - 2 * below / total
    return statistics.median(xs), xs[k - 1], xs[n - k], coverage


def estimate_of(values, stopped_by: str, unit: str = "ms", confidence: float = CONFIDENCE) -> Estimate:
    """An ``Estimate`` of samples already drawn."""
    median, low, high, coverage = median_interval(values, confidence)
    return Estimate(median, low, high, len(values), coverage, stopped_by, unit)


@dataclass
class Protocol:
    """When sampling stops: once the interval is narrower than ``rel_width`` x the median (after at
    least ``min_samples``), when ``budget_s`` seconds have passed, or at ``max_samples``.
    ``clock`` (seconds) tells the budget's time: ``time.perf_counter`` unless a test injects one."""

    rel_width: float = 0.05
    budget_s: float = 10.0
    min_samples: int = MIN_SAMPLES
    max_samples: int = 1000
    warmup: int = 1
    confidence: float = CONFIDENCE
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self):
        if not self.rel_width > 0:
            raise ValueError(f"rel_width: expected > 0, got {self.rel_width}")
        if not self.budget_s >= 0:
            raise ValueError(f"budget_s: expected >= 0 seconds, got {self.budget_s}")
        if not 1 <= self.min_samples <= self.max_samples:
            raise ValueError(f"min_samples/max_samples: expected 1 <= min <= max, got {self.min_samples}, "
                             f"{self.max_samples}")
        if self.warmup < 0:
            raise ValueError(f"warmup: expected >= 0, got {self.warmup}")

    def scaled(self, factor: float) -> "Protocol":
        """The same protocol with ``factor`` times the time budget (for a headline figure)."""
        return replace(self, budget_s=self.budget_s * factor)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "clock"}


def _stop_reason(values: list[float], started: float, protocol: Protocol) -> str | None:
    n = len(values)
    if n < protocol.min_samples:
        return None
    median, low, high, _ = median_interval(values, protocol.confidence)
    if median > 0 and (high - low) / median <= protocol.rel_width:
        return "width"
    if protocol.clock() - started >= protocol.budget_s:
        return "budget"
    if n >= protocol.max_samples:
        return "max_samples"
    return None


def sample_until(sample: Callable[[], float], protocol: Protocol | None = None, unit: str = "ms") -> Estimate:
    """Call ``sample()`` (after ``protocol.warmup`` unrecorded calls) until ``protocol`` says stop;
    the median of its values with their interval."""
    protocol = protocol or Protocol()
    for _ in range(protocol.warmup):
        sample()
    started, values = protocol.clock(), []
    while True:
        values.append(float(sample()))
        reason = _stop_reason(values, started, protocol)
        if reason:
            return estimate_of(values, reason, unit, protocol.confidence)


@dataclass
class Comparison:
    """``ratio`` = numerator time / denominator time, per interleaved pair; ``numerator`` and
    ``denominator``: each side's times over the same pairs (medians with intervals)."""

    ratio: Estimate
    numerator: Estimate
    denominator: Estimate

    def to_dict(self) -> dict:
        return {"ratio": self.ratio.to_dict(), "numerator": self.numerator.to_dict(),
                "denominator": self.denominator.to_dict()}


def paired_ratio(numerator: Callable[[], float], denominator: Callable[[], float],
                 protocol: Protocol | None = None) -> Comparison:
    """Compare two samplers (each returns one time, e.g. a :func:`timer`), interleaved.

    Pair i runs numerator then denominator when i is even, the other way round when odd; its ratio
    is numerator / denominator. Sampling stops as :func:`sample_until` says, on the ratios' interval.
    For a speedup of B over A, pass A's time as the numerator: ``paired_ratio(slow, fast)``.
    """
    protocol = protocol or Protocol()
    for _ in range(protocol.warmup):
        numerator()
        denominator()
    num, den = [], []

    def pair() -> float:
        if len(num) % 2 == 0:
            a = numerator()
            b = denominator()
        else:
            b = denominator()
            a = numerator()
        if not (a > 0 and b > 0):
            raise ValueError(f"paired_ratio: a sampler returned a non-positive time ({a}, {b})")
        num.append(a)
        den.append(b)
        return a / b

    ratio = sample_until(pair, replace(protocol, warmup=0), unit="x")
    side = lambda xs: estimate_of(xs, ratio.stopped_by, "ms", protocol.confidence)  # noqa: E731
    return Comparison(ratio, side(num), side(den))


def timer(fn: Callable[[], object], device: torch.device | str = "cpu", clock: Callable[[], float] | None = None,
          min_sample_ms: float = 0.0) -> Callable[[], float]:
    """A sampler: each call runs ``fn`` and returns its time in ms.

    On CUDA the time comes from CUDA events around the call (then a synchronize); on the CPU from
    ``time.perf_counter``; an injected ``clock`` (seconds) replaces both. Calls shorter than
    ``min_sample_ms`` (tiny GPU kernels, whose single-launch times are mostly launch jitter) are
    repeated back to back within one sample, the count fixed once from a first call; the sample is
    the mean per call.
    """
    device = torch.device(device)
    use_events = clock is None and device.type == "cuda"
    clock = clock or time.perf_counter

    def once(calls: int) -> float:
        if use_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / calls
        t0 = clock()
        for _ in range(calls):
            fn()
        return (clock() - t0) * 1e3 / calls

    calls = 1
    if min_sample_ms > 0:
        first = once(1)
        calls = max(1, math.ceil(min_sample_ms / first)) if first > 0 else 1
    return lambda: once(calls)


def clock_name(device: torch.device | str, clock: Callable[[], float] | None = None) -> str:
    """What times a ``timer`` on ``device``: "cuda events", "cpu perf_counter" or "injected"."""
    if clock is not None:
        return "injected"
    return "cuda events" if torch.device(device).type == "cuda" else "cpu perf_counter"
