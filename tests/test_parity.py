"""Golden parity: the released LLaVA-Mini code's outputs on a tiny checkpoint, reproduced on every path.

tests/data/parity/ holds a checkpoint written by ``save_pretrained``, raw uint8 images and video
frames, and what the released code (transformers 4.43.1, float64) computed from them: the pixel
tensors its preprocessing made and what ``prepare_inputs_labels_for_multimodal`` handed the LLM.
How it was produced: tests/data/parity/README.md.
"""

import contextlib
import dataclasses
import functools
import itertools
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llava_mini.lmm import LlavaMini, Savings
from llava_mini.lmm import processing

DATA = Path(__file__).parent / "data" / "parity"
CASES = {case["name"]: case for case in json.loads((DATA / "cases.json").read_text())}
EXPECTED = load_file(str(DATA / "expected.safetensors"))
INPUTS = {k: v.numpy() for k, v in load_file(str(DATA / "inputs.safetensors")).items()}
# Relative to the largest released value. "sdpa" is the attention the released loader picks: float64
# rounding only. "torch" (eager) differs by transformers 5's eager attention, which takes its softmax
# in float32 even in a float64 model (measured <= 2e-7). "triton" runs in float32.
TOLERANCE = {"sdpa": 1e-12, "torch": 1e-6, "triton": 1e-4}
SAVINGS = [dict(zip(("prefix_split", "prune_last_layer", "batch_frames"), flags))
           for flags in itertools.product((False, True), repeat=3)]


@functools.cache
def model_for(compressor_size: int, resolution_ratio: int, dtype: torch.dtype, device: str = "cpu") -> LlavaMini:
    """The fixture checkpoint; C = 2 and 8 swap in the compressor's queries and position table."""
    base = LlavaMini.from_pretrained(DATA / "checkpoint", dtype=dtype, device=device)
    if (compressor_size, resolution_ratio) == (1, 1):
        return base
    config = dataclasses.replace(base.config, compressor_size=compressor_size, resolution_ratio=resolution_ratio)
    model = LlavaMini.from_config(config, dtype=dtype, device=device)
    state = base.state_dict()
    if compressor_size != 1:
        variants = load_file(str(DATA / "compressors.safetensors"))
        for name in ("query", "pos_embed"):
            state[f"compressor.{name}"] = variants[f"{compressor_size}.{name}"].to(dtype)
    model.load_state_dict(state)
    model.image_processor = base.image_processor
    return model


def frames_of(case):
    """The decoded frames the released frame selection picked (frame selection is not tested here)."""
    return [INPUTS[case["video"]][i] for i in EXPECTED[f"{case['name']}.frame_indices"].tolist()]


def encode(case, dtype, backend, savings):
    # the kernels run on CUDA when there is one, else under the Triton interpreter (conftest)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    model = model_for(case["compressor_size"], case["resolution_ratio"], dtype, device)
    model.savings = Savings(**savings)
    if "video" in case:
        return model.encode(videos=[frames_of(case)], input_ids=case["ids"], backend=backend)
    images = [Image.fromarray(INPUTS[k]) for k in case["images"]]
    return model.encode(images, case["ids"], backend=backend)


def relative_error(case, out) -> float:
    """Largest difference over the released output's largest value; positions must agree exactly."""
    want, want_mask = EXPECTED[f"{case['name']}.embeds"], EXPECTED[f"{case['name']}.mask"].bool()
    assert out.attention_mask.sum(-1).tolist() == want_mask.sum(-1).tolist()
    got = out.inputs_embeds[out.attention_mask.bool()].double().cpu()  # ours left-padded, the release right-padded
    return ((got - want[want_mask]).abs().max() / want[want_mask].abs().max()).item()


def savings_for(case):
    """Every combination of the savings; batch_frames only matters for videos."""
    return SAVINGS if "video" in case else [s for s in SAVINGS if not s["batch_frames"]]


def truncation_warning(name):
    """hd_c8's LLM input (72 positions) is longer than the checkpoint's tokenizer_model_max_length (70)."""
    if name == "hd_c8":
        return pytest.warns(UserWarning, match="tokenizer_model_max_length")
    return contextlib.nullcontext()


@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
@pytest.mark.parametrize("name", CASES)
def test_llm_input_matches_the_released_code(name, backend):
    """float64 on "torch"/"sdpa"; the fused kernels ("triton", the interpreter on a CPU) in float32."""
    case = CASES[name]
    dtype = torch.float32 if backend == "triton" else torch.float64
    for savings in savings_for(case):
        with truncation_warning(name):
            out = encode(case, dtype, backend, savings)
        assert relative_error(case, out) < TOLERANCE[backend], savings


@pytest.mark.parametrize("name", CASES)
def test_preprocessing_matches_the_released_pixels(name):
    """Pad to square (images), HD blocks of the original image, video frames resized nearest: as released."""
    case = CASES[name]
    model = model_for(case["compressor_size"], case["resolution_ratio"], torch.float64)
    want = EXPECTED[f"{name}.pixels"]  # [B or T, parts, 3, S, S]
    if "video" in case:
        got = processing.preprocess_video_frames(frames_of(case), model.image_processor, case["resolution_ratio"])
    else:
        got = model.prepare_images([Image.fromarray(INPUTS[k]) for k in case["images"]]).float()
    torch.testing.assert_close(got, want if case["resolution_ratio"] > 1 else want[:, 0], atol=1e-6, rtol=0)
