"""The 576-token baseline: transformers' own LLaVA-1.5 (``LlavaForConditionalGeneration``).

Built offline from a config (the LLaVA-1.5-7B shapes, or any LlavaMiniConfig's vision tower and
LLM), wrapped to take the same inputs and expose the same ``encode``/``generate`` as ``LlavaMini``,
so the comparison is against an implementation nobody here wrote.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

from llava_mini.kernels import backend as backends
from llava_mini.lmm import processing
from llava_mini.lmm.config import IMAGE_TOKEN_INDEX, LlavaMiniConfig
from llava_mini.lmm.generation import LLMInput, generate
from llava_mini.lmm.model import default_dtype_and_device
from llava_mini.lmm.reduction import FASTV_DEFAULT_LAYER, FastV, FastVPruner, VisionZip, make_reduction, visionzip_tokens

# LLaVA-1.5-7B is the Vicuna-7B LLaVA-Mini preset's vision tower and LLM with 576 tokens per image.
BASELINE_OF = {"llava-1.5-7b": "llava-mini-vicuna-7b", "tiny": "tiny"}


class LlavaBaseline(nn.Module):
    """LLaVA-1.5 (576 vision tokens per image) with LlavaMini's ``encode``/``generate`` interface.

    ``reduction`` optionally prunes its vision tokens without training: a ``FastV`` (inside the LLM)
    or a ``VisionZip`` (inside CLIP); see ``llava_mini.lmm.reduction``.
    """

    def __init__(self, config: LlavaMiniConfig, reduction: FastV | VisionZip | None = None):
        super().__init__()
        reduction = make_reduction(reduction)
        if config.resolution_ratio != 1:
            raise ValueError("config: the LLaVA-1.5 baseline takes 336 px images (resolution_ratio 1)")
        self.config = config
        self._backend: str | None = None
        text = config.text_config()
        # LLaVA-1.5 adds its <image> token after the vocabulary (id 32000 for Vicuna, vocab 32064).
        self.image_token_id = text.vocab_size
        text.vocab_size = (text.vocab_size // 64 + 1) * 64
        hf_config = LlavaConfig(
            vision_config=config.vision_config(), text_config=text, image_token_index=self.image_token_id,
            projector_hidden_act="gelu", vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy="default", image_seq_length=config.num_patches,
        )
        hf_config._attn_implementation = "eager"
        self.model = LlavaForConditionalGeneration(hf_config)
        self.image_processor = processing.clip_image_processor(config.crop_size)
        self._set_reduction(reduction)

    def _set_reduction(self, reduction: FastV | VisionZip | None) -> None:
        if reduction is not None and reduction.tokens > self.config.num_patches:
            raise ValueError(f"reduction: {type(reduction).__name__} keeps {reduction.tokens} tokens of "
                             f"{self.config.num_patches}")
        self.reduction = reduction
        self.fastv = FastVPruner(self.model.model.language_model, reduction) if isinstance(reduction, FastV) else None

    def with_reduction(self, reduction=None, tokens: int | None = None,
                       fastv_layer: int = FASTV_DEFAULT_LAYER) -> "LlavaBaseline":
        """This model under another reduction (arguments as ``from_preset``), sharing its weights:
        a benchmark holds every method on one copy of LLaVA-1.5."""
        twin = copy.copy(self)  # a new attribute dict; the modules (the weights) stay shared
        twin._set_reduction(make_reduction(reduction, tokens, fastv_layer))
        return twin

    @classmethod
    def from_preset(cls, name: str, dtype: torch.dtype | None = None, device=None, *, reduction=None,
                    tokens: int | None = None, fastv_layer: int = FASTV_DEFAULT_LAYER) -> "LlavaBaseline":
        """``llava-1.5-7b`` or ``tiny``, or any LlavaMini preset name (same vision tower and LLM).

        ``reduction``: ``None`` (all 576 tokens), ``"fastv"`` or ``"visionzip"`` with ``tokens`` per
        image (default 64; VisionZip splits it as its public settings do, FastV prunes after
        ``fastv_layer`` LLM layers), or a ``FastV``/``VisionZip`` with explicit parameters.
        """
        mini = BASELINE_OF.get(name, name)
        return cls.from_config(LlavaMiniConfig.from_preset(mini), dtype=dtype, device=device,
                               reduction=make_reduction(reduction, tokens, fastv_layer))

    @classmethod
    def from_config(cls, config: LlavaMiniConfig, dtype: torch.dtype | None = None, device=None,
                    reduction: FastV | VisionZip | None = None) -> "LlavaBaseline":
        with default_dtype_and_device(dtype, device):
            model = cls(config, reduction)
        return (model.to(dtype=dtype) if dtype is not None else model).eval()

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def set_backend(self, name: str | None) -> "LlavaBaseline":
        """Attention backend of the LLM and vision tower ("torch" = eager, "sdpa", "flash_attn")."""
        self._backend = None if name is None else backends.validate(name)
        return self

    @contextlib.contextmanager
    def backend_scope(self, backend: str | None = None):
        name = backends.validate(backend) if backend is not None else (self._backend or backends.get_backend())
        with backends.configs_on_backend(name, self.model.config.text_config, self.model.config.vision_config):
            yield name

    @property
    def tokens_per_image(self) -> int:
        """Vision tokens in the LLM input per image (576, or VisionZip's budget; FastV prunes later)."""
        return self.reduction.tokens if isinstance(self.reduction, VisionZip) else self.config.num_patches

    def expand_ids(self, ids: list[int], row: int) -> list[int]:
        """LLaVA-Mini's prompt ids with its one IMAGE_TOKEN_INDEX -> LLaVA-1.5's image tokens."""
        if ids.count(IMAGE_TOKEN_INDEX) != 1:
            raise ValueError(f"input_ids[{row}]: expected exactly one image placeholder ({IMAGE_TOKEN_INDEX})")
        p = ids.index(IMAGE_TOKEN_INDEX)
        return ids[:p] + [self.image_token_id] * self.tokens_per_image + ids[p + 1:]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """transformers' LLaVA vision path (CLIP layer, CLS dropped, projector): [B, 576, d]; under
        VisionZip its dominant and contextual tokens (with [CLS]) through the projector."""
        if isinstance(self.reduction, VisionZip):
            tokens, _ = visionzip_tokens(self.model.model.vision_tower, pixels, self.config.vision_feature_layer,
                                         self.reduction)
            return self.model.model.multi_modal_projector(tokens)
        out = self.model.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy="default")
        feats = getattr(out, "pooler_output", out)  # transformers >= 5.x returns a model output
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    @torch.no_grad()
    def encode(self, images=None, input_ids=None, *, attention_mask=None, backend: str | None = None) -> LLMInput:
        """What the LLM receives: the prompt with 576 projected CLIP tokens at ``<image>``, left-padded."""
        ids = processing.as_id_lists(input_ids, attention_mask)
        pixels = processing.preprocess_images(images, self.image_processor,
                                              pad=self.config.image_aspect_ratio == "pad") if not (
            isinstance(images, torch.Tensor) and images.dim() == 4) else images
        if len(ids) == 1 and pixels.shape[0] > 1:
            ids = ids * pixels.shape[0]
        if len(ids) != pixels.shape[0]:
            raise ValueError(f"images: {pixels.shape[0]} given for {len(ids)} prompts; expected one per prompt")
        with self.backend_scope(backend):
            feats = self.image_features(pixels.to(self.device, self.dtype))
            embed = self.model.get_input_embeddings()
            rows, images = [], []
            for i, row in enumerate(ids):
                expanded = torch.tensor(self.expand_ids(row, i), device=self.device)
                emb = embed(expanded.clamp(min=0))
                emb[expanded == self.image_token_id] = feats[i].to(emb.dtype)
                rows.append(emb)
                images.append(expanded == self.image_token_id)
            prompt = LLMInput.left_pad(rows)
            prompt.image_mask = torch.zeros_like(prompt.attention_mask, dtype=torch.bool)
            for i, is_image in enumerate(images):
                prompt.image_mask[i, prompt.image_mask.shape[1] - is_image.shape[0]:] = is_image
            return prompt

    def reduction_scope(self, prompt: LLMInput):
        """The block in which the LLM runs on ``prompt``: FastV prunes only inside it (it learns the
        image positions there); ``logits``, ``generate`` and the profilers' LLM calls enter it."""
        return self.fastv.images(prompt.image_mask) if self.fastv is not None else contextlib.nullcontext()

    @torch.no_grad()
    def logits(self, prompt: LLMInput, backend: str | None = None) -> torch.Tensor:
        """The LLM's prefill logits on an ``encode``d prompt [B, T, V] (T' < T positions under FastV:
        the pruned sequence's)."""
        with self.backend_scope(backend), self.reduction_scope(prompt):
            return self.model(inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask).logits

    @torch.no_grad()
    def generate(self, images=None, input_ids=None, *, attention_mask=None,
                 generation_config: GenerationConfig | None = None, backend: str | None = None, **generate_kwargs):
        """Encode, then decode through the same path as ``LlavaMini.generate`` (same options, same
        ``GenerationConfig`` handling; defaults from ``self.model.generation_config``): new tokens [B, n]."""
        if self.fastv is not None:
            cache = generate_kwargs.get("cache_implementation", getattr(generation_config, "cache_implementation", None))
            if cache not in (None, "dynamic"):  # a fixed-size cache cannot hold layers of different lengths
                raise ValueError(f"cache_implementation: FastV keeps fewer positions in its later layers' cache and "
                                 f"needs transformers' dynamic cache; got {cache!r}")
        with self.backend_scope(backend) as name:
            prompt = self.encode(images, input_ids, attention_mask=attention_mask, backend=name)
            with self.reduction_scope(prompt):
                return generate(self.model, prompt, generation_config, **generate_kwargs)
