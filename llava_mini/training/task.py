"""A synthetic task whose answer only the image holds: "What colour is the square?" over images of
one coloured square (random size and place on a grey background, noisy pixels), answered with the
colour's name. The text is the same for every image, so an accuracy above chance (1 / len(COLOURS))
means the vision token and the fused text carry the image's content.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llava_mini.lmm import IGNORE_INDEX
from llava_mini.lmm import processing

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230), "yellow": (230, 220, 30)}
QUESTION = "What colour is the square?"


@dataclass
class Batch:
    """One batch: ready pixel values, prompt + answer ids, labels (IGNORE_INDEX on the prompt) and answers."""

    pixels: torch.Tensor
    input_ids: list[list[int]]
    labels: list[list[int]]
    answers: list[int]  # index into COLOURS


class ColourTask:
    """Examples of the colour task for ``model`` (its image processor, template and tokenizer).

    Prompts are the model's released conversation template around ``<image>\\n`` + the question;
    the answer is `` <colour></s>`` as the released conversations end, the loss taken on it only
    (as released instruction tuning masks the human turn).
    """

    def __init__(self, model, seed: int = 0, image_size: int | None = None):
        if model.tokenizer is None:
            raise ValueError("model: the colour task needs a tokenizer (model.tokenizer)")
        self.model = model
        self.rng = np.random.default_rng(seed)
        self.size = image_size or model.config.crop_size
        tok = model.tokenizer
        self.prompt = processing.tokenize_prompt(processing.apply_template(QUESTION, model.config.template), tok)
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        self.answers = [tok(" " + name, add_special_tokens=False).input_ids + eos for name in COLOURS]

    def image(self, colour: int) -> np.ndarray:
        """A grey, noisy image [S, S, 3] uint8 with one square of ``colour`` somewhere on it."""
        s = self.size
        img = np.full((s, s, 3), 128, dtype=np.int16) + self.rng.integers(-20, 21, (s, s, 3))
        side = int(self.rng.integers(s // 4, s // 2 + 1))
        y, x = self.rng.integers(0, s - side + 1, 2)
        img[y:y + side, x:x + side] = np.array(list(COLOURS.values())[colour]) + self.rng.integers(-15, 16, 3)
        return img.clip(0, 255).astype(np.uint8)

    def batch(self, size: int) -> Batch:
        colours = self.rng.integers(0, len(COLOURS), size).tolist()
        pixels = self.model.prepare_images([self.image(c) for c in colours])
        ids = [self.prompt + self.answers[c] for c in colours]
        labels = [[IGNORE_INDEX] * len(self.prompt) + self.answers[c] for c in colours]
        return Batch(pixels, ids, labels, colours)
