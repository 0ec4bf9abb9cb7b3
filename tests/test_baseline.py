"""The 576-token baseline: transformers' LlavaForConditionalGeneration behind LlavaMini's interface."""

import pytest
import torch

from llava_mini.lmm import IMAGE_TOKEN_INDEX as IMG
from llava_mini.lmm.baseline import LlavaBaseline
from llava_mini.lmm.config import LlavaMiniConfig
from llava_mini.lmm.processing import preprocess_images


@pytest.fixture(scope="module")
def baseline():
    torch.manual_seed(0)
    return LlavaBaseline.from_preset("tiny", dtype=torch.float32)


def test_encode_equals_transformers_own_forward(baseline):
    torch.manual_seed(1)
    image = torch.rand(3, 28, 28)
    ids = [1, 5, IMG, 7, 8]
    prompt = baseline.encode([image], [ids])
    assert prompt.inputs_embeds.shape[1] == len(ids) - 1 + baseline.config.num_patches
    ours = baseline.model(inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask).logits
    expanded = torch.tensor([baseline.expand_ids(ids, 0)])
    theirs = baseline.model(input_ids=expanded, pixel_values=preprocess_images([image], baseline.image_processor)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_llava_15_7b_config_matches_the_hub_layout():
    with torch.device("meta"):  # shapes only, no 7B of weights
        model = LlavaBaseline(LlavaMiniConfig.from_preset("llava-mini-vicuna-7b"))
    assert model.image_token_id == 32000
    assert model.model.config.text_config.vocab_size == 32064  # llava-hf/llava-1.5-7b-hf
    assert model.model.config.image_seq_length == 576


def test_backend_switch_reaches_both_towers_and_is_restored(baseline):
    seen = []
    vision_impl = baseline.model.model.vision_tower.config._attn_implementation
    baseline.model.model.vision_tower.register_forward_pre_hook(
        lambda m, a: seen.append(("vision", m.config._attn_implementation)))
    hook = baseline.model.model.language_model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a: seen.append(m.config._attn_implementation))
    try:
        baseline.encode([torch.rand(3, 28, 28)], [[1, IMG]], backend="sdpa")
        baseline.generate([torch.rand(3, 28, 28)], [[1, IMG]], max_new_tokens=1, backend="sdpa")
    finally:
        hook.remove()
    assert seen == [("vision", "sdpa"), ("vision", "sdpa"), "sdpa"]  # encode, then generate (encode + prefill)
    assert baseline.model.model.vision_tower.config._attn_implementation == vision_impl
    assert baseline.model.config.text_config._attn_implementation == "eager"
