"""Inputs: images, HD crops, videos and prompts, prepared the way the released code prepares them."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from llava_mini.lmm.config import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN_INDEX

IMAGE_PLACEHOLDER = "<image>"


# --- images ----------------------------------------------------------------------------------------
def to_float_image(image, argument: str = "image") -> torch.Tensor:
    """A PIL image, numpy array [H, W, 3] / [H, W], tensor [3, H, W], or path -> float [3, H, W] in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as f:
                image = f.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"{argument}: cannot read an image from {str(image)!r} ({e})") from e
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"{argument}: expected a numpy array [H, W, 3], got shape {list(image.shape)}")
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        return torch.from_numpy(np.array(image[..., :3])).permute(2, 0, 1).float() / scale
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{argument}: expected a tensor [3, H, W], got shape {list(image.shape)}")
        if image.dtype == torch.uint8:
            return image.float() / 255.0
        if not image.is_floating_point():
            raise TypeError(f"{argument}: expected a float or uint8 tensor, got {image.dtype}")
        return image.float()
    raise TypeError(f"{argument}: expected a PIL image, numpy array, tensor or file path, got {type(image).__name__}")


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's geometry: resize the shortest side to ``size`` (bicubic, antialiased), center crop."""
    _, h, w = image.shape
    if min(h, w) != size:
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bicubic", antialias=True,
                              align_corners=False)[0].clamp(0, 1)
    _, h, w = image.shape
    top, left = (h - size) // 2, (w - size) // 2
    return image[:, top:top + size, left:left + size]


def normalize(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (image - mean) / std


def preprocess_image(image, crop_size: int, resolution_ratio: int = 1, argument: str = "image") -> torch.Tensor:
    """One image -> pixel values: [3, S, S] at ratio 1; [r*r + 1, 3, S, S] (crops, then global) at ratio r > 1."""
    image = resize_center_crop(to_float_image(image, argument), crop_size * resolution_ratio)
    if resolution_ratio == 1:
        return normalize(image)
    crops = [image[:, i * crop_size:(i + 1) * crop_size, j * crop_size:(j + 1) * crop_size]
             for i in range(resolution_ratio) for j in range(resolution_ratio)]
    glob = F.interpolate(image[None], size=(crop_size, crop_size), mode="bicubic", antialias=True,
                         align_corners=False)[0].clamp(0, 1)
    return torch.stack([normalize(c) for c in crops + [glob]])


def preprocess_images(images, crop_size: int, resolution_ratio: int = 1) -> torch.Tensor:
    """A list of images (or one) -> a batch of pixel values [B, ...]."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError("images: expected at least one image, got an empty list")
    return torch.stack([preprocess_image(im, crop_size, resolution_ratio, f"images[{i}]")
                        for i, im in enumerate(images)])


# --- prompts ---------------------------------------------------------------------------------------
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                 "content that the user provides, and assist the user with a variety of tasks using natural language.")


def apply_template(question: str, template: str, with_image: bool = True) -> str:
    """Wrap one user question in the released conversation template (``<image>`` first)."""
    user = f"{IMAGE_PLACEHOLDER}\n{question}" if with_image and IMAGE_PLACEHOLDER not in question else question
    if template == "vicuna_v1":
        return f"{VICUNA_SYSTEM} USER: {user} ASSISTANT:"
    if template == "llama_3_1":
        return ("<|start_header_id|>system<|end_header_id|>\n\n" + LLAMA3_SYSTEM + "<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n" + user + "<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    if template == "plain":
        return user
    raise ValueError(f"template: unknown template {template!r}")


def tokenize_prompt(prompt: str, tokenizer) -> list[int]:
    """Tokenize text around each ``<image>`` and put IMAGE_TOKEN_INDEX where it stood (released rule)."""
    chunks = [tokenizer(chunk, add_special_tokens=False).input_ids for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk)
    return ids


def as_id_lists(input_ids, attention_mask=None) -> list[list[int]]:
    """Prompts as a list of token-id lists: accepts list[int], list[list[int]], or a tensor [B, L] (+ mask)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a tensor [B, L], got shape {list(input_ids.shape)}")
        if attention_mask is None:
            return input_ids.tolist()
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {list(input_ids.shape)}, got {list(attention_mask.shape)}")
        return [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
    if isinstance(input_ids, Sequence) and input_ids and all(isinstance(t, int) for t in input_ids):
        return [list(input_ids)]
    if isinstance(input_ids, Sequence) and input_ids and all(isinstance(s, Sequence) for s in input_ids):
        out = [list(s) for s in input_ids]
        if any(not s or not all(isinstance(t, int) for t in s) for s in out):
            raise ValueError("input_ids: every prompt must be a non-empty list of ints")
        return out
    raise TypeError("input_ids: expected a list of ints, a list of lists of ints, or a tensor [B, L]")
