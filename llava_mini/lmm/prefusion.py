"""Pre-fusion: decoder layers over [vision ; compressed ; text] that fuse vision into the text.

Causal attention means the vision and compressed rows never see the text. Two exact savings follow:

- **prefix split** (``Prefix``): run the vision + compressed rows once per image and keep each
  layer's keys/values; a question then runs only its text rows against that prefix, so a second
  question about the same image pays only for its text.
- **pruned last layer**: only the compressed and text rows of the last layer are used, so the vision
  rows there only contribute keys/values (no attention output, no MLP).

``PreFusion.reference`` is the released computation (all rows, all layers) they are checked against.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding, rotate_half


# The decoder layer's cache argument: ``cache`` from transformers 5.25 (``past_key_values`` is
# deprecated there), ``past_key_values`` before. Read from the installed signature, once.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"


def attention_mask_for(impl: str, key_valid: torch.Tensor, q_len: int, dtype: torch.dtype):
    """The mask a transformers attention implementation expects for bottom-right causal attention.

    ``key_valid`` [B, Lk] marks real (non-padding) keys; query i of ``q_len`` sees key j when
    ``j <= i + Lk - q_len`` and the key is valid. eager takes an additive 4-D mask, sdpa a boolean
    4-D mask, the kernel backends (llava_mini_triton, flash_attention_2) the 2-D key mask.
    """
    if impl not in ("eager", "sdpa"):
        return None if bool(key_valid.all()) else key_valid.long()
    k_len = key_valid.shape[1]
    q = torch.arange(q_len, device=key_valid.device)[:, None]
    k = torch.arange(k_len, device=key_valid.device)[None, :]
    allowed = (k <= q + (k_len - q_len))[None, None] & key_valid[:, None, None, :].bool()
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


class KVRecorder:
    """A stand-in KV cache: layers call ``update``; it prepends a stored prefix and keeps what it returns."""

    def __init__(self, prefix_keys=None, prefix_values=None):
        self.prefix_keys = prefix_keys or {}
        self.prefix_values = prefix_values or {}
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        if layer_idx in self.prefix_keys:
            key = torch.cat([self.prefix_keys[layer_idx], key], dim=2)
            value = torch.cat([self.prefix_values[layer_idx], value], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value


@dataclass
class Prefix:
    """The text-independent part of pre-fusion for a batch of images (or video frames).

    ``compressed`` [B, C^2, d]: the pre-fused compressed tokens (what the LLM receives);
    ``keys``/``values``: per layer [B, Hkv, P, hd] for the P = N + C^2 prefix rows, which text rows
    attend to. Reuse it for further questions about the same images.
    """

    compressed: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def index(self, rows) -> "Prefix":
        """The prefix of a subset / repetition of its batch rows (an index tensor or slice)."""
        return Prefix(self.compressed[rows], [k[rows] for k in self.keys], [v[rows] for v in self.values])

    @staticmethod
    def cat(prefixes: list["Prefix"]) -> "Prefix":
        return Prefix(torch.cat([p.compressed for p in prefixes]),
                      [torch.cat(ks) for ks in zip(*(p.keys for p in prefixes))],
                      [torch.cat(vs) for vs in zip(*(p.values for p in prefixes))])


class PreFusion(nn.Module):
    """The pre-fusion decoder layers (``LlamaDecoderLayer``, released weights) and their RoPE."""

    def __init__(self, config, num_layers: int):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, layer_idx=i) for i in range(num_layers)])
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        # Gradient checkpointing (``LlavaMini.gradient_checkpointing_enable``): a function
        # checkpoint(fn, x) -> fn(x) recomputed in the backward, or None. Done here, not by
        # transformers' layer switch, which would drop the KV recorder the prefix split needs.
        self.checkpoint = None

    def run_layers(self, x, position_ids, key_valid, layers, past: KVRecorder | None = None):
        """Run ``layers`` over rows ``x`` [B, Lq, d] whose keys are [past prefix ; x] (validity ``key_valid``)."""
        mask = attention_mask_for(self.config._attn_implementation, key_valid, x.shape[1], x.dtype)
        pos_emb = self.rotary_emb(x, position_ids)
        checkpointing = self.checkpoint is not None and self.training and torch.is_grad_enabled()
        for layer in layers:
            call = functools.partial(layer, attention_mask=mask, position_ids=position_ids,
                                     position_embeddings=pos_emb, **{CACHE_KWARG: past})
            # the recompute calls the recorder again with the same keys/values: same result
            x = self.checkpoint(call, x) if checkpointing else call(x)
        return x

    def project_kv(self, layer, x, position_ids):
        """Only the keys/values a layer would make from rows ``x``: [B, Hkv, L, hd] each."""
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        shape = (*x.shape[:2], -1, attn.head_dim)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        cos, sin = self.rotary_emb(x, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return k * cos + rotate_half(k) * sin, v

    def reference(self, x, valid, prune_last_layer: bool = False, keep_last: int | None = None):
        """The released pre-fusion: all layers over all rows of x [B, L, d] (``valid`` [B, L]).

        Positions are ``cumsum(valid) - 1`` (1 at padding, as released). With ``prune_last_layer``
        the last layer computes only the last ``keep_last`` rows; the others give only keys/values.
        Returns the rows computed by the last layer.
        """
        position_ids = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)
        if not self.layers:
            return x if keep_last is None else x[:, -keep_last:]
        if not prune_last_layer or keep_last is None:
            out = self.run_layers(x, position_ids, valid, self.layers)
            return out if keep_last is None else out[:, -keep_last:]
        x = self.run_layers(x, position_ids, valid, self.layers[:-1])
        cut = x.shape[1] - keep_last
        last = self.layers[-1]
        k, v = self.project_kv(last, x[:, :cut], position_ids[:, :cut])
        past = KVRecorder({last.self_attn.layer_idx: k}, {last.self_attn.layer_idx: v})
        return self.run_layers(x[:, cut:], position_ids[:, cut:], valid, [last], past)

    def prefix(self, vision, compressed, prune_last_layer: bool = True) -> Prefix:
        """Pre-fuse the text-independent rows [vision ; compressed] once; keep every layer's keys/values."""
        x = torch.cat([vision, compressed], dim=1)
        batch, length = x.shape[:2]
        position_ids = torch.arange(length, device=x.device).expand(batch, length)
        valid = torch.ones(batch, length, dtype=torch.bool, device=x.device)
        rec = KVRecorder()
        if not self.layers:
            return Prefix(compressed, [], [])
        x = self.run_layers(x, position_ids, valid, self.layers[:-1], rec)
        last = self.layers[-1]
        if prune_last_layer:
            cut = vision.shape[1]
            k, v = self.project_kv(last, x[:, :cut], position_ids[:, :cut])
            rec.prefix_keys, rec.prefix_values = {last.self_attn.layer_idx: k}, {last.self_attn.layer_idx: v}
            fused = self.run_layers(x[:, cut:], position_ids[:, cut:], valid, [last], rec)
        else:
            fused = self.run_layers(x, position_ids, valid, [last], rec)[:, vision.shape[1]:]
        order = sorted(rec.keys)
        return Prefix(fused, [rec.keys[i] for i in order], [rec.values[i] for i in order])

    def text(self, prefix: Prefix, text, text_valid):
        """Pre-fuse text rows [B, L, d] against a prefix (one prefix row per text row)."""
        if not self.layers:
            return text
        batch, p_len = text.shape[0], prefix.length
        position_ids = (p_len + text_valid.long().cumsum(-1) - 1).masked_fill(~text_valid, 1)
        key_valid = torch.cat([text_valid.new_ones(batch, p_len), text_valid], dim=1)
        idx = [layer.self_attn.layer_idx for layer in self.layers]
        past = KVRecorder(dict(zip(idx, prefix.keys)), dict(zip(idx, prefix.values)))
        return self.run_layers(text, position_ids, key_valid, self.layers, past)
