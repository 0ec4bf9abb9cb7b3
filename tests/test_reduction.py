"""FastV and VisionZip on the LLaVA-1.5 baseline: the authors' code's outputs (tests/data/reduction),
batches, generation with the KV cache, and the options' errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_mini.lmm import IMAGE_TOKEN_INDEX as IMG
from llava_mini.lmm.baseline import LlavaBaseline
from llava_mini.lmm.config import LlavaMiniConfig
from llava_mini.lmm.reduction import FastV, VisionZip, make_reduction, visionzip_tokens

DATA = Path(__file__).parent / "data" / "reduction"
CASES = json.loads((DATA / "cases.json").read_text())


@pytest.fixture(scope="module")
def fixture():
    return load_file(DATA / "checkpoint.safetensors"), load_file(DATA / "inputs.safetensors")["pixels"], \
        load_file(DATA / "expected.safetensors")


def fixture_model(weights, reduction) -> LlavaBaseline:
    model = LlavaBaseline.from_config(LlavaMiniConfig.from_dict(CASES["config"]), dtype=torch.float64,
                                      reduction=reduction)
    model.model.load_state_dict({k: v.double() for k, v in weights.items()})
    return model


@pytest.mark.parametrize("case", CASES["fastv"], ids=lambda c: c["name"])
def test_fastv_matches_the_authors_code(fixture, case):
    weights, pixels, expected = fixture
    model = fixture_model(weights, FastV(layer=case["layer"], keep=case["keep"]))
    image = pixels[case["image"]:case["image"] + 1].double()
    prompt = model.encode(image, [case["ids"]])
    logits = model.logits(prompt)[0]
    name = f"fastv.{case['name']}"
    assert model.fastv.kept[0].tolist() == expected[f"{name}.kept"].tolist()
    # the fork casts its logits to float32 (`logits.float()`); both sides computed in float64
    torch.testing.assert_close(logits.float(), expected[f"{name}.logits"], atol=1e-5, rtol=1e-6)
    out = model.generate(image, [case["ids"]], max_new_tokens=case["new_tokens"], do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    assert out.sequences[0].tolist() == expected[f"{name}.new_tokens"].tolist()
    torch.testing.assert_close(torch.stack([s[0] for s in out.scores]).float(), expected[f"{name}.step_logits"],
                               atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("case", CASES["visionzip"], ids=lambda c: c["name"])
def test_visionzip_matches_the_authors_code(fixture, case):
    weights, pixels, expected = fixture
    settings = VisionZip(dominant=case["dominant"], contextual=case["contextual"])
    model = fixture_model(weights, settings)
    # SDPA: transformers 5's eager attention takes its softmax in float32 even for float64 inputs
    with model.backend_scope("sdpa"):
        tokens, kept = visionzip_tokens(model.model.model.vision_tower, pixels[case["images"]].double(),
                                        model.config.vision_feature_layer, settings)
    name = f"visionzip.{case['name']}"
    assert kept.tolist() == expected[f"{name}.kept"].tolist()
    torch.testing.assert_close(tokens, expected[f"{name}.tokens"], atol=1e-10, rtol=1e-10)
    # ... and those tokens, projected, are the LLM input at the image position.
    prompt = model.encode(pixels[case["images"][:1]].double(), [[1, 5, IMG, 7]], backend="sdpa")
    projected = model.model.model.multi_modal_projector(expected[f"{name}.tokens"][:1])
    torch.testing.assert_close(prompt.inputs_embeds[0, 2:2 + settings.tokens], projected[0])
    assert prompt.inputs_embeds.shape[1] == 3 + settings.tokens


PROMPTS = [[1, IMG, 5, 6], [1, 7, IMG, 5, 6, 9, 9, 4]]


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(3)
    return torch.rand(2, 3, 28, 28)


@pytest.mark.parametrize("reduction", [FastV(layer=1, keep=16), VisionZip(dominant=12, contextual=4)],
                         ids=["fastv", "visionzip"])
def test_a_ragged_batch_decodes_as_each_prompt_alone(reduction, images):
    torch.manual_seed(0)
    # float32: in float64 transformers' own baseline turns left padding into NaNs (its eager mask)
    model = LlavaBaseline.from_preset("tiny", dtype=torch.float32, reduction=reduction)
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    batch = model.generate(images, PROMPTS, **kw)
    for i, ids in enumerate(PROMPTS):
        alone = model.generate(images[i:i + 1], [ids], **kw)
        assert batch.sequences[i].tolist() == alone.sequences[0].tolist()
        torch.testing.assert_close(torch.stack([s[i] for s in batch.scores]),
                                   torch.stack([s[0] for s in alone.scores]), atol=1e-4, rtol=1e-4)


def test_fastv_drops_tokens_from_the_cache_of_the_later_layers_only(images):
    torch.manual_seed(0)
    model = LlavaBaseline.from_preset("tiny", dtype=torch.float32, reduction="fastv", tokens=10, fastv_layer=1)
    out = model.generate(images, PROMPTS, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    full = cache.get_seq_length(0)
    assert cache.get_seq_length(1) == full - (model.config.num_patches - 10)


def test_fastv_refuses_a_static_cache(images):
    from transformers import GenerationConfig

    model = LlavaBaseline.from_preset("tiny", dtype=torch.float32, reduction="fastv", tokens=10, fastv_layer=1)
    with pytest.raises(ValueError, match="cache_implementation: FastV .* dynamic cache; got 'static'"):
        model.generate(images, PROMPTS, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(images, PROMPTS, generation_config=GenerationConfig(max_new_tokens=2, cache_implementation="static"))
    assert model.generate(images, PROMPTS, max_new_tokens=1, cache_implementation="dynamic").shape == (2, 1)


def test_fastv_keeping_every_token_is_the_unreduced_model(images):
    torch.manual_seed(0)
    plain = LlavaBaseline.from_preset("tiny", dtype=torch.float32)
    torch.manual_seed(0)
    kept_all = LlavaBaseline.from_preset("tiny", dtype=torch.float32, reduction="fastv",
                                         tokens=plain.config.num_patches, fastv_layer=1)
    prompt = plain.encode(images, PROMPTS)
    tokens = prompt.attention_mask.bool()  # padding rows are not compared
    torch.testing.assert_close(kept_all.logits(prompt)[tokens], plain.logits(prompt)[tokens], atol=1e-6, rtol=0)


def test_reductions_sharing_the_weights_leave_the_plain_model_alone(images):
    torch.manual_seed(0)
    plain = LlavaBaseline.from_preset("tiny", dtype=torch.float32)
    fastv = plain.with_reduction("fastv", tokens=8, fastv_layer=1)
    zipped = plain.with_reduction("visionzip", tokens=12)
    assert fastv.model is plain.model and plain.reduction is None
    prompt = plain.encode(images, PROMPTS)
    before = plain.logits(prompt)
    assert fastv.logits(fastv.encode(images, PROMPTS)).shape[1] == prompt.inputs_embeds.shape[1] - (49 - 8)
    assert zipped.encode(images, PROMPTS).inputs_embeds.shape[1] == prompt.inputs_embeds.shape[1] - (49 - 12)
    torch.testing.assert_close(plain.logits(plain.encode(images, PROMPTS)), before, atol=0, rtol=0)
    # outside its scope (a bare LLM call) no hook is left behind
    out = plain.model(inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask).logits
    assert out.shape[1] == prompt.inputs_embeds.shape[1]


def test_visionzip_budget_splits_as_published():
    assert [(v.dominant, v.contextual) for v in map(VisionZip.for_budget, (64, 128, 192))] == \
        [(54, 10), (108, 20), (162, 30)]
    assert FastV.from_ratio(2, 0.5).keep == 288
    assert make_reduction("fastv", 128, 3) == FastV(layer=3, keep=128)


@pytest.mark.parametrize("kwargs, match", [
    (dict(reduction="tome"), "reduction"),
    (dict(reduction=FastV(), tokens=64), "tokens"),
    (dict(reduction="fastv", tokens=100), "reduction"),  # more than tiny's 49 patches
    (dict(reduction="visionzip", tokens=100), "reduction"),
    (dict(reduction="fastv", tokens=8, fastv_layer=2), "reduction"),  # tiny's LLM has 2 layers
])
def test_bad_reduction_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlavaBaseline.from_preset("tiny", **kwargs)


@pytest.mark.parametrize("make, match", [(lambda: FastV(layer=0), "layer"), (lambda: FastV(keep=0), "keep"),
                                         (lambda: VisionZip(dominant=1), "dominant"),
                                         (lambda: VisionZip(contextual=0), "contextual"),
                                         (lambda: FastV.from_ratio(2, 1.0), "ratio")])
def test_bad_settings_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_fastv_ranks_the_same_tokens_on_every_attention_backend(images):
    torch.manual_seed(0)
    model = LlavaBaseline.from_preset("tiny", dtype=torch.float32, reduction="fastv", tokens=10, fastv_layer=1)
    prompt = model.encode(images, PROMPTS)
    logits = {}
    for backend in ("torch", "sdpa"):
        logits[backend] = model.logits(prompt, backend=backend)
        logits[f"{backend}.kept"] = model.fastv.kept
    assert torch.equal(logits["torch.kept"], logits["sdpa.kept"])
    valid = prompt.attention_mask.bool().gather(1, logits["torch.kept"])
    torch.testing.assert_close(logits["sdpa"][valid], logits["torch"][valid], atol=1e-5, rtol=1e-5)
