"""Latency instruments run on the CPU and label their clock (timings are printed, never asserted)."""

import pytest
import torch

from llava_mini.lmm import LlavaMini
from llava_mini.lmm.baseline import LlavaBaseline
from llava_mini.profiling.latency import decode_rate, measure, stage_timings


def test_measure_reports_median_and_spread():
    t = measure(lambda: sum(range(1000)), "cpu", warmup=1, repeats=5)
    assert t.clock == "cpu" and t.repeats == 5 and t.p10_ms <= t.median_ms <= t.p90_ms
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, "cpu", repeats=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-hd"])
def test_stage_timings_cover_every_mini_stage(preset):
    torch.manual_seed(0)
    timings = stage_timings(LlavaMini.from_preset(preset), batch=2, prompt_len=6, warmup=0, repeats=1)
    assert set(timings) == {"vision_encoder", "compressor", "projector", "prefusion", "llm_prefill", "encode", "prefill"}
    print({k: round(v.median_ms, 3) for k, v in timings.items()})


def test_stage_timings_and_decode_for_the_baseline():
    torch.manual_seed(0)
    model = LlavaBaseline.from_preset("tiny")
    timings = stage_timings(model, batch=1, prompt_len=6, warmup=0, repeats=1)
    assert set(timings) == {"vision_encoder", "projector", "llm_prefill", "encode", "prefill"}
    rate = decode_rate(model, batch=2, prompt_len=6, new_tokens=4, warmup=0, repeats=1)
    assert rate["clock"] == "cpu" and rate["tokens_per_s"] > 0
    print(rate)
