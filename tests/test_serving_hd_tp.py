"""vLLM with an HD checkpoint (2 x 2 blocks + the whole image, C = 2), and tensor parallelism (TP=2 on the CPU).

Each engine against ``LlavaMini.generate`` on the same checkpoint; TP=2 also against TP=1's
tokens (``test_serving.py`` runs TP=1 on the same checkpoint and seed).
"""

import os

import pytest

from serving_common import (QUESTIONS, assert_same, close, greedy, make_engine, needs_vllm, random_frames,
                            random_image, reference, request, vllm_env, write_serve_checkpoint)
from serving_common import checkpoint, ref  # noqa: F401  (fixtures)

pytestmark = [needs_vllm, pytest.mark.vllm]


@pytest.fixture(scope="module")
def hd(tmp_path_factory):
    from llava_mini.lmm import LlavaMini

    vllm_env(tmp_path_factory.mktemp("vllm"))
    path = write_serve_checkpoint(tmp_path_factory.mktemp("serve-hd"), "tiny-hd", seed=1)
    llm = make_engine(path)
    yield llm, LlavaMini.from_pretrained(path)
    close(llm)


def test_hd_image_and_video(hd):
    llm, model = hd
    assert model.config.resolution_ratio == 2 and model.config.tokens_per_image == 4
    image, frames = random_image(50, 57, 41), random_frames(51, count=3, width=60, height=44)
    outs = llm.generate([request(QUESTIONS[0], image), request(QUESTIONS[1], video=frames)], greedy())
    assert_same(outs[0].outputs[0], reference(model, QUESTIONS[0], image=image))
    assert_same(outs[1].outputs[0], reference(model, QUESTIONS[1], video=frames))


@pytest.fixture(scope="module")
def tp2(checkpoint, tmp_path_factory):
    vllm_env(tmp_path_factory.mktemp("vllm"))
    # one core per rank: the CPU backend binds each rank's threads, and this machine has one NUMA node
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    bind = f"{cores[0]}-{cores[half - 1]}|{cores[half]}-{cores[-1]}" if len(cores) > 1 else f"{cores[0]}|{cores[0]}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_OMP_THREADS_BIND", bind)
        llm = make_engine(checkpoint, tensor_parallel_size=2, distributed_executor_backend="mp")
    yield llm
    close(llm)


def test_tensor_parallel_two_ranks(tp2, ref):
    images = [random_image(60 + i, 30 + 4 * i, 30) for i in range(3)]
    prompts = [request(q, im) for q, im in zip(QUESTIONS, images)] + [request(QUESTIONS[3])]
    outs = tp2.generate(prompts, greedy())
    for out, q, im in zip(outs, QUESTIONS, images + [None]):
        assert_same(out.outputs[0], reference(ref, q, image=im))


@pytest.fixture(scope="module")
def fused(checkpoint, tmp_path_factory):
    vllm_env(tmp_path_factory.mktemp("vllm"))
    with pytest.MonkeyPatch.context() as env:  # the engine's processes read it at start
        env.setenv("LLAVA_MINI_BACKEND", "triton")
        llm = make_engine(checkpoint)
    yield llm
    close(llm)


def test_fused_kernels_inside_vllm(fused, ref):
    """The encoder on this package's Triton kernels (the GPU default; the interpreter here) gives
    the reference's tokens (``ref`` runs the torch backend)."""
    image = random_image(90, 35, 27)
    out = fused.generate([request(QUESTIONS[6], image)], greedy())[0]
    assert_same(out.outputs[0], reference(ref, QUESTIONS[6], image=image, backend="torch"))
