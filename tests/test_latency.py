"""Latency instruments on the CPU: every stage has a callable, every figure an interval, and the decode
rate comes from the step times inside a generation (checked exactly on a fake clock; no real timing
is asserted)."""

import pytest
import torch

from llava_mini.lmm import LlavaMini
from llava_mini.lmm.baseline import LlavaBaseline
from llava_mini.profiling.estimate import Protocol
from llava_mini.profiling.latency import Generations, decode_rate, language_model, measure, stage_timings

QUICK = Protocol(budget_s=0.0, min_samples=2, warmup=0)  # the structure, not the figures


def test_measure_reports_a_median_with_its_interval():
    t = measure(lambda: sum(range(1000)), "cpu", Protocol(budget_s=0.0))
    assert t.unit == "ms" and t.n == 6 and 0 < t.low <= t.median <= t.high


@pytest.mark.parametrize("preset", ["tiny", "tiny-hd"])
def test_stage_timings_cover_every_mini_stage(preset):
    torch.manual_seed(0)
    timings = stage_timings(LlavaMini.from_preset(preset), batch=2, prompt_len=6, protocol=QUICK)
    assert set(timings) == {"vision_encoder", "compressor", "projector", "projector_576", "prefusion", "llm_prefill",
                            "prefill"}
    print({k: str(v) for k, v in timings.items()})


def test_stage_timings_for_the_baseline():
    torch.manual_seed(0)
    timings = stage_timings(LlavaBaseline.from_preset("tiny"), batch=1, prompt_len=6, protocol=QUICK)
    assert set(timings) == {"vision_encoder", "projector", "projector_576", "llm_prefill", "prefill"}


class StepClock:
    """A fake clock that only moves inside LLM forwards: 5 ms for a prefill, 1 ms per decode step."""

    def __init__(self, model):
        self.t = 0.0
        self.calls = 0
        language_model(model).register_forward_pre_hook(self.advance, with_kwargs=True)

    def __call__(self) -> float:
        return self.t

    def advance(self, module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = kwargs["input_ids"] if x is None else x
        self.calls += 1
        self.t += (5.0 if x.shape[1] > 1 else 1.0) / 1e3


@pytest.mark.parametrize("cls", [LlavaMini, LlavaBaseline])
def test_decode_rate_comes_from_the_steps_inside_a_generation(cls):
    torch.manual_seed(0)
    model = cls.from_preset("tiny")
    clock = StepClock(model)
    rate = decode_rate(model, batch=2, prompt_len=6, new_tokens=5, protocol=Protocol(budget_s=0.0, clock=clock),
                       clock=clock)
    assert clock.calls == 5 * (1 + 6)  # one warm-up generation, then the minimum of 6
    assert rate["ms_per_token"]["median"] == pytest.approx(1.0)
    assert rate["ms_per_token"]["low"] == pytest.approx(1.0) == pytest.approx(rate["ms_per_token"]["high"])
    assert rate["tokens_per_s"]["median"] == pytest.approx(1000.0)
    assert rate["batch_tokens_per_s"]["median"] == pytest.approx(2000.0)
    assert rate["ttft_ms"]["median"] == pytest.approx(5.0)
    assert rate["ms_per_token"]["n"] == 6


def test_a_generation_that_stops_early_is_an_error(monkeypatch):
    torch.manual_seed(0)
    model = LlavaMini.from_preset("tiny")
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: generate(*a, **{**k, "max_new_tokens": 3}))
    with pytest.raises(RuntimeError, match="recorded 3 LLM calls for 5 new tokens"):
        Generations(model, batch=1, prompt_len=6, new_tokens=5)()
    with pytest.raises(ValueError, match="new_tokens"):
        Generations(model, new_tokens=1)
