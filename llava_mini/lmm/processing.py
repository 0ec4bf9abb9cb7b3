"""Inputs: images, HD crops, videos and prompts, prepared the way the released code prepares them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from llava_mini.lmm.config import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN_INDEX

try:  # transformers with image-processor backends: the PIL one is the released computation
    from transformers import CLIPImageProcessorPil as ClipProcessor
except ImportError:  # earlier 5.x: CLIPImageProcessor is the PIL one
    from transformers import CLIPImageProcessor as ClipProcessor

IMAGE_PLACEHOLDER = "<image>"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# The released video loader resizes every frame to this fixed size (CLIP-L/336's crop), whatever the
# processor; kept as is, so any crop size gives the released pixels.
VIDEO_FRAME_SIZE = 336


# --- images ----------------------------------------------------------------------------------------
def clip_image_processor(crop_size: int, path: str | os.PathLike | None = None):
    """transformers' CLIP image processor (its PIL backend, the one the released code ran).

    Read from ``path``'s ``preprocessor_config.json`` when that file exists (a checkpoint directory),
    else CLIP ViT-L/14-336's settings (shortest side resized bicubic, centre crop, CLIP mean/std)
    at ``crop_size``.
    """
    if path is not None and (Path(path) / PREPROCESSOR_CONFIG).is_file():
        return ClipProcessor.from_pretrained(str(path))
    return ClipProcessor(size={"shortest_edge": crop_size}, crop_size={"height": crop_size, "width": crop_size},
                         image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def to_pil_image(image, argument: str = "image"):
    """A PIL image, numpy array [H, W, 3] / [H, W], tensor [3, H, W], or path -> an RGB PIL image.

    uint8 arrays and tensors are taken as they are; float ones are read as values in [0, 1] and
    rounded to 8 bits (the CLIP processor, like the released code, works on 8-bit images).
    """
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as f:
                return f.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"{argument}: cannot read an image from {str(image)!r} ({e})") from e
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{argument}: expected a tensor [3, H, W], got shape {list(image.shape)}")
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise TypeError(f"{argument}: expected a float or uint8 tensor, got {image.dtype}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"{argument}: expected a numpy array [H, W, 3], got shape {list(image.shape)}")
        if image.dtype != np.uint8:
            image = (np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(image[..., :3]))
    raise TypeError(f"{argument}: expected a PIL image, numpy array, tensor or file path, got {type(image).__name__}")


def pad_to_square(image, fill: tuple[int, ...]):
    """Paste ``image`` centred on a square canvas of its longer side, filled with ``fill``."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def split_image(image, n: int) -> list:
    """HD: the image cut into n x n blocks of (W // n) x (H // n) pixels, row-major, then the whole image."""
    if n == 1:
        return [image]
    w, h = image.size[0] // n, image.size[1] // n
    return [image.crop((j * w, i * h, (j + 1) * w, (i + 1) * h)) for i in range(n) for j in range(n)] + [image]


def mean_fill(processor) -> tuple[int, ...]:
    """The padding colour: the processor's mean as 8-bit values (truncated, as released)."""
    return tuple(int(m * 255) for m in processor.image_mean)


def run_processor(processor, images: list) -> torch.Tensor:
    return processor(images, return_tensors="pt")["pixel_values"]


def preprocess_image(image, processor, resolution_ratio: int = 1, pad: bool = True,
                     argument: str = "image") -> torch.Tensor:
    """One image -> pixel values: [3, S, S] at ratio 1; [r*r + 1, 3, S, S] (blocks, then whole) at ratio r > 1.

    With ``pad`` (config ``image_aspect_ratio: pad``) each picture is first padded to a square with
    the processor's mean colour; then the CLIP processor runs on it.
    """
    parts = split_image(to_pil_image(image, argument), resolution_ratio)
    if pad:
        parts = [pad_to_square(p, mean_fill(processor)) for p in parts]
    pixels = run_processor(processor, parts)
    return pixels[0] if resolution_ratio == 1 else pixels


def preprocess_images(images, processor, resolution_ratio: int = 1, pad: bool = True) -> torch.Tensor:
    """A list of images (or one) -> a batch of pixel values [B, ...] (see ``preprocess_image``)."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError("images: expected at least one image, got an empty list")
    return torch.stack([preprocess_image(im, processor, resolution_ratio, pad, f"images[{i}]")
                        for i, im in enumerate(images)])


def preprocess_video_frames(frames, processor, resolution_ratio: int = 1) -> torch.Tensor:
    """Decoded video frames -> pixel values [T, 3, S, S], or [T, r*r + 1, 3, S, S] for an HD model.

    As the released video path: each frame (any image kind ``to_pil_image`` takes; decoders give
    RGB uint8 arrays [H, W, 3]) is resized to 336 x 336 with nearest-neighbour interpolation
    (``torch.nn.functional.interpolate``'s default), split into HD blocks at ratio r > 1, and put
    through the CLIP processor without padding. ``frames`` may be any iterable (a generator too).
    """
    size = (VIDEO_FRAME_SIZE, VIDEO_FRAME_SIZE)
    out = []
    for i, frame in enumerate(frames):
        rgb = torch.from_numpy(np.array(to_pil_image(frame, f"video frame {i}")))
        if tuple(rgb.shape[:2]) != size:
            # nearest picks pixels, so uint8 in gives the released (float) result exactly: a 1080p
            # frame is resized 10x faster and never held as 25 MB of floats
            rgb = F.interpolate(rgb.permute(2, 0, 1)[None], size=size)[0].permute(1, 2, 0)
        pixels = run_processor(processor, split_image(Image.fromarray(rgb.numpy()), resolution_ratio))
        out.append(pixels[0] if resolution_ratio == 1 else pixels)
    if not out:
        raise ValueError("video: expected at least one frame, got an empty video")
    return torch.stack(out)


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
