"""Synthetic checkpoints for serving tests and benchmarks (no weights can be downloaded here).

``write_checkpoint`` writes random weights at a preset's shapes in the released layout, with a
byte-level tokenizer (every string round-trips through it, as through real Llama tokenizers) and
the preset's chat template, so vLLM loads the directory like a released checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch


def byte_tokenizer(vocab_size: int):
    """A tokenizer over bytes: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, the 256 byte symbols, then filler
    tokens ``<xN>`` up to ``vocab_size`` (so any id a model emits has text). ``decode(encode(s)) == s``;
    like Llama's tokenizers it puts ``<s>`` first when asked for special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size: a byte tokenizer needs at least {len(vocab)} ids, got {vocab_size}")
    vocab.update({f"<x{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # BOS, as Llama's
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def write_checkpoint(path, preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                     **overrides):
    """Random weights of ``preset`` (``overrides`` as for ``LlavaMiniConfig.from_preset``) saved in the
    released layout with a byte-level tokenizer and the chat template; returns the model."""
    from llava_mini.lmm import LlavaMini
    from llava_mini.serving.templates import template_path

    torch.manual_seed(seed)
    model = LlavaMini.from_preset(preset, dtype=dtype, **overrides)
    model.tokenizer = byte_tokenizer(model.config.text["vocab_size"])
    model.tokenizer.chat_template = template_path(model.config.template).read_text()
    model.save_pretrained(Path(path))
    return model
