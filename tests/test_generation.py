"""Decoding: LLaVA-Mini and the 576-token baseline, checked against decoding written out by hand.

Both decode through transformers' ``generate`` from the fused embeddings; these tests check what
our side decides (the prompt as left-padded embeddings, positions, defaults, the options reaching
transformers) against an independent computation: full forwards over the whole sequence.
"""

import pytest
import torch
from transformers import GenerationConfig, TextStreamer
from transformers.generation.streamers import BaseStreamer

from llava_mini.lmm import IMAGE_TOKEN_INDEX as IMG
from llava_mini.lmm import LlavaMini
from llava_mini.lmm.baseline import LlavaBaseline

PROMPTS = [[1, 5, IMG, 7, 8], [1, IMG, 9, 10, 11, 12, 13, 14]]  # ragged: the batch is left-padded
NEVER_STOP = dict(eos_token_id=None)  # random weights: a fixed number of tokens


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    return LlavaMini.from_preset("tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def baseline():
    torch.manual_seed(0)
    return LlavaBaseline.from_preset("tiny", dtype=torch.float32)


@pytest.fixture(params=["mini", "baseline"])
def model(request):
    return request.getfixturevalue(request.param)


def images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 28 + 3 * i, 28 + 5 * i, generator=g) for i in range(n)]


def language_model(model):
    return model.llm if isinstance(model, LlavaMini) else model.model


def with_tokens(llm, prompt, tokens):
    """(embeddings, mask, positions) of the prompt followed by ``tokens`` [B, n]."""
    embeds = torch.cat([prompt.inputs_embeds, llm.get_input_embeddings()(tokens)], dim=1)
    mask = torch.cat([prompt.attention_mask, torch.ones_like(tokens)], dim=1)
    return embeds, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def argmax_loop(llm, prompt, new_tokens: int) -> torch.Tensor:
    """Greedy decoding written out: one full forward over the whole sequence (no cache) per new token."""
    tokens = prompt.attention_mask.new_zeros(prompt.attention_mask.shape[0], 0)
    for _ in range(new_tokens):
        embeds, mask, positions = with_tokens(llm, prompt, tokens)
        logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


@torch.no_grad()
def log_prob(llm, prompt, tokens) -> torch.Tensor:
    """Sum of log p(token) over ``tokens`` [B, n] after the prompt, from one full forward: [B]."""
    embeds, mask, positions = with_tokens(llm, prompt, tokens)
    logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    n = tokens.shape[1]
    return logits[:, -n - 1:-1].log_softmax(-1).gather(-1, tokens[..., None])[..., 0].sum(-1)


class Collect(BaseStreamer):
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


# --- greedy ---------------------------------------------------------------------------------------
def test_greedy_equals_an_argmax_loop_over_full_forwards(model):
    imgs = images(2)
    want = argmax_loop(language_model(model), model.encode(imgs, PROMPTS), 8)
    assert torch.equal(model.generate(imgs, PROMPTS, max_new_tokens=8, **NEVER_STOP), want)


@pytest.mark.parametrize("options", [dict(use_cache=False), dict(cache_implementation="static"),
                                     dict(num_beams=1), dict(do_sample=True, top_k=1)])
def test_cache_kinds_and_degenerate_options_give_greedy(model, options):
    imgs = images(2)
    greedy = model.generate(imgs, PROMPTS, max_new_tokens=6, **NEVER_STOP)
    assert torch.equal(model.generate(imgs, PROMPTS, max_new_tokens=6, **NEVER_STOP, **options), greedy)


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3)])
def test_ragged_batch_rows_equal_each_prompt_alone(mini, options):
    imgs = images(2)
    batch = mini.generate(imgs, PROMPTS, max_new_tokens=6, **NEVER_STOP, **options)
    for i in range(2):
        assert torch.equal(batch[i], mini.generate([imgs[i]], [PROMPTS[i]], max_new_tokens=6, **NEVER_STOP,
                                                   **options)[0])


