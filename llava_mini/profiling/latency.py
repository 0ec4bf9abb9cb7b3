"""Latency: each stage alone, time to first token (prefill) and decode tokens per second.

On CUDA, times come from CUDA events after warm-up; on the CPU from ``time.perf_counter`` and are
labeled ``cpu``. Every result carries the median and the spread (p10, p90) over its repeats.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from llava_mini.lmm.config import IMAGE_TOKEN_INDEX


@dataclass
class Timing:
    """Milliseconds over ``repeats`` runs of one thing, measured on ``clock`` ("cuda" or "cpu")."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    clock: str

    def to_dict(self) -> dict:
        return asdict(self)


def measure(fn: Callable[[], object], device: torch.device | str, warmup: int = 2, repeats: int = 5) -> Timing:
    """Time ``fn()``: CUDA events on a GPU (synchronised), wall clock on the CPU."""
    device = torch.device(device)
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup/repeats: expected warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return Timing(statistics.median(times), q[0], q[-1], repeats, device.type)


def random_inputs(model, batch: int, prompt_len: int, seed: int = 0):
    """Ready pixel values [B, ...] and prompts of ``prompt_len`` ids with the image placeholder second."""
    g = torch.Generator().manual_seed(seed)
    s, r = model.config.crop_size, model.config.resolution_ratio
    shape = (batch, 3, s, s) if r == 1 else (batch, r * r + 1, 3, s, s)
    pixels = torch.randn(shape, generator=g).to(model.device, model.dtype)
    vocab = model.config.text["vocab_size"]
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)
    ids[:, 1] = IMAGE_TOKEN_INDEX
    return pixels, ids.tolist()


@torch.no_grad()
def stage_timings(model, batch: int = 1, prompt_len: int = 43, warmup: int = 2, repeats: int = 5,
                  backend: str | None = None) -> dict[str, Timing]:
    """Each stage of a LlavaMini (or LlavaBaseline) prefill alone, on random inputs.

    Stage names follow ``profiling.flops.STAGES``: LlavaMini: vision_encoder, compressor, projector,
    prefusion (with the model's savings), llm_prefill; LlavaBaseline: vision_encoder, projector,
    llm_prefill. Both add encode (all but the LLM) and prefill (encode + LLM: time to first token).
    """
    pixels, ids = random_inputs(model, batch, prompt_len)
    run = lambda fn: measure(fn, model.device, warmup, repeats)  # noqa: E731
    out: dict[str, Timing] = {}
    is_mini = hasattr(model, "compressor")
    with model.backend_scope(backend):
        if is_mini:
            r, g = model.config.resolution_ratio, model.config.grid
            crops = pixels if r == 1 else pixels.flatten(0, 1)
            feats = model.vision_features(crops)
            if r > 1:  # the compressor sees the tiled crops
                feats = model.tile_crops(feats.view(batch, r * r + 1, g * g, -1))
            compressed = model.compressor(feats)
            vision, compressed_embeds = model.embed_vision(pixels)
            out["vision_encoder"] = run(lambda: model.vision_features(crops))
            out["compressor"] = run(lambda: model.compressor(feats))
            out["projector"] = run(lambda: (model.mm_projector(feats), model.mm_projector(compressed)))
            if model.savings.prefix_split:
                out["prefusion"] = run(lambda: model.fuse_text(
                    model.prefusion.prefix(vision, compressed_embeds, model.savings.prune_last_layer), ids))
            else:
                out["prefusion"] = run(lambda: model.fuse_reference(vision, compressed_embeds, ids))
        else:
            towers = model.model.model
            feats = towers.vision_tower(pixels, output_hidden_states=True).hidden_states[
                model.config.vision_feature_layer][:, 1:]
            out["vision_encoder"] = run(lambda: towers.vision_tower(pixels, output_hidden_states=True))
            out["projector"] = run(lambda: towers.multi_modal_projector(feats))
        prompt = model.encode(pixels, ids)
        out["llm_prefill"] = run(lambda: run_llm(model, prompt))
        out["encode"] = run(lambda: model.encode(pixels, ids))
        out["prefill"] = run(lambda: prefill(model, ids, pixels))
    return out


def run_llm(model, prompt, use_cache: bool = False):
    """The LLM prefill of a LlavaMini or LlavaBaseline on an ``LLMInput`` (last position's logits)."""
    llm = model.llm if hasattr(model, "llm") else model.model
    return llm(inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask,
               position_ids=prompt.position_ids, logits_to_keep=1, use_cache=use_cache)


@torch.no_grad()
def prefill(model, ids, images=None, videos=None, backend: str | None = None, use_cache: bool = False):
    """Encode + LLM prefill (the time to first token), both on ``backend``; returns the LLM output."""
    media = {} if videos is None else {"videos": videos}
    with model.backend_scope(backend):
        return run_llm(model, model.encode(images, ids, **media), use_cache)


@torch.no_grad()
def decode_rate(model, batch: int = 1, prompt_len: int = 43, new_tokens: int = 32, warmup: int = 1,
                repeats: int = 3, backend: str | None = None, cache_implementation: str | None = None) -> dict:
    """Decode throughput with the KV cache: tokens per second per sequence and for the batch.

    The time of a ``new_tokens`` generation minus that of a 2-token one, over ``new_tokens - 2``:
    the decode steps alone (prefill and the first step cancel). ``cache_implementation`` is
    transformers' ("static": a fixed-address cache; on CUDA transformers then compiles the step).
    ``ttft_ms`` is a 1-token generation: encode + prefill.
    """
    if new_tokens < 3:
        raise ValueError(f"new_tokens: expected >= 3, got {new_tokens}")
    pixels, ids = random_inputs(model, batch, prompt_len)
    gen = lambda n: model.generate(pixels, ids, max_new_tokens=n, eos_token_id=None, backend=backend,  # noqa: E731
                                   cache_implementation=cache_implementation)
    first = measure(lambda: gen(1), model.device, warmup, repeats)
    base = measure(lambda: gen(2), model.device, warmup, repeats)
    full = measure(lambda: gen(new_tokens), model.device, warmup, repeats)
    step_ms = max(full.median_ms - base.median_ms, 1e-9) / (new_tokens - 2)
    return {"ttft_ms": first.median_ms, "ms_per_token": step_ms, "tokens_per_s": 1e3 / step_ms,
            "batch_tokens_per_s": batch * 1e3 / step_ms, "clock": full.clock, "cache_implementation": cache_implementation}
