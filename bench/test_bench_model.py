"""Model suites (pytest-benchmark, GPU): LLaVA-Mini against the 576-token baseline and backend against
backend, each comparison interleaved.

Cases, each timed as encode + LLM prefill (time to the first token) on random weights at the real
shapes (bf16): a single image and batches of 16 and 64 (LLaVA-Mini on each backend vs the baseline on
SDPA), an HD image and 100- and 1,000-frame videos (the Triton backend vs SDPA). Every figure is a
median with its 95% interval from ``estimate.paired_ratio`` (the two sides alternate, the ratio is
taken per pair), stored in the benchmark's ``extra_info`` and printed.

    pytest bench/test_bench_model.py -s --benchmark-enable --benchmark-json bench/results/<gpu>/model.json

The same comparison with FLOPs, VRAM and a report is ``llava-mini bench``.
"""

from __future__ import annotations

import pytest
import torch

from llava_mini.lmm import LlavaMini
from llava_mini.lmm.baseline import LlavaBaseline
from llava_mini.profiling.estimate import Protocol, format_estimate, paired_ratio, timer
from llava_mini.profiling.latency import prefill, random_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPT_LEN = 43
PROTOCOL = Protocol(rel_width=0.05, budget_s=5.0)


def prefill_timer(model, pixels, ids, backend, **media):
    """A sampler: encode + LLM prefill on ``backend``, timed with CUDA events."""
    return timer(lambda: prefill(model, ids, pixels, backend=backend, **media), "cuda")


def compare(benchmark, slow, fast, **info) -> None:
    """Run ``paired_ratio(slow, fast)`` once under pytest-benchmark; record and print its figures."""
    c = benchmark.pedantic(paired_ratio, args=(slow, fast, PROTOCOL), rounds=1, iterations=1)
    benchmark.extra_info.update(info, speedup=c.ratio.to_dict(), slow_ms=c.numerator.to_dict(),
                                fast_ms=c.denominator.to_dict())
    print(f"\n{info}: speedup {format_estimate(c.ratio)}, ms {format_estimate(c.denominator)} vs "
          f"{format_estimate(c.numerator)}")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    mini = LlavaMini.from_preset("llava-mini-vicuna-7b", dtype=torch.bfloat16, device="cuda")
    baseline = LlavaBaseline.from_preset("llava-1.5-7b", dtype=torch.bfloat16, device="cuda")
    yield mini, baseline
    del mini, baseline
    torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_mini_vs_baseline_images(benchmark, models, backend, batch):
    mini, baseline = models
    pixels, ids = random_inputs(mini, batch, PROMPT_LEN)
    compare(benchmark, prefill_timer(baseline, pixels, ids, "sdpa"), prefill_timer(mini, pixels, ids, backend),
            model="llava-mini-vicuna-7b vs llava-1.5-7b (sdpa)", backend=backend, batch=batch)


@pytest.mark.parametrize("frames", [100, 1000])
def test_mini_video_triton_vs_sdpa(benchmark, models, frames):
    mini, _ = models
    s = mini.config.crop_size
    video = torch.randn(frames, 3, s, s)
    _, ids = random_inputs(mini, 1, PROMPT_LEN)
    compare(benchmark, prefill_timer(mini, None, ids, "sdpa", videos=[video]),
            prefill_timer(mini, None, ids, "triton", videos=[video]),
            model="llava-mini-vicuna-7b", comparison="triton vs sdpa", frames=frames)


def test_mini_hd_triton_vs_sdpa(benchmark):
    torch.manual_seed(0)
    model = LlavaMini.from_preset("llava-mini-hd-vicuna-7b", dtype=torch.bfloat16, device="cuda")
    pixels, ids = random_inputs(model, 1, PROMPT_LEN)
    compare(benchmark, prefill_timer(model, pixels, ids, "sdpa"), prefill_timer(model, pixels, ids, "triton"),
            model="llava-mini-hd-vicuna-7b", comparison="triton vs sdpa", batch=1)
    del model
    torch.cuda.empty_cache()