def test_static_cache_with_sdpa_and_its_refusal_by_the_triton_attention(mini):
    imgs = images(2)
    greedy = mini.generate(imgs, PROMPTS, max_new_tokens=4, **NEVER_STOP)
    assert torch.equal(mini.generate(imgs, PROMPTS, max_new_tokens=4, **NEVER_STOP, backend="sdpa",
                                     cache_implementation="static"), greedy)
    with pytest.raises(ValueError, match="static caches are not supported"):
        mini.generate(imgs, PROMPTS, max_new_tokens=2, backend="triton", cache_implementation="static")


@pytest.mark.gpu
def test_static_cache_and_compiled_step_on_cuda_equal_the_dynamic_cache():
    torch.manual_seed(0)
    model = LlavaMini.from_preset("tiny", dtype=torch.float32, device="cuda")
    imgs = images(2)
    want = model.generate(imgs, PROMPTS, max_new_tokens=8, **NEVER_STOP, backend="sdpa")
    got = model.generate(imgs, PROMPTS, max_new_tokens=8, **NEVER_STOP, backend="sdpa", cache_implementation="static")
    assert torch.equal(got, want)


# --- sampling, beams, stopping --------------------------------------------------------------------
def test_sampling_is_reproducible_with_a_seed(mini):
    def sample(seed):
        torch.manual_seed(seed)
        return mini.generate(images(1), [PROMPTS[0]], max_new_tokens=8, do_sample=True, temperature=0.7,
                             top_p=0.9, **NEVER_STOP)

    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))


def test_beam_search_scores_are_the_sequences_log_probabilities(model):
    imgs, n = images(2), 5
    out = model.generate(imgs, PROMPTS, max_new_tokens=n, num_beams=3, num_return_sequences=3,
                         return_dict_in_generate=True, output_scores=True, **NEVER_STOP)
    assert out.sequences.shape == (6, n)
    prompt = model.encode(imgs, PROMPTS)
    prompt.inputs_embeds, prompt.attention_mask = (t.repeat_interleave(3, 0) for t in
                                                   (prompt.inputs_embeds, prompt.attention_mask))
    # length_penalty 1: a beam's score is its log-probability over its length; best first
    want = log_prob(language_model(model), prompt, out.sequences) / n
    torch.testing.assert_close(out.sequences_scores, want, atol=1e-4, rtol=0)
    assert (out.sequences_scores.view(2, 3).diff(dim=1) <= 0).all()


def test_eos_ids_end_rows_and_pad_them(mini):
    imgs = images(2)
    full = mini.generate(imgs, PROMPTS, max_new_tokens=6, **NEVER_STOP)
    stop = int(full[0, 1])
    got = mini.generate(imgs, PROMPTS, max_new_tokens=6, eos_token_id=[stop, 2])
    assert_ends_at(got, full, stop, mini.llm.generation_config.pad_token_id)


def assert_ends_at(got, full, stop: int, pad: int):
    """Each row of ``got`` is the row of ``full`` up to its first ``stop`` token, then padding."""
    ends = [want.tolist().index(stop) + 1 if stop in want.tolist() else len(want) for want in full]
    assert ends[0] < full.shape[1] and got.shape[1] == max(ends)  # decoding ends when every row has
    for row, want, end in zip(got, full, ends):
        assert torch.equal(row[:end], want[:end]) and (row[end:] == pad).all()


def test_stop_strings_use_the_models_tokenizer(mini, tiny_tokenizer):
    imgs = images(2)
    # with the eos id kept: transformers pads rows that met a stop string only when there is one
    full = mini.generate(imgs, PROMPTS, max_new_tokens=8)
    stop = next(int(t) for t in full[0, 1:] if t >= 10)  # a token that decodes to a word
    mini.tokenizer = tiny_tokenizer(mini.config.text["vocab_size"])
    try:
        word = mini.decode(torch.tensor([[stop]]))[0]
        got = mini.generate(imgs, PROMPTS, max_new_tokens=8, stop_strings=[word])
    finally:
        mini.tokenizer = None
    assert word == f"t{stop}"
    assert_ends_at(got, full, stop, mini.llm.generation_config.pad_token_id)
    with pytest.raises(ValueError, match="tokenizer"):  # no tokenizer: transformers says so
        mini.generate(imgs, PROMPTS, max_new_tokens=2, stop_strings=["t9"])


