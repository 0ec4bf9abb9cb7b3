"""Training-free vision-token reduction on the LLaVA-1.5 baseline: FastV (prune inside the LLM) and
VisionZip (select and merge inside CLIP), computed as their authors' code computes them."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from llava_mini.lmm.prefusion import CACHE_KWARG

# The public VisionZip settings split a budget into dominant + contextual tokens as 54 + 10, 108 + 20
# and 162 + 30: 27/32 of the budget is dominant (the [CLS] token counts as one of the dominant).
VISIONZIP_DOMINANT_SHARE = 27 / 32
# FastV's paper setting: prune after K = 2 LLM layers.
FASTV_DEFAULT_LAYER = 2


@dataclass(frozen=True)
class FastV:
    """FastV (arXiv 2403.06764), the in-place variant: the first ``layer`` LLM layers see every image
    token; from layer ``layer`` on, each image keeps only its ``keep`` tokens that got the most
    attention from the prompt's last token in layer ``layer - 1`` (averaged over heads). The dropped
    tokens leave the hidden states and the KV cache of the remaining layers; the kept ones keep their
    original positions (RoPE), as in the authors' code."""

    layer: int = FASTV_DEFAULT_LAYER
    keep: int = 64

    def __post_init__(self):
        if not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer: FastV prunes after at least one LLM layer; got {self.layer!r}")
        if not isinstance(self.keep, int) or self.keep < 1:
            raise ValueError(f"keep: expected a positive number of image tokens, got {self.keep!r}")

    @classmethod
    def from_ratio(cls, layer: int, ratio: float, image_tokens: int = 576) -> "FastV":
        """The authors' parameters: K and the pruned share R of the image tokens
        (they keep ``round(image_tokens * (1 - R))``)."""
        if not 0 <= ratio < 1:
            raise ValueError(f"ratio: expected a pruned share in [0, 1), got {ratio!r}")
        return cls(layer=layer, keep=round(image_tokens * (1 - ratio)))

    @property
    def tokens(self) -> int:
        """Image tokens the LLM holds per image after pruning (its first ``layer`` layers hold all)."""
        return self.keep


@dataclass(frozen=True)
class VisionZip:
    """VisionZip (arXiv 2412.04467): in CLIP's selected layer, keep the ``dominant`` tokens (the [CLS]
    token and the patches it attends to most, summed over heads) and merge the rest into
    ``contextual`` tokens by key similarity, before the projector."""

    dominant: int = 54
    contextual: int = 10

    def __post_init__(self):
        if not isinstance(self.dominant, int) or self.dominant < 2:
            raise ValueError(f"dominant: expected at least 2 tokens ([CLS] and one patch), got {self.dominant!r}")
        if not isinstance(self.contextual, int) or self.contextual < 1:
            raise ValueError(f"contextual: expected a positive number of tokens, got {self.contextual!r}")

    @classmethod
    def for_budget(cls, tokens: int) -> "VisionZip":
        """The public split of a budget: 64 -> 54 + 10, 128 -> 108 + 20, 192 -> 162 + 30."""
        dominant = round(tokens * VISIONZIP_DOMINANT_SHARE)
        return cls(dominant=dominant, contextual=tokens - dominant)

    @property
    def tokens(self) -> int:
        """Vision tokens the LLM receives per image."""
        return self.dominant + self.contextual


Reduction = FastV | VisionZip


def make_reduction(reduction, tokens: int | None = None, fastv_layer: int = FASTV_DEFAULT_LAYER) -> Reduction | None:
    """``None``, a ``FastV``/``VisionZip``, or a name (``"fastv"``, ``"visionzip"``) with a token budget."""
    if reduction is None or isinstance(reduction, (FastV, VisionZip)):
        if tokens is not None:
            raise ValueError("tokens: give a token budget only with a reduction name")
        return reduction
    if reduction not in ("fastv", "visionzip"):
        raise ValueError(f"reduction: expected None, 'fastv', 'visionzip' or a FastV/VisionZip, got {reduction!r}")
    budget = 64 if tokens is None else tokens
    return FastV(layer=fastv_layer, keep=budget) if reduction == "fastv" else VisionZip.for_budget(budget)


# --- VisionZip ---------------------------------------------------------------------------------

def _layer_index(feature_layer: int, num_layers: int) -> int:
    """The CLIP encoder layer whose output is ``hidden_states[feature_layer]``."""
    if feature_layer == 0 or not -num_layers <= feature_layer <= num_layers:
        raise ValueError(f"vision_feature_layer: VisionZip needs an encoder layer's output, got {feature_layer}")
    return feature_layer - 1 if feature_layer > 0 else num_layers + feature_layer


