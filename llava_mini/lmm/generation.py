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


@torch.no_grad()
def generate(llm: nn.Module, prompt: LLMInput, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop_token_ids: list[int] | None = None, pad_token_id: int = 0, use_cache: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Decode up to ``max_new_tokens`` from a causal LM fed with embeddings.

    Returns the new tokens [B, n] (n <= max_new_tokens); a row that met a stop token is padded
    with ``pad_token_id`` after it. With ``use_cache=False`` every step recomputes the whole
    sequence (the check that the KV cache changes nothing).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    embed = llm.get_input_embeddings()
    stops = torch.tensor(stop_token_ids or [], device=prompt.inputs_embeds.device, dtype=torch.long)
    embeds, mask = prompt.inputs_embeds, prompt.attention_mask
    positions = prompt.position_ids
    done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=use_cache,
              logits_to_keep=1)
    cache = out.past_key_values if use_cache else None
    tokens = []
    for step in range(max_new_tokens):
        token = next_token(out.logits[:, -1], do_sample, temperature, top_k, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        done |= torch.isin(token, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        new = embed(token)[:, None].to(embeds.dtype)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        next_pos = positions[:, -1:] + 1
        positions = torch.cat([positions, next_pos], dim=1)
        if use_cache:
            out = llm(inputs_embeds=new, attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
        else:
            embeds = torch.cat([embeds, new], dim=1)
            out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
                      logits_to_keep=1)
    return torch.stack(tokens, dim=1)
