"""What the LLM receives, and the one decoding path shared by LLaVA-Mini and the 576-token baseline.

Decoding itself is transformers' ``generate`` (greedy, sampling, beam search, logits processors,
stopping criteria, streamers, static caches, compiled steps). What stays here is what it lacks:
a left-padded batch built from per-prompt embeddings of different lengths (``LLMInput``), which
both models' ``encode`` produce, and one function both models decode through, so the two sides of
a comparison run the same loop with the same arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig


@dataclass
class LLMInput:
    """The LLM's prefill input: left-padded embeddings, their mask and positions.

    ``inputs_embeds`` [B, T, d]; ``attention_mask`` [B, T] (1 = token); ``position_ids`` [B, T];
    ``image_mask`` [B, T] (True at vision tokens) where the encoder records it (the baseline's FastV
    reads it).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    image_mask: torch.Tensor | None = None

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


def generate(llm: nn.Module, prompt: LLMInput, generation_config: GenerationConfig | None = None, **kwargs):
    """Decode from ``prompt`` with transformers' ``llm.generate`` (a causal LM or a LLaVA model).

    ``generation_config`` and ``kwargs`` (``max_new_tokens``, ``do_sample``, ``temperature``,
    ``top_k``, ``top_p``, ``num_beams``, ``repetition_penalty``, ``eos_token_id``, ``use_cache``,
    ``cache_implementation``, ``streamer``, ``stopping_criteria``, ``stop_strings`` with
    ``tokenizer``, ...) are transformers' own; unset options fall back to ``llm.generation_config``.

    Returns the new tokens [B, n] only (n <= max_new_tokens; the prompt is embeddings, it has no
    ids): a row that ended early is padded with the pad id; the output object with
    ``return_dict_in_generate=True``.
    """
    if not isinstance(prompt, LLMInput):
        raise TypeError(f"prompt: expected an LLMInput, got {type(prompt).__name__}")
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError(f"generation_config: expected a transformers GenerationConfig, got {type(generation_config).__name__}")
    # transformers skips top-p filtering for top_p >= 1 instead of refusing values above 1.
    top_p = kwargs.get("top_p", getattr(generation_config, "top_p", None))
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")
    return llm.generate(inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask,
                        generation_config=generation_config, **kwargs)
