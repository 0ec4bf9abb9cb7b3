"""Decoding: LLaVA-Mini and the 576-token baseline, checked against decoding written out by hand."""

import pytest
import torch

from llava_mini.lmm import IMAGE_TOKEN_INDEX as IMG
from llava_mini.lmm import LlavaMini
from llava_mini.lmm.baseline import LlavaBaseline

PROMPTS = [[1, 5, IMG, 7, 8], [1, IMG, 9, 10, 11, 12, 13, 14]]  # ragged: the batch is left-padded


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    return LlavaMini.from_preset("tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def baseline():
    torch.manual_seed(0)
    return LlavaBaseline.from_preset("tiny", dtype=torch.float32)


def images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 28 + 3 * i, 28 + 5 * i, generator=g) for i in range(n)]


def language_model(model):
    return model.llm if isinstance(model, LlavaMini) else model.model


@torch.no_grad()
def argmax_loop(llm, prompt, new_tokens: int) -> torch.Tensor:
    """Greedy decoding written out: one full forward over the whole sequence (no cache) per new token."""
    embeds, mask, tokens = prompt.inputs_embeds, prompt.attention_mask, []
    for _ in range(new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1]
        tokens.append(logits.argmax(-1))
        embeds = torch.cat([embeds, llm.get_input_embeddings()(tokens[-1])[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("which", ["mini", "baseline"])
def test_greedy_equals_an_argmax_loop_over_full_forwards(which, request):
    model = request.getfixturevalue(which)
    imgs = images(2)
    want = argmax_loop(language_model(model), model.encode(imgs, PROMPTS), 8)
    assert torch.equal(model.generate(imgs, PROMPTS, max_new_tokens=8, stop_token_ids=[]), want)
