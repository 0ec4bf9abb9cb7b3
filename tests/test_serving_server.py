"""The real server (``llava-mini serve``) on 127.0.0.1, driven through the ``openai`` client.

Every answer is checked against ``LlavaMini.generate`` on the same checkpoint (greedy, its token
ids through vLLM's ``return_tokens_as_token_ids``): streamed and not, a video file, 32 concurrent
clients, and the server still answering correctly after a series of bad requests.
"""

import base64
import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from serving_common import (MAX_MODEL_LEN, NEW_TOKENS, QUESTIONS, LOGPROB_ATOL, needs_vllm, random_image, reference,
                            vllm_env)
from serving_common import checkpoint, ref  # noqa: F401  (fixtures)

pytestmark = [needs_vllm, pytest.mark.vllm]
CLIENTS, REQUESTS_PER_CLIENT = 32, 2
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    vllm_env(tmp)
    port = free_port()
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llava_mini.cli", "serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "32",
         "--seed", "0"], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    import requests

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start in {START_TIMEOUT_S} s")
        time.sleep(1)
    yield url
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def data_url(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_part(payload: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(payload, mime)}}


def chat(client, content, stream: bool = False, **options):
    return client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": content}],
        max_tokens=NEW_TOKENS, temperature=0, logprobs=True, stream=stream,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True, **options.pop("extra_body", {})},
        **options)


def token_ids(logprobs) -> list[int]:
    return [int(t.token.removeprefix("token_id:")) for t in logprobs]


def check(logprobs, expected) -> None:
    tokens, values = expected
    assert token_ids(logprobs) == tokens
    np.testing.assert_allclose([t.logprob for t in logprobs], values, atol=LOGPROB_ATOL, rtol=0)


def ask(client, question, image):
    return chat(client, [image_part(png(image)), {"type": "text", "text": question}]).choices[0].logprobs.content


def test_chat_completion(client, ref):
    image = random_image(70, 44, 30)
    check(ask(client, QUESTIONS[0], image), reference(ref, QUESTIONS[0], image=image))


def test_streamed_chat_completion(client, ref):
    image = random_image(71, 30, 52)
    content = [image_part(png(image)), {"type": "text", "text": QUESTIONS[1]}]
    steps = [t for chunk in chat(client, content, stream=True) for choice in chunk.choices
             if choice.logprobs for t in choice.logprobs.content]
    check(steps, reference(ref, QUESTIONS[1], image=image))


def test_video_file_with_the_released_frame_selection(client, ref, tmp_path):
    from llava_mini.lmm.video import write_synthetic_video

    path = write_synthetic_video(tmp_path / "clip.mp4", frames=35, fps=10)  # 3.5 s: the released rule keeps 3
    content = [{"type": "video_url", "video_url": {"url": data_url(path.read_bytes(), "video/mp4")}},
               {"type": "text", "text": QUESTIONS[2]}]
    answer = chat(client, content)
    check(answer.choices[0].logprobs.content, reference_video(ref, QUESTIONS[2], path))
    text_tokens = len(ref.prompt_ids(prompts=[QUESTIONS[2]])[0]) - 1
    assert answer.usage.prompt_tokens == text_tokens + 3  # 3 frames x C^2 = 1 (vLLM's own loader would take 32)


def reference_video(model, question, path):
    import torch

    out = model.generate(prompts=[question], videos=[str(path)], max_new_tokens=NEW_TOKENS, eos_token_id=None,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, -NEW_TOKENS:].tolist()
    return tokens, [torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(out.logits, tokens)]


def test_concurrent_clients_get_their_own_answers(client, ref):
    jobs = [(QUESTIONS[i % len(QUESTIONS)], random_image(100 + i, 24 + i % 17, 24 + (5 * i) % 23))
            for i in range(CLIENTS * REQUESTS_PER_CLIENT)]
    expected = [reference(ref, q, image=im) for q, im in jobs]

    def one_client(c):  # each client sends its requests one after the other
        return [(i, ask(client, *jobs[i])) for i in range(c, len(jobs), CLIENTS)]

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = dict(pair for batch in pool.map(one_client, range(CLIENTS)) for pair in batch)
    assert sorted(answers) == list(range(len(jobs)))  # every request answered
    for i, logprobs in answers.items():
        assert token_ids(logprobs) == expected[i][0], f"request {i} got another request's answer"


def bad_requests():
    image = random_image(80, 30, 30)
    good = png(image)
    text = {"type": "text", "text": "What?"}
    return {
        "corrupt image": ([image_part(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4), text], "Failed to load image"),
        "truncated image": ([image_part(good[: len(good) // 2]), text], "truncated"),
        "not an image": ([image_part(b"name,value\nx,1\n", "image/png"), text], "Failed to load image"),
        "1 x 1 image": ([image_part(png(Image.new("RGB", (1, 1)))), text], "too small"),
        "10,000 x 10,000 image": ([image_part(png(Image.new("RGB", (10_000, 10_000)))), text], "too large"),
        "two images": ([image_part(good), image_part(good), text], "At most 1 image"),
        "longer than the context": ([image_part(good), {"type": "text", "text": "x" * MAX_MODEL_LEN}],
                                    "maximum context length"),
    }


def test_bad_requests_get_4xx_and_the_server_goes_on(client, ref):
    import openai

    for name, (content, message) in bad_requests().items():
        with pytest.raises(openai.BadRequestError, match=message):
            chat(client, content)
    with pytest.raises(openai.BadRequestError, match="unknown field.*max_token"):
        chat(client, [{"type": "text", "text": "Hi"}], extra_body={"max_token": 3})
    image = random_image(81, 31, 29)  # still answering, and correctly
    check(ask(client, QUESTIONS[3], image), reference(ref, QUESTIONS[3], image=image))
