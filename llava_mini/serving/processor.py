"""vLLM's input side for LLaVA-Mini: one image or video per prompt, preprocessed as released.

The prompt's text embeddings depend on the image (pre-fusion fuses the vision tokens into every
text row), so they cannot be vLLM's embedding look-ups. Instead the image (or video) item's
placeholder span covers the **whole prompt**: the processor replaces the prompt by the L - 1 + C^2
(video: L - 1 + T * C^2) ids of what the LLM receives, and the model's ``embed_multimodal``
returns every row of it. The item carries the prompt's ids with it, so vLLM's item hash (which
keys the encoder cache, the processor cache and the prefix cache) covers the image *and* the
prompt: two prompts never share rows, nor do two images.

Prompts are re-tokenized as the released code tokenizes them: the text around ``<image>`` is
tokenized piece by piece, with the image placeholder (-200) between (``processing.tokenize_prompt``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import cached_property

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from vllm.exceptions import VLLMValidationError
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
)

from llava_mini.lmm import processing
from llava_mini.lmm.config import IMAGE_TOKEN_INDEX
from llava_mini.serving.config import to_llava_mini_config

# What the processor hands the model for each item (and what vLLM hashes with it).
PROMPT_KWARG = "llava_mini_prompt"  # the released token ids of the prompt, <image> as -200
TARGET_KWARG = "llava_mini_target"  # the prompt's ids as vLLM tokenized them (what is replaced)
IDS_FIELD = "llava_mini_ids"
IMAGE_FIELD = "pixel_values"
VIDEO_FIELD = "video_pixel_values"
# The id the C^2 (T * C^2) vision positions of the span carry: any id in the vocabulary works (the
# rows are replaced by embeddings); 0 is the released code's id for the image position.
VISION_ID = 0


def reject(message: str, parameter: str) -> None:
    """A client error: the server answers it with a 400 naming ``parameter``."""
    raise VLLMValidationError(message, parameter=parameter)


class LlavaMiniProcessingInfo(BaseProcessingInfo):
    """What vLLM needs to know of the checkpoint: its config, limits and the span sizes."""

    @cached_property
    def mini_config(self):
        return to_llava_mini_config(self.get_hf_config())

    @cached_property
    def image_processor(self):
        """The checkpoint's CLIP image processor (its preprocessor_config.json), as ``from_pretrained`` loads it."""
        return processing.clip_image_processor(self.mini_config.crop_size, self.ctx.model_config.model)

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set(), "images_kwargs": set(), "videos_kwargs": set()}  # no HF processor options

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": 1, "video": 1}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # A span is the whole prompt: as long as the context.
        return {modality: seq_len for modality in ("image", "video") if mm_counts.get(modality, 0)}

    def parse_mm_data(self, mm_data, *, validate: bool = True):
        items = super().parse_mm_data(mm_data, validate=validate)
        if validate and sum(items.get_all_counts().values()) > 1:
            reject("LLaVA-Mini takes one image or one video per prompt, as released; "
                   f"got {dict(items.get_all_counts())}", "multi_modal_data")
        return items

    def released_ids(self, prompt: Sequence[int]) -> list[int]:
        """The prompt's ids as the released code tokenizes its text (``<image>`` -> -200)."""
        tokenizer = self.get_tokenizer()
        ids = list(prompt)
        if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
            ids = ids[1:]  # tokenize_prompt puts the BOS back
        text = tokenizer.decode(ids)
        count = text.count(processing.IMAGE_PLACEHOLDER)
        if count != 1:
            reject(f"prompt: expected exactly one {processing.IMAGE_PLACEHOLDER} placeholder with an image or video, "
                   f"found {count} (the chat API adds it; a plain prompt must hold it)", "prompt")
        return processing.tokenize_prompt(text, tokenizer)

    def span_ids(self, released: Sequence[int], frames: int = 1) -> list[int]:
        """The ids of what the LLM receives: the text with ``<image>`` widened to ``frames * C^2``
        vision positions, cut to ``tokenizer_model_max_length`` (as released)."""
        p = list(released).index(IMAGE_TOKEN_INDEX)
        ids = [max(t, 0) for t in released[:p]] + [VISION_ID] * (frames * self.mini_config.tokens_per_image) + \
            [max(t, 0) for t in released[p + 1:]]
        limit = self.mini_config.tokenizer_model_max_length
        return ids if limit is None else ids[:limit]


