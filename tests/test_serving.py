"""LLaVA-Mini in vLLM's engine (offline ``vllm.LLM``) against ``LlavaMini.generate`` on the same checkpoint.

One engine per checkpoint, shared by the tests of this module: float32, prefix caching on and
chunked prefill with a token budget (64) smaller than every prompt (~200 tokens), so every case
below also runs through chunked prefill and the prefix cache.
"""

import pytest

from serving_common import (QUESTIONS, assert_same, close, greedy, make_engine, needs_vllm, prompt_text, random_frames,
                            random_image, reference, request, vllm_env)
from serving_common import checkpoint, ref  # noqa: F401  (fixtures)

pytestmark = [needs_vllm, pytest.mark.vllm]
CHUNK = 64


@pytest.fixture(scope="module")
def engine(checkpoint, tmp_path_factory):
    vllm_env(tmp_path_factory.mktemp("vllm"))
    llm = make_engine(checkpoint, max_num_batched_tokens=CHUNK, max_num_seqs=8, enable_prefix_caching=True)
    yield llm
    close(llm)


def test_one_image(engine, ref):
    image = random_image(1, 40, 30)
    out = engine.generate([request(QUESTIONS[0], image)], greedy())[0]
    assert len(out.prompt_token_ids) > CHUNK  # prefilled in chunks
    assert_same(out.outputs[0], reference(ref, QUESTIONS[0], image=image))


def test_batch_of_eight_prompts_and_image_sizes(engine, ref):
    images = [random_image(10 + i, 20 + 9 * i, 50 - 3 * i) for i in range(8)]
    outs = engine.generate([request(q, im) for q, im in zip(QUESTIONS, images)], greedy())
    assert len({len(o.prompt_token_ids) for o in outs}) == 8  # eight different prompt lengths
    for out, q, im in zip(outs, QUESTIONS, images):
        assert_same(out.outputs[0], reference(ref, q, image=im))


def test_video_frames(engine, ref):
    frames = random_frames(3, count=5)
    out = engine.generate([request(QUESTIONS[1], video=frames)], greedy())[0]
    assert_same(out.outputs[0], reference(ref, QUESTIONS[1], video=frames))
    # the span holds the text and 5 frames x C^2 vision positions
    assert len(out.prompt_token_ids) == len(ref.prompt_ids(prompts=[QUESTIONS[1]])[0]) - 1 + 5


def test_text_only(engine, ref):
    out = engine.generate([request(QUESTIONS[2])], greedy())[0]
    assert_same(out.outputs[0], reference(ref, QUESTIONS[2]))


def test_prefix_cache_never_shares_between_images_or_prompts(engine, ref):
    a, b = random_image(20, 33, 33), random_image(21, 33, 33)
    q, q2 = QUESTIONS[3], QUESTIONS[4]
    first = engine.generate([request(q, a)], greedy())[0]
    # same prompt, another image: nothing may come from the cache
    other_image = engine.generate([request(q, b)], greedy())[0]
    # same image, another prompt (the same text up to the question): nothing either
    other_prompt = engine.generate([request(q2, a)], greedy())[0]
    assert other_image.num_cached_tokens == 0 and other_prompt.num_cached_tokens == 0
    assert_same(first.outputs[0], reference(ref, q, image=a))
    assert_same(other_image.outputs[0], reference(ref, q, image=b))
    assert_same(other_prompt.outputs[0], reference(ref, q2, image=a))
    assert list(other_image.outputs[0].token_ids) != list(first.outputs[0].token_ids)
    # the same image and prompt again: its blocks come from the cache, with the same answer
    again = engine.generate([request(q, a)], greedy())[0]
    assert again.num_cached_tokens >= CHUNK
    assert list(again.outputs[0].token_ids) == list(first.outputs[0].token_ids)


def test_chat_api_uses_the_released_template(engine, ref):
    import base64
    import io

    image = random_image(30, 36, 28)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": QUESTIONS[5]}]}]
    out = engine.chat(messages, greedy())[0]
    assert_same(out.outputs[0], reference(ref, QUESTIONS[5], image=image))


def test_refuses_two_items_and_a_prompt_without_placeholder(engine):
    from vllm.exceptions import VLLMValidationError

    image = random_image(40, 30, 30)
    with pytest.raises(VLLMValidationError, match="At most 1 image"):  # vLLM's own check of the limit we declare
        engine.generate([{"prompt": prompt_text("Q?"), "multi_modal_data": {"image": [image, image]}}], greedy())
    with pytest.raises(VLLMValidationError, match="one image or one video"):
        engine.generate([{"prompt": prompt_text("Q?"), "multi_modal_data": {"image": image,
                                                                            "video": random_frames(0, 2)}}], greedy())
    with pytest.raises(VLLMValidationError, match="placeholder"):
        engine.generate([{"prompt": "no placeholder here", "multi_modal_data": {"image": image}}], greedy())
