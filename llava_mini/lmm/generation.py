"""What the LLM receives, and decoding from it: shared by LLaVA-Mini and the 576-token baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LLMInput:
    """The LLM's prefill input: left-padded embeddings, their mask and positions.

    ``inputs_embeds`` [B, T, d]; ``attention_mask`` [B, T] (1 = token); ``position_ids`` [B, T].
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def lengths(self) -> list[int]:
        return self.attention_mask.sum(-1).tolist()

    @classmethod
    def left_pad(cls, sequences: list[torch.Tensor]) -> "LLMInput":
        """Stack per-sample embeddings [T_i, d] into a left-padded batch."""
        longest = max(s.shape[0] for s in sequences)
        first = sequences[0]
        embeds = first.new_zeros(len(sequences), longest, first.shape[-1])
        mask = torch.zeros(len(sequences), longest, dtype=torch.long, device=first.device)
        for i, s in enumerate(sequences):
            embeds[i, longest - s.shape[0]:] = s
            mask[i, longest - s.shape[0]:] = 1
        return cls(embeds, mask)


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
               top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token from logits [B, V]: argmax, or a sample after temperature / top-k / top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def check_sampling(max_new_tokens: int, temperature: float, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected a positive int or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")


class StaticKV:
    """A fixed-address KV cache: every decode step writes at ``length``, nothing is reallocated.

    Duck-typed for transformers' attention layers (they only call ``update``). The buffers hold
    ``max_len`` positions; ``key_valid`` [B, max_len] marks the filled, non-padding ones, so a decode
    step is the same computation at every length and can be captured once as a CUDA graph.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor, max_len: int):
        b, t = valid.shape
        self.keys = [k.new_zeros(*k.shape[:2], max_len, k.shape[3]) for k in keys]
        self.values = [v.new_zeros(*v.shape[:2], max_len, v.shape[3]) for v in values]
        for buf, src in zip(self.keys + self.values, keys + values):
            buf[:, :, :t] = src
        self.key_valid = torch.zeros(b, max_len, dtype=torch.bool, device=valid.device)
        self.key_valid[:, :t] = valid.bool()
        self.length = torch.tensor(t, device=valid.device)  # a tensor: read on the device, not in Python

    def update(self, key, value, layer_idx, *args, **kwargs):
        at = self.length.view(1)
        self.keys[layer_idx].index_copy_(2, at, key)
        self.values[layer_idx].index_copy_(2, at, value)
        return self.keys[layer_idx], self.values[layer_idx]


def cache_tensors(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer keys and values [B, Hkv, T, hd] of a transformers DynamicCache."""
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def decoder_parts(llm: nn.Module):
    """(decoder with .layers/.norm/.rotary_emb, lm_head) of a LlamaForCausalLM or a LLaVA model."""
    decoder = llm.model if hasattr(llm.model, "layers") else llm.model.language_model
    return decoder, llm.lm_head


def static_step(llm: nn.Module, cache: StaticKV, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """One decode step [B, 1, d] -> next-token logits [B, V] against a StaticKV (advances it).

    Runs the decoder layers directly with a key mask in the format of the configured attention
    implementation, so no step depends on Python-side lengths (CUDA-graph safe).
    """
    decoder, lm_head = decoder_parts(llm)
    cache.key_valid.index_fill_(1, cache.length.view(1), True)
    impl = decoder.config._attn_implementation
    if impl == "eager":
        mask = torch.zeros(cache.key_valid.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(
            ~cache.key_valid, torch.finfo(embeds.dtype).min)[:, None, None, :]
    elif impl == "sdpa":
        mask = cache.key_valid[:, None, None, :]
    else:  # the kernel backends take the 2-D key mask; queries are the last position (bottom-right)
        mask = cache.key_valid
    hidden = embeds
    pos_emb = decoder.rotary_emb(hidden, position_ids)
    for layer in decoder.layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                       position_embeddings=pos_emb)
    cache.length += 1
    return lm_head(decoder.norm(hidden[:, -1]))


class GraphedStep:
    """``static_step`` captured once as a CUDA graph and replayed for every decode step."""

    def __init__(self, llm: nn.Module, cache: StaticKV, embeds: torch.Tensor, position_ids: torch.Tensor):
        self.embeds, self.position_ids = embeds.clone(), position_ids.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = static_step(llm, cache, self.embeds, self.position_ids)
            self.position_ids += 1

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        self.embeds.copy_(embeds)
        self.graph.replay()
        return self.logits


@torch.no_grad()
def generate(llm: nn.Module, prompt: LLMInput, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop_token_ids: list[int] | None = None, pad_token_id: int = 0, use_cache: bool = True,
             generator: torch.Generator | None = None, static_cache: bool = False,
             cuda_graph: bool = False) -> torch.Tensor:
    """Decode up to ``max_new_tokens`` from a causal LM fed with embeddings.

    Returns the new tokens [B, n] (n <= max_new_tokens); a row that met a stop token is padded
    with ``pad_token_id`` after it. Decode steps run with transformers' DynamicCache by default;
    ``static_cache`` uses a fixed-address cache (``StaticKV``), and ``cuda_graph`` (CUDA only)
    captures that step once and replays it. ``use_cache=False`` recomputes the whole sequence at
    every step (the check that the cache changes nothing).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    static_cache = static_cache or cuda_graph
    if static_cache and not use_cache:
        raise ValueError("static_cache/cuda_graph: need use_cache=True")
    if cuda_graph and prompt.inputs_embeds.device.type != "cuda":
        raise ValueError(f"cuda_graph: needs a CUDA device, the model is on {prompt.inputs_embeds.device.type}")
    embed = llm.get_input_embeddings()
    stops = torch.tensor(stop_token_ids or [], device=prompt.inputs_embeds.device, dtype=torch.long)
    embeds, mask = prompt.inputs_embeds, prompt.attention_mask
    positions = prompt.position_ids
    done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=use_cache,
              logits_to_keep=1)
    logits = out.logits[:, -1]
    cache = out.past_key_values if use_cache else None
    graphed = None
    if static_cache:
        cache = StaticKV(*cache_tensors(cache), mask, embeds.shape[1] + max_new_tokens)
    tokens = []
    for step in range(max_new_tokens):
        token = next_token(logits, do_sample, temperature, top_k, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        done |= torch.isin(token, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        new = embed(token)[:, None].to(embeds.dtype)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        next_pos = positions[:, -1:] + 1
        positions = torch.cat([positions, next_pos], dim=1)
        if cuda_graph:
            graphed = graphed or capture_step(llm, cache, new, next_pos)
            logits = graphed(new)
        elif static_cache:
            logits = static_step(llm, cache, new, next_pos)
        elif use_cache:
            out = llm(inputs_embeds=new, attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
            cache, logits = out.past_key_values, out.logits[:, -1]
        else:
            embeds = torch.cat([embeds, new], dim=1)
            logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
                         logits_to_keep=1).logits[:, -1]
    return torch.stack(tokens, dim=1)


def capture_step(llm: nn.Module, cache: StaticKV, embeds: torch.Tensor, position_ids: torch.Tensor) -> GraphedStep:
    """Warm the step up on a side stream (kernels compiled, autotuned), restore the cache, capture."""
    length, valid = cache.length.clone(), cache.key_valid.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            static_step(llm, cache, embeds, position_ids)
            cache.length.copy_(length)
            cache.key_valid.copy_(valid)
    torch.cuda.current_stream().wait_stream(stream)
    return GraphedStep(llm, cache, embeds, position_ids)
