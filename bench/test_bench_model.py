"""Model suites (pytest-benchmark, GPU): LLaVA-Mini on each backend against the 576-token baseline.

Cases: a single image, batches of 16 and 64, an HD image, and 100- and 1,000-frame videos, each timed
as encode + LLM prefill (time to the first token) on random weights at the real shapes (bf16).

    pytest bench/test_bench_model.py --benchmark-enable --benchmark-json bench/results/<gpu>/model.json

The same comparison with FLOPs, VRAM and a report is ``llava-mini bench``.
"""

from __future__ import annotations

import pytest
import torch

from llava_mini.lmm import LlavaMini
from llava_mini.lmm.baseline import LlavaBaseline
from llava_mini.profiling.latency import prefill, random_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPT_LEN = 43


def timed_prefill(model, pixels, ids, backend, **media):
    """Encode + LLM prefill on ``backend``, synchronised so the benchmark times the GPU work."""
    out = prefill(model, ids, pixels, backend=backend, **media)
    torch.cuda.synchronize()
    return out


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    return LlavaMini.from_preset("llava-mini-vicuna-7b", dtype=torch.bfloat16, device="cuda")


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_mini_images(benchmark, mini, backend, batch):
    pixels, ids = random_inputs(mini, batch, PROMPT_LEN)
    benchmark.extra_info.update(model="llava-mini-vicuna-7b", backend=backend, batch=batch)
    benchmark.pedantic(timed_prefill, args=(mini, pixels, ids, backend), warmup_rounds=2, rounds=10)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("frames", [100, 1000])
def test_mini_video(benchmark, mini, backend, frames):
    s = mini.config.crop_size
    video = torch.randn(frames, 3, s, s)
    _, ids = random_inputs(mini, 1, PROMPT_LEN)
    benchmark.extra_info.update(model="llava-mini-vicuna-7b", backend=backend, frames=frames)
    benchmark.pedantic(timed_prefill, args=(mini, None, ids, backend), kwargs=dict(videos=[video]), warmup_rounds=1,
                       rounds=3)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_mini_hd(benchmark, backend):
    torch.manual_seed(0)
    model = LlavaMini.from_preset("llava-mini-hd-vicuna-7b", dtype=torch.bfloat16, device="cuda")
    pixels, ids = random_inputs(model, 1, PROMPT_LEN)
    benchmark.extra_info.update(model="llava-mini-hd-vicuna-7b", backend=backend, batch=1)
    benchmark.pedantic(timed_prefill, args=(model, pixels, ids, backend), warmup_rounds=2, rounds=10)
    del model
    torch.cuda.empty_cache()


@pytest.mark.parametrize("batch", [1, 16, 64])
def test_baseline_images(benchmark, batch):
    torch.manual_seed(0)
    model = LlavaBaseline.from_preset("llava-1.5-7b", dtype=torch.bfloat16, device="cuda")
    pixels, ids = random_inputs(model, batch, PROMPT_LEN)
    benchmark.extra_info.update(model="llava-1.5-7b", backend="sdpa", batch=batch)
    benchmark.pedantic(timed_prefill, args=(model, pixels, ids, "sdpa"), warmup_rounds=2, rounds=10)
    del model
    torch.cuda.empty_cache()