def test_streamers_receive_the_tokens_as_decoded(mini, capsys, tiny_tokenizer):
    collect = Collect()
    tokens = mini.generate(images(1), [PROMPTS[0]], max_new_tokens=6, streamer=collect, **NEVER_STOP)
    assert [t for chunk in collect.chunks for t in chunk] == tokens[0].tolist() and collect.ended
    assert all(len(chunk) <= 1 for chunk in collect.chunks)  # one token at a time (the prompt is embeddings)
    tokenizer = tiny_tokenizer(mini.config.text["vocab_size"])
    mini.generate(images(1), [PROMPTS[0]], max_new_tokens=6, streamer=TextStreamer(tokenizer, skip_prompt=True),
                  **NEVER_STOP)
    assert capsys.readouterr().out.strip() == tokenizer.decode(tokens[0])


# --- one path for both models, defaults from the checkpoint ---------------------------------------
def test_baseline_and_mini_hand_transformers_the_same_call(mini, baseline, monkeypatch):
    from llava_mini.profiling.latency import Generations

    seen, config = {}, GenerationConfig(max_new_tokens=4, num_beams=2, repetition_penalty=1.2)
    for name, model in (("mini", mini), ("baseline", baseline)):
        calls = []
        monkeypatch.setattr(language_model(model), "generate", lambda **kw: calls.append(kw))
        model.generate(images(2), PROMPTS, generation_config=config)
        prompt = model.encode(images(2), PROMPTS)
        assert torch.equal(calls[0].pop("inputs_embeds"), prompt.inputs_embeds)
        assert torch.equal(calls[0].pop("attention_mask"), prompt.attention_mask)
        with pytest.raises(RuntimeError, match="recorded 0 LLM calls"):  # the stand-in generate runs no LLM
            Generations(model, batch=1, prompt_len=6, new_tokens=3)()  # as `bench` decodes
        seen[name] = [{k: v for k, v in kw.items() if k not in ("inputs_embeds", "attention_mask")} for kw in calls]
    assert seen["mini"] == seen["baseline"] and len(seen["mini"]) == 2
    assert seen["mini"][0] == dict(generation_config=config)


def test_generation_config_json_sets_the_defaults(tmp_path):
    torch.manual_seed(0)
    model = LlavaMini.from_preset("tiny")
    model.llm.generation_config.update(max_new_tokens=3, num_beams=2, eos_token_id=None)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "generation_config.json").is_file()
    loaded = LlavaMini.from_pretrained(tmp_path)
    imgs = images(2)
    want = model.generate(imgs, PROMPTS)
    assert want.shape == (2, 3)
    assert torch.equal(loaded.generate(imgs, PROMPTS), want)
    assert torch.equal(loaded.generate(imgs, PROMPTS, num_beams=1), argmax_loop(loaded.llm, loaded.encode(imgs, PROMPTS), 3))
    assert loaded.generate(imgs, PROMPTS, max_new_tokens=5).shape == (2, 5)  # a keyword wins
    (tmp_path / "generation_config.json").unlink()
    defaults = LlavaMini.from_pretrained(tmp_path).llm.generation_config  # back to the LLM config's
    assert defaults.max_new_tokens is None and defaults.eos_token_id == model.config.text["eos_token_id"]


def test_bad_generation_arguments_are_clear_errors(mini):
    with pytest.raises(ValueError, match="max_new_tokens"):
        mini.generate(images(1), [PROMPTS[0]], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        mini.generate(images(1), [PROMPTS[0]], max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(TypeError, match="generation_config"):
        mini.generate(images(1), [PROMPTS[0]], generation_config=dict(max_new_tokens=2))
    for top_p in (1.5, 0.0):
        with pytest.raises(ValueError, match="top_p"):
            mini.generate(images(1), [PROMPTS[0]], max_new_tokens=2, do_sample=True, top_p=top_p)
    with pytest.raises(ValueError, match="not used by the model"):
        mini.generate(images(1), [PROMPTS[0]], max_new_tokens=2, not_an_option=1)