class LlavaMiniDummyInputsBuilder(BaseDummyInputsBuilder[LlavaMiniProcessingInfo]):
    """Inputs for vLLM's start-up profiling: one image (or a few frames) and its placeholder."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return processing.IMAGE_PLACEHOLDER if any(mm_counts.get(m, 0) for m in ("image", "video")) else ""

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        # one item in all (a prompt takes one image or one video): an image when one is asked for
        side = self.info.mini_config.image_size
        options = mm_options or {}
        if mm_counts.get("image", 0):
            return {"image": self._get_dummy_images(width=side, height=side, num_images=1, overrides=options.get("image"))}
        if mm_counts.get("video", 0):
            return {"video": self._get_dummy_videos(width=side, height=side, num_frames=4, num_videos=1,
                                                    overrides=options.get("video"))}
        return {}


class LlavaMiniMultiModalProcessor(BaseMultiModalProcessor[LlavaMiniProcessingInfo]):
    """Preprocesses the item as released and replaces the whole prompt by the LLM input's ids."""

    def apply(self, inputs, timing_ctx):
        if sum(inputs.mm_data_items.get_all_counts().values()):
            # The prompt travels with the item: it is part of the item's hash and of what the model
            # receives (a copy of the inputs: the caller's are left as they were).
            kwargs = {**inputs.hf_processor_mm_kwargs, PROMPT_KWARG: tuple(self.info.released_ids(inputs.prompt)),
                      TARGET_KWARG: tuple(inputs.prompt)}
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        config, info = self.info.mini_config, self.info
        out = {}
        if hf_data.get("images"):
            pad = config.image_aspect_ratio == "pad"
            out[IMAGE_FIELD] = torch.stack([
                processing.preprocess_image(check_image(im, config), info.image_processor, config.resolution_ratio, pad)
                for im in hf_data["images"]])
        if hf_data.get("videos"):
            out[VIDEO_FIELD] = [processing.preprocess_video_frames(video_frames(v), info.image_processor,
                                                                   config.resolution_ratio)
                                for v in hf_data["videos"]]
        count = len(next(iter(out.values())))
        out[IDS_FIELD] = [torch.tensor(hf_kwargs[PROMPT_KWARG], dtype=torch.long)] * count
        return BatchFeature(out)

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        modality = "video" if VIDEO_FIELD in hf_inputs else "image"
        return {IMAGE_FIELD: MultiModalFieldConfig.batched("image"),
                VIDEO_FIELD: MultiModalFieldConfig.batched("video"),
                IDS_FIELD: MultiModalFieldConfig.batched(modality)}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs):
        released = hf_processor_mm_kwargs[PROMPT_KWARG]
        modality = "video" if mm_items.get_all_counts().get("video") else "image"

        def replacement(item_idx: int) -> list[int]:
            frames = 1
            if modality == "video":
                frames = out_mm_kwargs[modality][item_idx][VIDEO_FIELD].data.shape[0]
            return self.info.span_ids(released, frames)

        return [PromptReplacement(modality=modality, target=list(hf_processor_mm_kwargs[TARGET_KWARG]),
                                  replacement=replacement)]


def check_image(image, config):
    """A decoded image vLLM hands over: refuse one smaller than a CLIP patch per (HD) block, or one
    of more pixels than PIL's decompression-bomb limit."""
    w, h = image.size
    least = config.vision["patch_size"] * config.resolution_ratio
    if min(w, h) < least:
        reject(f"image: {w} x {h} pixels is too small; each side must be at least {least} pixels", "image")
    if w * h > Image.MAX_IMAGE_PIXELS:
        reject(f"image: {w} x {h} = {w * h:,} pixels is too large; at most {Image.MAX_IMAGE_PIXELS:,} pixels "
               f"(PIL's decompression-bomb limit)", "image")
    return image


def video_frames(video):
    """vLLM's video item (frames [T, H, W, 3], a list of frames, or (frames, metadata)) -> frames."""
    if isinstance(video, tuple):
        video = video[0]
    if isinstance(video, torch.Tensor):
        video = video.cpu().numpy()
    if len(video) == 0:
        reject("video: expected at least one frame, got none", "video")
    return list(video) if isinstance(video, np.ndarray) else video