@torch.no_grad()
def visionzip_tokens(vision_tower: nn.Module, pixels: torch.Tensor, feature_layer: int,
                     settings: VisionZip) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's vision tokens before the projector: ([B, dominant + contextual, D], kept indices
    [B, dominant] into the layer's N + 1 tokens, [CLS] = 0 first).

    The dominant tokens are the [CLS] token and the ``dominant - 1`` patches with the most [CLS]
    attention summed over heads, in their original order; every other token is assigned to the most
    similar (cosine of the layer's keys averaged over heads) of ``contextual`` evenly spaced targets
    among them, and each target becomes itself plus the mean of the tokens assigned to it.
    """
    layers = vision_tower.encoder.layers
    attn = layers[_layer_index(feature_layer, len(layers))].self_attn
    captured = {}
    # The layer's own query and key projections: read, not recomputed.
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("q", out)),
             attn.k_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("k", out))]
    try:
        hidden = vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
    finally:
        for h in hooks:
            h.remove()
    batch, n, width = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    if settings.dominant + settings.contextual > n:
        raise ValueError(f"reduction: VisionZip keeps {settings.tokens} tokens but the layer has {n}")
    q = captured["q"].view(batch, n, heads, head_dim).transpose(1, 2)
    k = captured["k"].view(batch, n, heads, head_dim).transpose(1, 2)
    # [CLS] row of the attention (no mask in CLIP's vision tower), summed over heads, patches only.
    cls_attention = torch.softmax((q[:, :, :1] * attn.scale) @ k.transpose(-1, -2), dim=-1)
    cls_attention = cls_attention[:, :, 0, 1:].sum(dim=1)
    top = cls_attention.topk(settings.dominant - 1, dim=1).indices + 1
    kept = torch.cat([torch.zeros_like(top[:, :1]), top], dim=1)
    is_dominant = torch.zeros(batch, n, dtype=torch.bool, device=hidden.device).scatter_(1, kept, True)
    dominant = hidden[is_dominant].view(batch, settings.dominant, width)
    rest = hidden[~is_dominant].view(batch, n - settings.dominant, width)
    metric = k.mean(dim=1)[~is_dominant].view(batch, n - settings.dominant, head_dim)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    # Evenly spaced targets among the remaining tokens; the others merge into their nearest target.
    remaining = rest.shape[1]
    step = max(1, remaining // settings.contextual)
    targets = torch.arange(0, remaining, step, device=hidden.device)[:settings.contextual]
    is_target = torch.zeros(remaining, dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    similarity = metric[:, ~is_target] @ metric[:, targets].transpose(1, 2)
    assign = torch.zeros(*similarity.shape, dtype=rest.dtype, device=hidden.device)
    assign.scatter_(2, similarity.argmax(dim=2, keepdim=True), 1)
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
    contextual = rest[:, targets] + assign.transpose(1, 2) @ rest[:, ~is_target] / counts
    return torch.cat([dominant, contextual], dim=1), kept


# --- FastV -------------------------------------------------------------------------------------

def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def last_token_attention(layer: nn.Module, hidden: torch.Tensor, mask, position_embeddings) -> torch.Tensor:
    """The attention row of the last query in a Llama decoder layer, averaged over heads: [B, T].

    Computed from the layer's input as transformers' eager attention computes it (RoPE, the mask,
    a float32 softmax), for the last row only, so FastV works under any attention backend.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, length, _ = x.shape
    head_dim = attn.head_dim
    q = attn.q_proj(x[:, -1:]).view(batch, 1, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = _rope(q, cos[:, -1:], sin[:, -1:]), _rope(k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling
    if mask is not None:
        row = mask[:, :, -1:, :length]
        scores = scores.masked_fill(~row, torch.finfo(scores.dtype).min) if row.dtype == torch.bool else scores + row
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).mean(dim=1)[:, 0]


class FastVPruner:
    """FastV on a transformers decoder (its ``layers``), as forward pre-hooks that live only inside
    ``images(mask)``: layer ``K - 1`` reads the last token's attention, layer ``K`` drops the image
    tokens it ranks low, and layers ``K..`` get the pruned mask, positions and rotary tables. Layers
    before K and the decoder's own forward are untouched, so the cache of the first K layers is the
    unpruned model's. Outside ``images`` the decoder is the unpruned model (models that share its
    weights stay unaffected).

    ``images(mask)`` gives the image positions of the batch being prefilled; decode steps need none
    (the mask's padding is at the left, so the pruned layers' mask is the full one's first columns).
    Works with transformers' dynamic cache; ``kept`` holds the last prefill's kept positions [B, T'].
    """

    def __init__(self, decoder: nn.Module, settings: FastV):
        if settings.layer >= len(decoder.layers):
            raise ValueError(f"reduction: FastV prunes after layer {settings.layer} but the LLM has "
                             f"{len(decoder.layers)}")
        self.decoder, self.settings = decoder, settings
        self.image_mask: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None
        self._attention: torch.Tensor | None = None
        self._pruned: dict | None = None

    @contextlib.contextmanager
    def images(self, image_mask: torch.Tensor):
        """Within this block the decoder prunes: prefills drop the positions where ``image_mask``
        [B, T] is True (all but ``keep`` per row), decode steps use the pruned cache."""
        k, layers = self.settings.layer, self.decoder.layers
        hooks = [layers[k - 1].register_forward_pre_hook(self._read_attention, with_kwargs=True)]
        hooks += [layer.register_forward_pre_hook(self._prune, with_kwargs=True) for layer in layers[k:]]
        self.image_mask = image_mask
        try:
            yield self
        finally:
            self.image_mask = None
            for hook in hooks:
                hook.remove()

    @staticmethod
    def _past(kwargs, layer_idx: int) -> int:
        cache = kwargs.get(CACHE_KWARG)
        return 0 if cache is None else cache.get_seq_length(layer_idx)

    def _read_attention(self, layer, args, kwargs):
        if self._past(kwargs, self.settings.layer - 1) > 0:  # a decode step: nothing to rank
            self._attention = None
            return None
        self._attention = last_token_attention(layer, _hidden_arg(args, kwargs), kwargs.get("attention_mask"),
                                               kwargs["position_embeddings"])
        return None

    def _prune(self, layer, args, kwargs):
        if layer is self.decoder.layers[self.settings.layer]:
            self._pruned = self._plan(args, kwargs)
            hidden = self._pruned.pop("hidden", None)
            if hidden is not None:  # only the first pruned layer takes new hidden states
                args = (hidden, *args[1:]) if args else args
                kwargs = kwargs if args else {**kwargs, "hidden_states": hidden}
        return args, {**kwargs, **self._pruned}

    def _plan(self, args, kwargs) -> dict:
        """What the layers from K on receive in this forward: pruned inputs at prefill, a cut mask when decoding."""
        hidden = _hidden_arg(args, kwargs)
        mask = kwargs.get("attention_mask")
        past = self._past(kwargs, self.settings.layer)
        if self._attention is None:  # decode: the pruned layers' keys are the first past + q columns
            queries = hidden.shape[1]
            return {} if mask is None else {"attention_mask": mask[:, :, :queries, :past + queries]}
        scores, self._attention = self._attention, None
        keep_mask = self._keep_mask(scores, hidden.shape[:2])
        batch = hidden.shape[0]
        kept = keep_mask.nonzero()[:, 1].view(batch, -1)  # sorted positions per row
        self.kept = kept
        length = kept.shape[1]
        cos, sin = kwargs["position_embeddings"]
        gather = kept.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
        plan = {"hidden": hidden.gather(1, kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])),
                "position_embeddings": (cos.expand(batch, -1, -1).gather(1, gather),
                                        sin.expand(batch, -1, -1).gather(1, gather))}
        if kwargs.get("position_ids") is not None:
            plan["position_ids"] = kwargs["position_ids"].expand(batch, -1).gather(1, kept)
        if mask is not None:  # left padding is always kept, so the pruned causal mask is the top-left block
            plan["attention_mask"] = mask[:, :, :length, :length]
        return plan

    def _keep_mask(self, scores: torch.Tensor, shape) -> torch.Tensor:
        batch, length = shape
        images = self.image_mask
        if images is None:
            raise ValueError("image_mask: FastV needs the prompt's image positions (None given)")
        images = images.to(scores.device)
        if images.shape[0] != batch:  # beam search / num_return_sequences repeat each prompt
            images = images.repeat_interleave(batch // images.shape[0], dim=0)
        if images.shape[1] < length:  # without a cache, later calls hold generated tokens too
            images = torch.cat([images, images.new_zeros(batch, length - images.shape[1])], dim=1)
        counts = images.sum(dim=1)
        if (counts != counts[0]).any() or counts[0] < self.settings.keep:
            raise ValueError(f"image_mask: FastV keeps {self.settings.keep} image tokens per row; rows hold "
                             f"{counts.tolist()}")
        top = scores.masked_fill(~images, float("-inf")).topk(self.settings.keep, dim=1).indices
        return (~images).scatter(1, top, True)
