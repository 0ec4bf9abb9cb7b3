"""Known-answer tests of the measurement protocol, on a deterministic fake machine (no real timing).

The fake machine's clock only moves when work runs: a workload of known cost, slowed by a load that
drifts over time and hit by seeded random delays (another process) that land on either side. The
true ratio of two workloads is therefore exactly known, and the estimator must find it.
"""

import math
import random

import pytest

from llava_mini.profiling.estimate import (CONFIDENCE, STOP_REASONS, Estimate, Protocol, format_estimate,
                                           median_interval, paired_ratio, sample_until, timer)


class FakeMachine:
    """``work(cost_ms)`` advances ``clock()`` (seconds) by the cost times the machine's slowdown (1 at
    t = 0, growing by ``drift`` per second), a symmetric jitter, and now and then a random delay."""

    def __init__(self, seed: int, drift: float = 5.0, jitter: float = 0.05, burst_p: float = 0.1,
                 burst_ms: float = 5.0):
        self.t = 0.0
        self.rng = random.Random(seed)
        self.drift, self.jitter, self.burst_p, self.burst_ms = drift, jitter, burst_p, burst_ms
        self.log = []

    def clock(self) -> float:
        return self.t

    def work(self, name: str, cost_ms: float) -> None:
        ms = cost_ms * (1 + self.drift * self.t) * math.exp(self.rng.gauss(0, self.jitter))
        if self.rng.random() < self.burst_p:
            ms += self.rng.expovariate(1 / self.burst_ms)
        self.log.append(name)
        self.t += ms / 1e3

    def sampler(self, name: str, cost_ms: float):
        return timer(lambda: self.work(name, cost_ms), "cpu", clock=self.clock)


def test_median_interval_is_the_binomial_order_statistic_interval():
    # n = 20 at 95%: ranks 6 and 15; n = 100: ranks 40 and 61 (standard tables)
    assert median_interval(range(1, 21))[1:3] == (6, 15)
    assert median_interval(range(1, 101))[1:3] == (40, 61)
    med, low, high, coverage = median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0])
    assert (med, low, high) == (3.5, 1.0, 6.0) and coverage == pytest.approx(1 - 2 / 2 ** 6)
    assert median_interval([1, 2, 3, 4, 5])[3] < CONFIDENCE  # too few samples: it says so
    with pytest.raises(ValueError, match="values"):
        median_interval([])
    with pytest.raises(ValueError, match="confidence"):
        median_interval([1, 2], confidence=1.5)


def test_interval_covers_the_true_median_at_its_stated_rate():
    rng = random.Random(0)
    true_median = math.log(2)  # of an exponential with rate 1
    trials = 400
    covered = sum(low <= true_median <= high for low, high in
                  (median_interval([rng.expovariate(1) for _ in range(15)])[1:3] for _ in range(trials)))
    assert covered / trials >= 0.93


def test_paired_ratio_recovers_a_known_ratio_on_a_drifting_noisy_machine():
    true_ratio = 2.5
    covered = 0
    for seed in range(100):
        m = FakeMachine(seed)
        c = paired_ratio(m.sampler("B", 2.5), m.sampler("A", 1.0), Protocol(rel_width=0.02, budget_s=1.0,
                                                                           clock=m.clock))
        r = c.ratio
        assert r.unit == "x" and r.low <= r.median <= r.high and r.n >= 6 and r.stopped_by in STOP_REASONS
        assert abs(r.median / true_ratio - 1) < 0.1
        covered += r.low <= true_ratio <= r.high
    assert covered >= 90  # nominal 95%


def test_phases_are_fooled_by_drift_where_pairs_are_not():
    """The old protocol (all of A, then all of B, ratio of medians) lands far off on a drifting machine."""
    protocol = lambda m: Protocol(rel_width=1e-9, budget_s=math.inf, max_samples=40, clock=m.clock)  # noqa: E731
    m = FakeMachine(seed=1, drift=20.0, burst_p=0.0)
    b = sample_until(m.sampler("B", 2.5), protocol(m))
    a = sample_until(m.sampler("A", 1.0), protocol(m))
    assert b.median / a.median < 2.5 / 1.3  # B ran while the machine was faster
    m = FakeMachine(seed=1, drift=20.0, burst_p=0.0)
    r = paired_ratio(m.sampler("B", 2.5), m.sampler("A", 1.0), protocol(m)).ratio
    assert r.low <= 2.5 <= r.high


def test_pairs_alternate_and_flip_their_order():
    m = FakeMachine(seed=0, jitter=0.0, burst_p=0.0, drift=0.0)
    c = paired_ratio(m.sampler("B", 2.0), m.sampler("A", 1.0), Protocol(warmup=1, clock=m.clock))
    assert m.log[:2] == ["B", "A"]  # warm-up
    assert m.log[2:] == ["B", "A", "A", "B"] * 3
    assert c.numerator.n == c.denominator.n == c.ratio.n == 6


def test_sampling_says_what_ended_it():
    m = FakeMachine(seed=0, jitter=0.0, burst_p=0.0, drift=0.0)  # noiseless: the interval has no width
    e = sample_until(m.sampler("A", 1.0), Protocol(min_samples=8, clock=m.clock))
    assert (e.stopped_by, e.n) == ("width", 8) and e.low == pytest.approx(e.high) == pytest.approx(1.0)

    m = FakeMachine(seed=0, jitter=0.5)
    e = sample_until(m.sampler("A", 1.0), Protocol(rel_width=1e-6, budget_s=0.05, clock=m.clock))
    assert e.stopped_by == "budget" and m.clock() >= 0.05

    m = FakeMachine(seed=0, jitter=0.5)
    e = sample_until(m.sampler("A", 1.0), Protocol(rel_width=1e-6, budget_s=math.inf, max_samples=10, clock=m.clock))
    assert (e.stopped_by, e.n) == ("max_samples", 10)

    m = FakeMachine(seed=0, jitter=0.5)  # the minimum holds even when the budget is spent
    e = sample_until(m.sampler("A", 1.0), Protocol(rel_width=1e-6, budget_s=0.0, clock=m.clock))
    assert e.n == 6 and e.confidence >= CONFIDENCE


def test_timer_repeats_short_calls_within_a_sample():
    m = FakeMachine(seed=0, jitter=0.0, burst_p=0.0, drift=0.0)
    sample = timer(lambda: m.work("k", 0.1), "cpu", clock=m.clock, min_sample_ms=1.0)
    m.log.clear()
    assert sample() == pytest.approx(0.1) and len(m.log) == 10


def test_bad_samples_and_protocols_raise():
    with pytest.raises(ValueError, match="non-positive"):
        paired_ratio(lambda: 1.0, lambda: 0.0, Protocol(warmup=0))
    with pytest.raises(ValueError, match="rel_width"):
        Protocol(rel_width=0)
    with pytest.raises(ValueError, match="min_samples"):
        Protocol(min_samples=5, max_samples=2)
    with pytest.raises(ValueError, match="budget_s"):
        Protocol(budget_s=-1)


def test_an_estimate_is_never_formatted_without_its_interval():
    e = Estimate(2.0, 1.8, 2.5, 12, 0.96, "width", "x")
    assert format_estimate(e) == "2x [1.8, 2.5] (n=12)" == str(e)
    inv = e.reciprocal(1.0, "1/x")
    assert (inv.median, inv.low, inv.high) == (0.5, 0.4, 1 / 1.8)
    for bare in (2.0, {"median": 2.0}, None):
        with pytest.raises(ValueError, match="interval"):
            format_estimate(bare, "speedup")
