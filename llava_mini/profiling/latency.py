"""Latency: each stage alone, time to first token (prefill), and decode steps inside a generation.

Every figure is an :class:`~llava_mini.profiling.estimate.Estimate` (a median with its confidence
interval) drawn under a :class:`~llava_mini.profiling.estimate.Protocol` (sampled until the interval
is narrow enough or a time budget runs out). Times come from CUDA events on a GPU and
``time.perf_counter`` on the CPU. Comparing two of these functions is ``estimate.paired_ratio``'s job.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import replace
from typing import Callable

import torch

from llava_mini.lmm.config import IMAGE_TOKEN_INDEX
from llava_mini.profiling.estimate import Estimate, Protocol, estimate_of, sample_until, timer


def measure(fn: Callable[[], object], device: torch.device | str, protocol: Protocol | None = None,
            clock: Callable[[], float] | None = None) -> Estimate:
    """The time of ``fn()`` in ms, a median with its interval, sampled under ``protocol``."""
    return sample_until(timer(fn, device, clock), protocol)


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


def stage_fns(model, batch: int = 1, prompt_len: int = 43, backend: str | None = None) -> dict[str, Callable]:
    """One callable per stage of a LlavaMini (or LlavaBaseline) prefill, on random inputs, each run
    on ``backend`` without autograd (ready to be timed alone or side by side).

    Stage names follow ``profiling.flops.STAGES``: LlavaMini: vision_encoder, compressor, projector,
    prefusion (with the model's savings), llm_prefill; LlavaBaseline: vision_encoder, projector,
    llm_prefill. Both add ``projector_576`` (the projector on the 576 CLIP tokens alone: the same work
    in both models) and ``prefill`` (encode + LLM: the time to first token).
    """
    pixels, ids = random_inputs(model, batch, prompt_len)
    fns: dict[str, Callable] = {}
    with torch.no_grad(), model.backend_scope(backend):
        if hasattr(model, "compressor"):
            r, g = model.config.resolution_ratio, model.config.grid
            crops = pixels if r == 1 else pixels.flatten(0, 1)
            clip = model.vision_features(crops)
            feats = model.tile_crops(clip.view(batch, r * r + 1, g * g, -1)) if r > 1 else clip
            compressed = model.compressor(feats)
            vision, compressed_embeds = model.embed_vision(pixels)
            fns["vision_encoder"] = lambda: model.vision_features(crops)
            fns["compressor"] = lambda: model.compressor(feats)
            fns["projector"] = lambda: (model.mm_projector(feats), model.mm_projector(compressed))
            fns["projector_576"] = lambda: model.mm_projector(clip)
            if model.savings.prefix_split:
                fns["prefusion"] = lambda: model.fuse_text(
                    model.prefusion.prefix(vision, compressed_embeds, model.savings.prune_last_layer), ids)
            else:
                fns["prefusion"] = lambda: model.fuse_reference(vision, compressed_embeds, ids)
        else:
            towers = model.model.model
            feats = towers.vision_tower(pixels, output_hidden_states=True).hidden_states[
                model.config.vision_feature_layer][:, 1:]
            fns["vision_encoder"] = lambda: towers.vision_tower(pixels, output_hidden_states=True)
            fns["projector"] = fns["projector_576"] = lambda: towers.multi_modal_projector(feats)
        llm_input = model.encode(pixels, ids)
        fns["llm_prefill"] = lambda: run_llm(model, llm_input)
        fns["prefill"] = lambda: prefill(model, ids, pixels)

    def on_backend(fn):
        def run():
            with torch.no_grad(), model.backend_scope(backend):
                return fn()
        return run

    return {name: on_backend(fn) for name, fn in fns.items()}


def stage_timings(model, batch: int = 1, prompt_len: int = 43, protocol: Protocol | None = None,
                  backend: str | None = None) -> dict[str, Estimate]:
    """Each stage of ``stage_fns`` timed alone (ms, median with interval)."""
    return {name: measure(fn, model.device, protocol) for name, fn in stage_fns(model, batch, prompt_len, backend).items()}


def language_model(model):
    """The transformers LLM of a LlavaMini (``LlamaForCausalLM``) or LlavaBaseline (the LLaVA model)."""
    return model.llm if hasattr(model, "llm") else model.model


def run_llm(model, prompt, use_cache: bool = False):
    """The LLM prefill of a LlavaMini or LlavaBaseline on an ``LLMInput`` (last position's logits),
    inside the baseline's reduction scope (where FastV prunes)."""
    scope = model.reduction_scope(prompt) if hasattr(model, "reduction_scope") else contextlib.nullcontext()
    with scope:
        return language_model(model)(inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask,
                                     position_ids=prompt.position_ids, logits_to_keep=1, use_cache=use_cache)


@torch.no_grad()
def prefill(model, ids, images=None, videos=None, backend: str | None = None, use_cache: bool = False):
    """Encode + LLM prefill (the time to first token), both on ``backend``; returns the LLM output."""
    media = {} if videos is None else {"videos": videos}
    with model.backend_scope(backend):
        return run_llm(model, model.encode(images, ids, **media), use_cache)


@contextlib.contextmanager
def llm_call_marks(model, clock: Callable[[], float] | None = None):
    """Record a mark when the block starts and one at the end of every LLM forward inside it.

    The marks are taken by a forward hook on the LLM's output head, so they work for any decoding
    loop that calls the LLM (a hand-written one or transformers' ``generate``). Yields a list that
    ``mark_intervals`` turns into ms: the first interval is encode + prefill (time to first token),
    every later one a decode step. CUDA events on a GPU, else ``clock`` (default ``perf_counter``).
    """
    use_events = clock is None and model.device.type == "cuda"
    clock = clock or time.perf_counter
    marks: list = []

    def mark(*_):
        if use_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append(event)
        else:
            marks.append(clock())

    hook = language_model(model).get_output_embeddings().register_forward_hook(mark)
    mark()
    try:
        yield marks
    finally:
        hook.remove()


def mark_intervals(marks: list) -> list[float]:
    """Milliseconds between consecutive marks of ``llm_call_marks`` (synchronises CUDA first)."""
    if marks and isinstance(marks[0], torch.cuda.Event):
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    return [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]


class Generations:
    """A sampler for decoding: each call runs one greedy generation of ``new_tokens`` tokens and
    returns the median of its decode steps (ms); every generation's time to first token and step
    times are kept (``ttft_ms``, ``steps_ms``)."""

    def __init__(self, model, batch: int = 1, prompt_len: int = 43, new_tokens: int = 32, backend: str | None = None,
                 clock: Callable[[], float] | None = None):
        if new_tokens < 2:
            raise ValueError(f"new_tokens: expected >= 2 (a prefill and at least one decode step), got {new_tokens}")
        self.model, self.batch, self.new_tokens, self.backend, self.clock = model, batch, new_tokens, backend, clock
        self.pixels, self.ids = random_inputs(model, batch, prompt_len)
        self.ttft_ms: list[float] = []
        self.steps_ms: list[list[float]] = []

    def warm_up(self, generations: int = 1) -> None:
        """Run ``generations`` unrecorded generations (compilation, caches, autotuning)."""
        for _ in range(generations):
            self()
        self.ttft_ms.clear()
        self.steps_ms.clear()

    def __call__(self) -> float:
        with llm_call_marks(self.model, self.clock) as marks:
            self.model.generate(self.pixels, self.ids, max_new_tokens=self.new_tokens, eos_token_id=None,
                                backend=self.backend)
        times = mark_intervals(marks)
        if len(times) != self.new_tokens:
            raise RuntimeError(f"decode: recorded {len(times)} LLM calls for {self.new_tokens} new tokens; "
                               "expected one prefill and one call per further token")
        self.ttft_ms.append(times[0])
        self.steps_ms.append(times[1:])
        return statistics.median(times[1:])

    def rates(self, stopped_by: str, confidence: float | None = None) -> dict:
        """Over the generations run so far: ms per decode step (each generation's median step),
        tokens/s per sequence and for the batch, and the time to first token; all Estimates' dicts."""
        kw = {} if confidence is None else {"confidence": confidence}
        step = estimate_of([statistics.median(s) for s in self.steps_ms], stopped_by, "ms", **kw)
        return {"ms_per_token": step.to_dict(),
                "tokens_per_s": step.reciprocal(1e3, "tokens/s").to_dict(),
                "batch_tokens_per_s": step.reciprocal(1e3 * self.batch, "tokens/s").to_dict(),
                "ttft_ms": estimate_of(self.ttft_ms, stopped_by, "ms", **kw).to_dict(),
                "new_tokens": self.new_tokens, "batch": self.batch}


def decode_rate(model, batch: int = 1, prompt_len: int = 43, new_tokens: int = 32, backend: str | None = None,
                protocol: Protocol | None = None, clock: Callable[[], float] | None = None) -> dict:
    """Decode speed from the step times inside each generation (never from differences of runs):
    generations are repeated under ``protocol`` (one warm-up generation first); see ``Generations.rates``."""
    protocol = protocol or Protocol()
    gens = Generations(model, batch, prompt_len, new_tokens, backend, clock)
    gens.warm_up(protocol.warmup)
    rate = sample_until(gens, replace(protocol, warmup=0))
    return gens.rates(rate.stopped_by, protocol.confidence)
